"""World metrics: exact alignment accuracy from the analytic judge, and a Fréchet quality proxy.

`alignment_report` judges each generated image against the scene / prompt it was generated
from and tallies every attribute category. `frechet_distance` is the usual Fréchet distance
between Gaussians fitted to two feature sets (as in FID), computed with symmetric
eigendecompositions only (no scipy); `quality_proxy` applies it to `judge.features`, which
react to blur, noise, colour casts and broken shapes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .judge import features, judge_scene
from .world import Scene, parse_prompt

CATEGORIES = ("colour", "shape", "position", "binding", "relation", "count")


def _tally(n: int, ok: int) -> dict:
    return {"n": n, "ok": ok, "accuracy": ok / n if n else float("nan")}


def alignment_report(images: Sequence, scenes: Sequence[Scene | str], keep_items: bool = False) -> dict:
    """Judge images against their scenes/prompts and tally accuracy per attribute category.

    Args:
        images: RGB images (PIL or HxWx3 arrays), one per scene.
        scenes: the `Scene` each image should show, or its prompt text.
        keep_items: include each image's verdict (without the detections) under "items".
    Returns:
        dict with n, all_ok (count), accuracy (fraction with every prompt attribute satisfied),
        categories {colour, shape, position, binding, relation, count: {n, ok, accuracy}} where n
        counts only prompts the category applies to (position: one-object prompts; binding,
        relation: two-object prompts; count: the image shows exactly as many objects as asked),
        and by_kind {single, pair: {n, ok, accuracy}} of all_ok; NaN accuracy where n is 0.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    cats = {c: [0, 0] for c in CATEGORIES}
    kinds = {"single": [0, 0], "pair": [0, 0]}
    items = []
    for image, scene in zip(images, scenes):
        scene = parse_prompt(scene) if isinstance(scene, str) else scene
        v = judge_scene(image, scene)
        for c in CATEGORIES:
            value = v["count_ok"] if c == "count" else v[c]
            if value is not None:  # None: the category does not apply to this prompt
                cats[c][0] += 1
                cats[c][1] += bool(value)
        kind = "single" if len(scene.objects) == 1 else "pair"
        kinds[kind][0] += 1
        kinds[kind][1] += v["all_ok"]
        if keep_items:
            items.append({k: val for k, val in v.items() if k != "objects"} | {"prompt": scene.prompt})
    n, ok = len(images), sum(k[1] for k in kinds.values())
    report = {
        "n": n, "all_ok": ok, "accuracy": ok / n if n else float("nan"),
        "categories": {c: _tally(*cats[c]) for c in CATEGORIES},
        "by_kind": {k: _tally(*v) for k, v in kinds.items()},
    }
    if keep_items:
        report["items"] = items
    return report


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) clip to 0."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors.

    d = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2). The trace term uses
    the symmetric form S_a^1/2 S_b S_a^1/2, whose square root comes from `eigh`, which is stable
    for the singular covariances that few samples in many dimensions give (no complex parts
    to discard, unlike sqrtm of the non-symmetric product S_a S_b).

    Args:
        feats_a: (N, D) array (or array-like; torch tensors are converted).
        feats_b: (M, D) array; N, M >= 2.
    Returns:
        The distance (float, >= 0).
    """
    a, b = (np.asarray(f.detach().cpu().numpy() if hasattr(f, "detach") else f, np.float64)
            for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two samples per set to estimate a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(s_a)
    mid = root_a @ s_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((mid + mid.T) / 2), 0, None)).sum()
    d = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean
    return float(max(d, 0.0))


def feature_matrix(images: Sequence) -> np.ndarray:
    """Stack `judge.features` of each image into an (N, D) array.

    Args:
        images: RGB images (PIL or arrays).
    """
    return np.stack([features(im) for im in images])


def quality_proxy(images: Sequence, reference_images: Sequence) -> float:
    """Fréchet distance between judge features of generated and reference images (lower = closer).

    Args:
        images: generated images.
        reference_images: real renders of the world (e.g. a `WorldDataset` sample).
    """
    return frechet_distance(feature_matrix(images), feature_matrix(reference_images))


__all__ = ["CATEGORIES", "alignment_report", "feature_matrix", "frechet_distance", "quality_proxy"]
