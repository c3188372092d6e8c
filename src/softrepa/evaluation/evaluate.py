"""`softrepa evaluate`: score a folder of generated / edited images and write a report.

Inputs. A folder of images with the generator's `metadata.jsonl` (one row per image with at least
"file" and "prompt"; edits add "source_image", or, as `softrepa edit` writes them, "image" (the
source) and "target_prompt" (scored against); an optional "reference_image" names a per-image
reference), or a prompt file (`--prompts`: .txt one prompt per line in sorted file order, or
.jsonl / .json / .csv with file + prompt). Constant metadata fields (guidance scale, steps, tokens,
...) are copied to results.json under "run", which `softrepa compare` uses to detect CFG sweeps.

Metrics (`softrepa.metrics`), each run independently: a metric whose weights or inputs are missing
is recorded under "errors" with its message and the others still run.

* imagereward, pickscore, clip, hps: per-image scores against the prompt (scales as in the
  paper's Table 4: CLIP is the raw cosine ~0.26, PickScore exp(logit_scale) * cos ~21-23).
* fid: Fréchet distance of pytorch-fid Inception pool3 features between all images and `--reference`
  (a folder of real images, e.g. COCO val2017 resized, or a pytorch-fid .npz of mu / sigma).
* lpips: per image, against its pair: the metadata "source_image" (edits: edit vs source); else
  "reference_image"; else, with `--reference-captions captions_val2017.json`, the COCO image whose
  caption was the prompt (metadata "prompt_index", as `softrepa generate` numbers COCO prompts);
  else the `--reference` image with the same file stem. Generation: the SoftREPA authors compare
  each COCO-prompt sample with the COCO image it was captioned from. Every image needs a pair; the
  pairing used is recorded.
* world: the miniature's analytic judge (`softrepa.toy.metrics.alignment_report`: accuracy overall,
  per category and per prompt kind) and, with `--reference`, the Fréchet quality proxy (reported
  as its own row, `world_quality_proxy`).

Outputs in `--out`: results.json, results.csv, results.md (per metric mean, std, 95% CI, count)
and per_image.csv. 95% CIs, over images:

* continuous scores (imagereward, pickscore, clip, hps, lpips): the Student t interval
  mean +- t(0.975, n-1) * std / sqrt(n). It assumes the mean is roughly normal, which holds for
  the hundreds to thousands of images an evaluation uses; with a handful of images it is wide
  and, for bounded scores, may reach past the score's range.
* per-image 0/1 outcomes (world: every prompt attribute satisfied or not): the Wilson score
  interval, which stays inside [0, 1] and keeps its coverage for small n and accuracies near 0
  or 1, where the t interval (n=2, one hit: [-5.85, 6.85]) is meaningless.
* set statistics (fid, world_quality_proxy): one value over all images, no CI.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .metrics import METRIC_NAMES, PAPER_METRICS, MetricError, load_config, load_metric
from .stats import wilson_interval
from .metrics.common import batched, load_rgb, torch_dtype

log = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Metadata keys that hold the (target) guidance scale, in the order they are looked up.
CFG_KEYS = ("tar_cfg", "target_guidance_scale", "tar_cfg_scale", "target_cfg", "guidance_scale", "cfg_scale", "cfg")
_PROMPT_METRICS = ("imagereward", "pickscore", "clip", "hps")
# t(0.975, df) for df = 1..30; beyond, a Cornish-Fisher expansion (error < 1e-3).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
NOTES = {
    "imagereward": "ImageReward-v1.0 standardised reward (higher = preferred)",
    "pickscore": "PickScore_v1: exp(logit_scale) * cosine (higher = preferred)",
    "clip": "CLIP score = w * cosine of L2-normalised embeddings (paper: ViT-L/14, w=1, no clamp, no x100)",
    "hps": "HPS (default v2.1, as the authors): cosine of the HPS-tuned open_clip ViT-H-14 embeddings",
    "fid": "FID vs the reference set (lower = closer)",
    "lpips": "LPIPS v0.1 vs the paired image (lower = more similar)",
    "world": "miniature alignment: fraction of images satisfying every prompt attribute (Wilson 95% CI)",
    "world_quality_proxy": "miniature Fréchet distance of judge features vs the --reference renders "
                           "(lower = closer; a set statistic, no CI)",
}
#: Metrics whose per-image values are 0/1 outcomes: their CI is the Wilson score interval.
BINARY_METRICS = ("world",)


@dataclass
class EvalItem:
    """One image to score and what it is compared with."""

    file: str
    path: Path
    prompt: str | None = None
    source: Path | None = None
    reference: Path | None = None
    meta: dict = field(default_factory=dict)


def _resolve(base: Path, p: str | None) -> Path | None:
    if not p:
        return None
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else [{"file": k, "prompt": v} for k, v in data.items()]
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: prompts must be .txt, .jsonl, .json or .csv")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def coco_image_order(captions: str | Path) -> list[str]:
    """COCO image file names in the order `softrepa generate --prompts captions.json` numbers them.

    The generator takes one prompt per image (its first non-empty caption), images in the file's
    "images" order, skipping images without a caption; prompt i therefore belongs to entry i here.

    Args:
        captions: a COCO captions JSON (e.g. captions_val2017.json).
    """
    data = json.loads(Path(captions).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{captions}: expected a COCO captions file with 'images' and 'annotations'")
    has = {a.get("image_id") for a in data["annotations"] if isinstance(a.get("caption"), str) and a["caption"].strip()}
    return [im["file_name"] for im in data["images"] if im.get("id") in has]


def read_items(images: str | Path, prompts: str | Path | None = None,
               reference_captions: str | Path | None = None, reference: str | Path | None = None) -> list[EvalItem]:
    """The images of a folder with their prompts and pairs (see the module docstring).

    Args:
        images: folder of images (with or without metadata.jsonl).
        prompts: optional prompt file; overrides metadata prompts.
        reference_captions: COCO captions JSON the prompts were read from; with `reference`, pairs
            each image (metadata "prompt_index") with its COCO image (by file stem) for LPIPS.
        reference: the reference image folder (needed with `reference_captions`).
    """
    folder = Path(images)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    meta_path = folder / "metadata.jsonl"
    if meta_path.is_file():
        rows = _read_table(meta_path)
        if any("file" not in r for r in rows):
            raise ValueError(f"{meta_path}: every row needs a 'file'")
    else:
        rows = [{"file": p.name} for p in list_images(folder)]
    if prompts is not None:
        pf = Path(prompts)
        if not pf.is_file():
            raise FileNotFoundError(f"prompt file not found: {pf}")
        if pf.suffix == ".txt":
            lines = [s for s in pf.read_text().splitlines() if s.strip()]
            if len(lines) != len(rows):
                raise ValueError(f"{pf} has {len(lines)} prompts for {len(rows)} images")
            for r, text in zip(rows, lines):
                r["prompt"] = text
        else:
            by_file = {str(r["file"]): r["prompt"] for r in _read_table(pf)}
            missing = [r["file"] for r in rows if str(r["file"]) not in by_file]
            if missing:
                raise ValueError(f"{pf} has no prompt for {len(missing)} images, e.g. {missing[:3]}")
            for r in rows:
                r["prompt"] = by_file[str(r["file"])]
    # `softrepa generate` rows: file, prompt, cfg, tokens, ...; `softrepa edit` rows: file, image (the
    # source, absolute), source_prompt, target_prompt, tar_cfg, ... -> edits are scored against the target.
    items = [EvalItem(file=str(r["file"]), path=folder / str(r["file"]),
                      prompt=r.get("prompt") or r.get("target_prompt"),
                      source=_resolve(folder, r.get("source_image") or r.get("image")),
                      reference=_resolve(folder, r.get("reference_image")), meta=r) for r in rows]
    missing = [it.file for it in items if not it.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed images do not exist in {folder}, e.g. {missing[:3]}")
    if reference_captions is not None:
        if reference is None or not Path(reference).is_dir():
            raise ValueError("--reference-captions needs --reference, the folder of the COCO images")
        order = coco_image_order(reference_captions)
        by_stem = {p.stem: p for p in list_images(Path(reference))}
        for it in items:
            i = it.meta.get("prompt_index")
            if not isinstance(i, int) or not 0 <= i < len(order):
                raise ValueError(f"{it.file}: metadata prompt_index {i!r} does not index {reference_captions}")
            if it.reference is None and it.source is None:
                it.reference = by_stem.get(Path(order[i]).stem, Path(reference) / order[i])
    if not items:
        raise ValueError(f"no images in {folder}")
    return items


def run_info(items: Sequence[EvalItem]) -> dict:
    """Scalar metadata fields with one value across all rows (the run's settings), plus `cfg`."""
    skip = {"file", "prompt", "prompt_index", "image", "source_image", "reference_image", "seed", "index",
            "source_prompt", "target_prompt", "width", "height"}
    first = items[0].meta
    info = {k: v for k, v in first.items() if k not in skip and isinstance(v, (str, int, float, bool, type(None)))
            and all(it.meta.get(k) == v for it in items)}
    cfg = next((info[k] for k in CFG_KEYS if isinstance(info.get(k), (int, float))), None)
    if cfg is not None:
        info["cfg"] = float(cfg)
    return info


def summarize(values: Sequence[float], binary: bool = False) -> dict:
    """mean, std (ddof=1), 95% CI and count of per-image values.

    Args:
        values: one value per image.
        binary: the values are 0/1 outcomes (world): the CI is the Wilson score interval (defined
            from n = 1). Otherwise it is the Student t interval mean +- t(0.975, n-1) * std / sqrt(n)
            (n >= 2), see the module docstring.
    Returns:
        {"mean", "std", "ci95": [low, high] or None, "ci95_method": "wilson" / "t" / None, "count"}.
    """
    v = np.asarray(values, np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "ci95_method": None, "count": 0}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else None
    if binary:
        if not np.isin(v, (0.0, 1.0)).all():
            raise ValueError("binary=True needs 0/1 values")
        return {"mean": mean, "std": std, "ci95": wilson_interval(float(v.sum()), n), "ci95_method": "wilson",
                "count": n}
    if n == 1:
        return {"mean": mean, "std": None, "ci95": None, "ci95_method": None, "count": 1}
    df = n - 1
    z = 1.959964
    t = _T975[df - 1] if df <= 30 else z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
    half = t * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "ci95_method": "t", "count": n}


def _load_batch(paths: Sequence[Path]):
    return [load_rgb(p) for p in paths]


def _prompt_metric(name: str, scorer, items, batch_size: int, progress: bool) -> np.ndarray:
    if any(not it.prompt for it in items):
        raise MetricError(f"{name} needs a prompt for every image (metadata.jsonl 'prompt' or --prompts)")
    out = []
    for chunk in batched(items, batch_size, desc=name if progress else None):
        out.append(scorer.score(_load_batch([it.path for it in chunk]), [it.prompt for it in chunk]))
    return np.concatenate(out)


def _features(extractor, paths, batch_size, desc):
    return np.concatenate([extractor.features(_load_batch(chunk)) for chunk in batched(paths, batch_size, desc=desc)])


def _fid(scorer, items, reference: Path | None, batch_size: int, progress: bool) -> dict:
    """FID of the items against `reference`; records which computation ran ("fid_path").

    A reference folder: `fid_with_path` on both feature sets (the exact low-rank path when both
    sets have fewer images than feature dimensions, else the D x D eigen path). A statistics .npz
    (mu, sigma) only allows the eigen path.
    """
    from .metrics.inception import FID_PATHS, feature_stats, fid_path, fid_with_path, frechet_from_stats, load_stats

    if reference is None:
        raise MetricError("fid needs --reference (a folder of real images or a pytorch-fid .npz of mu/sigma)")
    gen = _features(scorer, [it.path for it in items], batch_size, "fid (generated)" if progress else None)
    if reference.is_file() and reference.suffix == ".npz":
        n_ref, path = None, fid_path(len(gen), None, gen.shape[1])
        value = frechet_from_stats(*feature_stats(gen), *load_stats(reference))
    else:
        ref_paths = list_images(reference)
        ref = _features(scorer, ref_paths, batch_size, "fid (reference)" if progress else None)
        n_ref = len(ref_paths)
        value, path = fid_with_path(gen, ref)
    return {"value": value, "mean": value, "std": None, "ci95": None, "count": len(items), "n_reference": n_ref,
            "features": scorer.label, "reference": str(reference), "fid_path": path,
            "fid_path_note": FID_PATHS[path]}


def lpips_pairs(items: Sequence[EvalItem], reference: Path | None) -> tuple[list[Path], str]:
    """The image each item is compared with by LPIPS, and a description of the pairing."""
    by_stem = {p.stem: p for p in list_images(reference)} if reference is not None and reference.is_dir() else {}
    pairs, kinds, missing = [], set(), []
    for it in items:
        if it.source is not None:
            pairs.append(it.source)
            kinds.add("edit vs its source_image")
        elif it.reference is not None:
            pairs.append(it.reference)
            kinds.add("image vs its reference_image (metadata, or the COCO image of its prompt)")
        elif Path(it.file).stem in by_stem:
            pairs.append(by_stem[Path(it.file).stem])
            kinds.add("generated vs the --reference image with the same file name")
        else:
            missing.append(it.file)
    if missing:
        raise MetricError(f"lpips: {len(missing)} images have no pair (no metadata source_image / reference_image "
                          f"and no same-named image in --reference), e.g. {missing[:3]}")
    absent = [str(p) for p in pairs if not p.is_file()]
    if absent:
        raise MetricError(f"lpips: {len(absent)} paired images do not exist, e.g. {absent[:3]}")
    return pairs, "; ".join(sorted(kinds))


def _lpips(scorer, items, reference, batch_size, progress) -> tuple[np.ndarray, dict]:
    pairs, how = lpips_pairs(items, reference)
    idx = list(range(len(items)))
    vals = [scorer.distance(_load_batch([items[i].path for i in c]), _load_batch([pairs[i] for i in c]))
            for c in batched(idx, batch_size, desc="lpips" if progress else None)]
    return np.concatenate(vals), {"pairs": how, "net": scorer.model.net, "resize": scorer.resize,
                                  "input_range": scorer.input_range}


def _world(items, reference: Path | None) -> tuple[np.ndarray, dict]:
    from .toy.metrics import alignment_report, quality_proxy

    if any(not it.prompt for it in items):
        raise MetricError("world needs a prompt for every image")
    images = _load_batch([it.path for it in items])
    try:
        rep = alignment_report(images, [it.prompt for it in items], keep_items=True)
    except ValueError as e:  # a prompt outside the miniature's grammar
        raise MetricError(f"world: {e}") from e
    extra = {"accuracy": rep["accuracy"], "categories": rep["categories"], "by_kind": rep["by_kind"]}
    if reference is not None and reference.is_dir():
        extra["quality_proxy"] = quality_proxy(images, _load_batch(list_images(reference)))
    return np.array([float(v["all_ok"]) for v in rep["items"]]), extra


def evaluate(images: str | Path, out: str | Path, *, metrics: Sequence[str] = PAPER_METRICS,
             reference: str | Path | None = None, prompts: str | Path | None = None,
             reference_captions: str | Path | None = None, config: dict | str | Path | None = None,
             batch_size: int = 16, device: str | None = None, dtype: str | None = None,
             progress: bool = True) -> dict:
    """Score a folder of images and write results.{json,csv,md} and per_image.csv into `out`.

    Args:
        images: folder of images (+ metadata.jsonl).
        out: output folder (created).
        metrics: names from `METRIC_NAMES`.
        reference: real-image folder (FID, LPIPS pairs by file name, world quality proxy) or an .npz of
            FID statistics.
        prompts: prompt file overriding metadata prompts.
        reference_captions: COCO captions JSON of the prompts: LPIPS pairs each image with the COCO
            image its prompt was captioned from (the SoftREPA authors' pairing).
        config: metrics config dict (overrides on the defaults) or a metrics.yaml path.
        batch_size: images per model call.
        device: "cpu", "cuda", ... (default: config "device", else cuda when available).
        dtype: model dtype (default: config "dtype", else float32).
        progress: show tqdm bars.
    Returns:
        The results dict written to results.json.
    """
    import torch

    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {list(METRIC_NAMES)}")
    cfg = load_config(config) if isinstance(config, (str, Path)) else load_config(overrides=config)
    device = device or cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or cfg.get("dtype") or "float32"
    ref = Path(reference) if reference is not None else None
    if ref is not None and not ref.exists():
        raise FileNotFoundError(f"reference not found: {ref}")
    items = read_items(images, prompts, reference_captions, reference)
    results: dict[str, Any] = {
        "images": str(images), "reference": str(ref) if ref else None, "n_images": len(items),
        "prompts": str(prompts) if prompts else
        ("metadata.jsonl" if (Path(images) / "metadata.jsonl").is_file() else None),
        "run": run_info(items), "settings": {"device": str(device), "dtype": dtype, "batch_size": batch_size},
        "metrics": {}, "errors": {}, "config": {m: cfg.get(m) for m in metrics}}
    per_image: dict[str, np.ndarray] = {}
    for name in metrics:
        log.info("evaluate: %s on %d images", name, len(items))
        scorer = None
        try:
            if name == "world":
                vals, extra = _world(items, ref)
            else:
                scorer = load_metric(name, cfg, device=device, dtype=torch_dtype(dtype))
                if name == "fid":
                    results["metrics"][name] = {**_fid(scorer, items, ref, batch_size, progress), "note": NOTES[name]}
                    continue
                if name == "lpips":
                    vals, extra = _lpips(scorer, items, ref, batch_size, progress)
                else:
                    vals = _prompt_metric(name, scorer, items, batch_size, progress)
                    extra = {k: getattr(scorer, k) for k in ("preprocess", "text_cleaning", "checkpoint")
                             if getattr(scorer, k, None)}
            per_image[name] = vals
            results["metrics"][name] = {**summarize(vals, binary=name in BINARY_METRICS), **extra,
                                        "note": NOTES[name]}
        except Exception as e:  # noqa: BLE001 - one metric's failure must not stop the others
            msg = f"{type(e).__name__}: {e}"
            log.error("evaluate: %s failed: %s", name, msg)
            results["errors"][name] = msg
            results["metrics"][name] = {"error": msg}
        finally:
            del scorer  # one model in memory at a time
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    write_results(results, items, per_image, out)
    return results


def _fmt(x, nd=4) -> str:
    return "" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _jsonable(x):
    """Plain JSON: numpy scalars to Python numbers, NaN / inf to null (strict JSON readers reject NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def summary_rows(results: dict) -> list[tuple[str, dict]]:
    """The rows of every summary (console, results.csv / .md, compare): each metric, in order, plus
    the set statistics that ride on another metric as rows of their own.

    The world metric's Fréchet quality proxy (with `--reference`) lives in results.json under
    metrics.world.quality_proxy; as a row `world_quality_proxy` (value, count, no CI, like FID) it
    is seen next to the accuracy instead of only in the JSON.

    Args:
        results: the results dict (see `evaluate`) or a loaded results.json.
    Returns:
        (name, metric dict with mean / std / ci95 / count / note, or error) pairs.
    """
    rows = []
    for name, m in results["metrics"].items():
        rows.append((name, m))
        if name == "world" and m.get("quality_proxy") is not None:
            q = m["quality_proxy"]
            rows.append(("world_quality_proxy", {"value": q, "mean": q, "std": None, "ci95": None,
                                                 "count": m.get("count"), "note": NOTES["world_quality_proxy"]}))
    return rows


def write_results(results: dict, items: Sequence[EvalItem], per_image: dict[str, np.ndarray], out: str | Path) -> None:
    """Write results.json, results.csv, results.md and per_image.csv.

    Args:
        results: the results dict (see `evaluate`).
        items: the scored images, in order.
        per_image: metric -> per-image values aligned with `items`.
        out: output folder (created).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    summary = summary_rows(results)
    rows = []
    for name, m in summary:
        ci = m.get("ci95") or [None, None]
        rows.append({"metric": name, "mean": m.get("mean"), "std": m.get("std"), "ci95_low": ci[0], "ci95_high": ci[1],
                     "count": m.get("count"), "error": m.get("error", "")})
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["metric", "mean", "std", "ci95_low", "ci95_high", "count", "error"])
        w.writeheader()
        w.writerows(rows)
    md = [f"# Evaluation of `{results['images']}`", "", f"{results['n_images']} images"
          + (f", reference `{results['reference']}`" if results["reference"] else "")
          + (f", run settings: {results['run']}" if results["run"] else ""), "",
          "| metric | mean | std | 95% CI | count | notes |", "|---|---|---|---|---|---|"]
    for r, (name, m) in zip(rows, summary):
        if r["error"]:
            md.append(f"| {name} | ERROR | | | | {r['error'][:300].replace('|', '/')} |")
            continue
        ci = f"[{_fmt(r['ci95_low'])}, {_fmt(r['ci95_high'])}]" if r["ci95_low"] is not None else ""
        note = m.get("note", "") + (f"; pairs: {m['pairs']}" if "pairs" in m else "") + (
            f"; features: {m['features']}" if "features" in m else "")
        md.append(f"| {name} | {_fmt(r['mean'])} | {_fmt(r['std'])} | {ci} | {r['count']} | {note} |")
    if "world" in results["metrics"] and "categories" in results["metrics"]["world"]:
        md += ["", "## World alignment by category", "", "| category | n | accuracy |", "|---|---|---|"]
        for c, t in results["metrics"]["world"]["categories"].items():
            md.append(f"| {c} | {t['n']} | {_fmt(t['accuracy'])} |")
    (out / "results.md").write_text("\n".join(md) + "\n")
    names = list(per_image)
    with (out / "per_image.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "prompt", *names])
        for i, it in enumerate(items):
            w.writerow([it.file, it.prompt or "", *(repr(float(per_image[n][i])) for n in names)])


__all__ = ["BINARY_METRICS", "CFG_KEYS", "EvalItem", "coco_image_order", "evaluate", "lpips_pairs", "read_items",
           "run_info", "summarize", "summary_rows", "wilson_interval", "write_results"]
