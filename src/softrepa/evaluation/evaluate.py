"""`softrepa evaluate`: score a folder of generated / edited images and write a report.

Inputs (`inputs.py`): a folder of images with the generator's metadata.jsonl or a prompt file;
constant metadata fields are copied to results.json under "run", which `softrepa compare` uses
to detect CFG sweeps.

Metrics (`metric_names()`), each run independently and dispatched on its `MetricSpec.kind`
(`spec.py`): a metric whose weights or inputs are missing is recorded under "errors" with its
message and the others still run.

* `PER_PROMPT` (imagereward, pickscore, clip, hps): per-image scores against the prompt (scales
  as in the paper's Table 4: CLIP is the raw cosine ~0.26, PickScore exp(logit_scale) * cos ~21-23).
* `PER_SET` (fid): Fréchet distance of pytorch-fid Inception pool3 features between all images and
  `--reference` (a folder of real images, e.g. COCO val2017 resized, or a pytorch-fid .npz of
  mu / sigma).
* `PER_PAIR` (lpips): per image, against its pair (`inputs.image_pairs`: the edit's source, the
  metadata reference_image, the COCO image of its prompt with `--reference-captions`, else the
  same-named `--reference` image); the pairing used is recorded.
* `REPORT` (world, registered by the miniature's package through the `softrepa.metrics` entry
  point): the analytic judge's accuracy overall, per category and per prompt kind and, with
  `--reference`, the Fréchet quality proxy (reported as its own row, `world_quality_proxy`).

Outputs in `--out` (`report.py`): results.json, results.csv, results.md (per metric mean, std,
95% CI, count) and per_image.csv.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .common import MetricError, batched, load_rgb, torch_dtype
from ..errors import UsageError
from .config import load_metric, load_metrics_config
from .inputs import EvalItem, image_pairs, list_images, read_items, run_info
from .report import summarize, write_results
from .spec import MetricKind, MetricSpec, get_metric, metric_names

log = logging.getLogger(__name__)
#: The paper's six (Table 4), the default of `softrepa evaluate`.
PAPER_METRICS = ("imagereward", "pickscore", "clip", "hps", "fid", "lpips")


def _load_batch(paths: Sequence[Path]):
    return [load_rgb(p) for p in paths]


def _features(scorer, paths, batch_size, desc) -> np.ndarray:
    return np.concatenate([scorer.features(_load_batch(chunk)) for chunk in batched(paths, batch_size, desc=desc)])


def _info(scorer) -> dict:
    info = getattr(scorer, "info", None)
    return info() if info is not None else {}


def _per_prompt(spec, scorer, items, reference, batch_size, progress) -> tuple[np.ndarray, dict]:
    if any(not it.prompt for it in items):
        raise MetricError(f"{spec.name} needs a prompt for every image (metadata.jsonl 'prompt' or --prompts)")
    out = []
    for chunk in batched(items, batch_size, desc=spec.name if progress else None):
        out.append(scorer.score(_load_batch([it.path for it in chunk]), [it.prompt for it in chunk]))
    return np.concatenate(out), _info(scorer)


def _per_pair(spec, scorer, items, reference, batch_size, progress) -> tuple[np.ndarray, dict]:
    pairs, how = image_pairs(items, reference, spec.name)
    idx = list(range(len(items)))
    vals = [scorer.distance(_load_batch([items[i].path for i in c]), _load_batch([pairs[i] for i in c]))
            for c in batched(idx, batch_size, desc=spec.name if progress else None)]
    return np.concatenate(vals), {"pairs": how, **_info(scorer)}


def _per_set(spec, scorer, items, reference, batch_size, progress) -> tuple[None, dict]:
    """One value for the whole set against `reference` (a folder, or a statistics file the scorer reads)."""
    if reference is None:
        raise MetricError(f"{spec.name} needs --reference ({scorer.reference_help})")
    gen = _features(scorer, [it.path for it in items], batch_size, f"{spec.name} (generated)" if progress else None)
    if reference.is_file() and reference.suffix in scorer.statistics_suffixes:
        ref, n_ref = reference, None
    else:
        ref_paths = list_images(reference)
        ref = _features(scorer, ref_paths, batch_size, f"{spec.name} (reference)" if progress else None)
        n_ref = len(ref_paths)
    value, stat = scorer.statistic(gen, ref)
    return None, {"value": value, "mean": value, "std": None, "ci95": None, "count": len(items),
                  "n_reference": n_ref, **_info(scorer), "reference": str(reference), **stat}


def _report(spec, scorer, items, reference, batch_size, progress) -> tuple[np.ndarray, dict]:
    if any(not it.prompt for it in items):
        raise MetricError(f"{spec.name} needs a prompt for every image")
    images = _load_batch([it.path for it in items])
    refs = _load_batch(list_images(reference)) if reference is not None and reference.is_dir() else None
    vals, extra = scorer.report(images, [it.prompt for it in items], refs)
    return np.asarray(vals, np.float64), extra


_RUNNERS = {MetricKind.PER_PROMPT: _per_prompt, MetricKind.PER_PAIR: _per_pair, MetricKind.PER_SET: _per_set,
            MetricKind.REPORT: _report}


def _run(spec: MetricSpec, scorer, items, reference, batch_size, progress) -> tuple[np.ndarray | None, dict]:
    """Per-image values (None for a set statistic) and the metric's results entry."""
    vals, extra = _RUNNERS[spec.kind](spec, scorer, items, reference, batch_size, progress)
    if vals is None:
        return None, {**extra, "note": spec.note}
    return vals, {**summarize(vals, binary=spec.binary), **extra, "note": spec.note}


def evaluate(images: str | Path, out: str | Path, *, metrics: Sequence[str] = PAPER_METRICS,
             reference: str | Path | None = None, prompts: str | Path | None = None,
             reference_captions: str | Path | None = None, config: dict | str | Path | None = None,
             batch_size: int = 16, device: str | None = None, dtype: str | None = None,
             progress: bool = True, overwrite: bool = False) -> dict:
    """Score a folder of images and write results.{json,csv,md} and per_image.csv into `out`.

    Args:
        images: folder of images (+ metadata.jsonl).
        out: output folder (created).
        metrics: names from `metric_names()`.
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
        overwrite: replace results of another image folder already in `out` (refused without it).
    Returns:
        The results dict written to results.json: images, reference, n_images, prompts, run,
        settings, metrics (name -> mean / std / ci95 / count / note, or error), errors, config.

    Example:
        >>> from softrepa.evaluation import evaluate
        >>> res = evaluate("runs/gen_tokens", "runs/eval_tokens", metrics=["clip", "fid", "lpips"],
        ...                reference="coco/val2017", config="metrics.yaml", device="cuda")
        >>> sorted(res["metrics"]["clip"])
        ['ci95', 'ci95_method', 'count', 'mean', 'note', 'preprocess', 'std', 'text_cleaning']
        >>> res["errors"]  # a metric that failed is named here; the others are still scored
        {}
    """
    import torch

    known = metric_names()
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise UsageError(f"unknown metrics {unknown}; known: {list(known)}")
    check_results_folder(out, images, overwrite)  # before any metric model loads
    cfg = load_metrics_config(config) if isinstance(config, (str, Path)) else load_metrics_config(overrides=config)
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
        "metrics": {}, "errors": {}, "config": {m: cfg[m].as_dict() for m in metrics}}
    per_image: dict[str, np.ndarray] = {}
    for name in metrics:
        log.info("evaluate: %s on %d images", name, len(items))
        spec = get_metric(name)
        scorer = None
        try:
            scorer = load_metric(name, cfg, device=device, dtype=torch_dtype(dtype))
            vals, results["metrics"][name] = _run(spec, scorer, items, ref, batch_size, progress)
            if vals is not None:
                per_image[name] = vals
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


def check_results_folder(out: str | Path, images: str | Path, overwrite: bool = False) -> None:
    """`out` may receive the results of `images`: refuse to replace another folder's results (or a
    results.json softrepa did not write) unless `overwrite`; the same folder's results are redone.

    Raises:
        RunFolderError: naming both image folders and `--overwrite`.
    """
    from ..checks import check_out_folder
    from ..errors import RunFolderError

    check_out_folder(out)
    old = Path(out) / "results.json"
    if overwrite:
        return
    if not old.exists():  # results.json is written first: the others without it are not softrepa's
        theirs = [n for n in ("results.csv", "results.md", "per_image.csv") if (Path(out) / n).exists()]
        if theirs:
            raise RunFolderError(f"{out} holds {', '.join(theirs)} without a results.json, not softrepa's results; "
                                 "choose another --out (or --overwrite to replace them)")
        return
    try:
        previous = json.loads(old.read_bytes()).get("images")
    except (OSError, ValueError, RecursionError, AttributeError):
        previous = None
    if previous is None:
        raise RunFolderError(f"{old} exists and is not softrepa's results file; choose another --out "
                             "(or --overwrite to replace it)")
    if Path(previous).expanduser().resolve() != Path(images).expanduser().resolve():
        raise RunFolderError(f"{out} holds the results of {previous}, not of {images}; choose another --out or "
                             "pass --overwrite to replace them")


__all__ = ["EvalItem", "PAPER_METRICS", "check_results_folder", "evaluate"]
