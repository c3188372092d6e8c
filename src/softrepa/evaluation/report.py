"""The report of `softrepa evaluate`: summary statistics and the files written to `--out`.

Outputs: results.json, results.csv, results.md (per metric mean, std, 95% CI, count, note) and
per_image.csv. 95% CIs, over images:

* continuous scores (imagereward, pickscore, clip, hps, lpips): the Student t interval
  mean +- t(0.975, n-1) * std / sqrt(n). It assumes the mean is roughly normal, which holds for
  the hundreds to thousands of images an evaluation uses; with a handful of images it is wide
  and, for bounded scores, may reach past the score's range.
* per-image 0/1 outcomes (`MetricSpec.binary`; world: every prompt attribute satisfied or not):
  the Wilson score interval, which stays inside [0, 1] and keeps its coverage for small n and
  accuracies near 0 or 1, where the t interval (n=2, one hit: [-5.85, 6.85]) is meaningless.
* set statistics (fid, world_quality_proxy): one value over all images, no CI.

Set statistics stored inside another metric's results (`MetricSpec.rows`, e.g. the world
metric's `quality_proxy`) are rows of their own in every summary (`summary_rows`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UsageError
from ..stats import wilson_interval
from .inputs import EvalItem
from .spec import MetricSpec, get_metric

# t(0.975, df) for df = 1..30; beyond, a Cornish-Fisher expansion (error < 1e-3).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


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

    A metric's `MetricSpec.rows` name such statistics: e.g. the world metric's Fréchet quality
    proxy (with `--reference`) lives in results.json under metrics.world.quality_proxy; as a row
    `world_quality_proxy` (value, count, no CI, like FID) it is seen next to the accuracy instead
    of only in the JSON. Metrics that are not registered (a results.json of another install) are
    listed without such rows.

    Args:
        results: the results dict (see `evaluate`) or a loaded results.json.
    Returns:
        (name, metric dict with mean / std / ci95 / count / note, or error) pairs.
    """
    rows = []
    for name, m in results["metrics"].items():
        rows.append((name, m))
        spec = _spec(name)
        for row in spec.rows if spec is not None else ():
            if m.get(row.key) is not None:
                q = m[row.key]
                rows.append((row.name, {"value": q, "mean": q, "std": None, "ci95": None, "count": m.get("count"),
                                        "note": row.note}))
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
    for name, m in results["metrics"].items():  # sections of metrics that add their own (world: per category)
        spec = _spec(name)
        if spec is not None and spec.markdown is not None:
            md += spec.markdown(m)
    (out / "results.md").write_text("\n".join(md) + "\n")
    names = list(per_image)
    with (out / "per_image.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "prompt", *names])
        for i, it in enumerate(items):
            w.writerow([it.file, it.prompt or "", *(repr(float(per_image[n][i])) for n in names)])


def summary_lines(results: dict) -> list[str]:
    """The console summary of `softrepa evaluate`: one line per `summary_rows` row.

    Args:
        results: the results dict (see `evaluate`) or a loaded results.json.
    """
    rows = summary_rows(results)  # the metrics plus derived rows such as world_quality_proxy, as in results.md
    width = max([12] + [len(name) for name, _ in rows])
    lines = []
    for name, m in rows:
        if "error" in m:
            lines.append(f"{name:{width}s} ERROR  {m['error']}")
        else:
            ci = m.get("ci95")
            ci_text = f"  95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            mean = "n/a" if m.get("mean") is None else f"{m['mean']:.4f}"
            lines.append(f"{name:{width}s} {mean}{ci_text}  (n={m['count']})")
    return lines


def _spec(name: str) -> MetricSpec | None:
    """The registered spec of `name`, or None (results may name metrics this install does not have)."""
    try:
        return get_metric(name)
    except UsageError:
        return None


__all__ = ["summarize", "summary_lines", "summary_rows", "write_results"]
