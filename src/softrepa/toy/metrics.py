"""World metrics: exact alignment accuracy from the analytic judge, and a Fréchet quality proxy.

`alignment_report` judges each generated image against the scene / prompt it was generated
from and tallies every attribute category. `frechet_distance` is the usual Fréchet distance
between Gaussians fitted to two feature sets (as in FID), computed with symmetric
eigendecompositions only (no scipy); `quality_proxy` applies it to `judge.features`, which
react to blur, noise, colour casts and broken shapes.

`WORLD` is the `world` metric of `softrepa evaluate` (kind `REPORT`: per-image 0/1 outcomes,
accuracies per category and prompt kind, and with `--reference` the quality proxy as the row
`world_quality_proxy`). The evaluation core never imports this package: the registry reaches
`WORLD` through the `softrepa.metrics` entry point in pyproject.toml; importing this module
registers it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UsageError
from ..evaluation.common import MetricError
from ..evaluation.spec import MetricConfig, MetricKind, MetricSpec, SummaryRow, register_metric
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


# ------------------------------------------------------------------------- the `world` metric

@dataclass(frozen=True)
class WorldConfig(MetricConfig):
    """metrics.yaml `world`: the analytic judge has no settings (the section is `world: {}`)."""


class WorldJudge:
    """The `world` metric's scorer: the miniature's analytic judge (no weights)."""

    name = "world"

    def report(self, images: Sequence, prompts: Sequence[str],
               reference_images: Sequence | None = None) -> tuple[np.ndarray, dict]:
        """Per-image 0/1 outcomes (every prompt attribute satisfied) and the run's report.

        Args:
            images: RGB images, one per prompt.
            prompts: their prompts (the miniature's grammar).
            reference_images: real renders for the quality proxy, or None.
        Returns:
            (values, {"accuracy", "categories", "by_kind"[, "quality_proxy"]}).
        Raises:
            MetricError: a prompt outside the miniature's grammar.
        """
        try:
            rep = alignment_report(images, list(prompts), keep_items=True)
        except UsageError as e:  # a prompt outside the miniature's grammar
            raise MetricError(f"world: {e}") from e
        extra = {"accuracy": rep["accuracy"], "categories": rep["categories"], "by_kind": rep["by_kind"]}
        if reference_images is not None:
            extra["quality_proxy"] = quality_proxy(images, reference_images)
        return np.array([float(v["all_ok"]) for v in rep["items"]]), extra


def load_world(cfg: WorldConfig | dict | None = None, *, device="cpu", dtype=None, offline=True) -> WorldJudge:
    """The `world` scorer (`cfg`, device, dtype and offline are unused: no model, no weights)."""
    WorldConfig.coerce(cfg, metric="world")
    return WorldJudge()


def _fmt(x) -> str:
    return "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def category_table(result: dict) -> list[str]:
    """results.md lines after the table: the world metric's accuracy per category ([] on an error)."""
    if "categories" not in result:
        return []
    return ["", "## World alignment by category", "", "| category | n | accuracy |", "|---|---|---|",
            *(f"| {c} | {t['n']} | {_fmt(t['accuracy'])} |" for c, t in result["categories"].items())]


WORLD = MetricSpec(
    name="world", kind=MetricKind.REPORT, loader=load_world, config=WorldConfig, binary=True, higher_is_better=True,
    note="miniature alignment: fraction of images satisfying every prompt attribute (Wilson 95% CI)",
    rows=(SummaryRow(name="world_quality_proxy", key="quality_proxy", higher_is_better=False,
                     note="miniature Fréchet distance of judge features vs the --reference renders "
                          "(lower = closer; a set statistic, no CI)"),),
    markdown=category_table)
register_metric(WORLD)  # also reached without importing softrepa.toy: entry point softrepa.metrics:world


__all__ = ["CATEGORIES", "WORLD", "WorldConfig", "WorldJudge", "alignment_report", "category_table",
           "feature_matrix", "frechet_distance", "load_world", "quality_proxy"]
