"""`softrepa compare`: one table, a bar chart and CFG-sweep curves from several evaluated runs.

Each run is an `softrepa evaluate` output folder (or its results.json). The table lists every
metric's mean per run with the delta to the first run (the baseline); the bar chart shows means
with 95% CIs; when the runs span several guidance scales (their metadata's target CFG, recorded
by `evaluate` as run["cfg"], or an explicit `--sweep` list) the CLIP-vs-LPIPS curve of the paper's
Fig. 5 is drawn: one line per method (vanilla / SoftREPA), points labelled with their CFG. A sweep
whose runs lack one of the curve's metrics (`--curve-x` / `--curve-y`) gets no curve and a warning
naming them. Set statistics stored inside another metric (the world metric's quality proxy) are
compared as rows of their own (`report.summary_rows`); the arrows (higher or lower is better)
come from the metrics' specs (`spec.higher_is_better`).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Sequence

from ..errors import UsageError
from .report import summary_rows
from .spec import higher_is_better

log = logging.getLogger(__name__)


def load_run(path: str | Path) -> dict:
    """A run's results.json (from its folder or the file itself)."""
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no results.json for run {p}")
    return json.loads(f.read_text())


def _group(run: dict) -> str:
    info = run.get("run", {})
    for k in ("group", "method"):
        if info.get(k):
            return str(info[k])
    if "tokens" in info:
        return "softrepa" if info["tokens"] else "vanilla"
    return "runs"


def compare_runs(runs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
                 sweep: Sequence[float] | None = None, groups: Sequence[str] | None = None,
                 metrics: Sequence[str] | None = None, curve_x: str = "lpips", curve_y: str = "clip") -> dict:
    """Write compare.md, compare.csv, compare_bars.png and (for CFG sweeps) cfg_sweep.png.

    Args:
        runs: evaluated run folders (or results.json files); the first is the baseline.
        out: output folder (created).
        labels: display names (default: folder names).
        sweep: the CFG of each run, overriding the metadata's.
        groups: the method of each run for the sweep curves (default: metadata group / method /
            tokens, else one group).
        metrics: metrics to include (default: every metric any run has, in evaluation order).
        curve_x, curve_y: metrics of the sweep plot's axes (paper Fig. 5: LPIPS vs CLIP).
    Returns:
        {"table": rows, "files": [written paths], "sweep": bool}.

    Example:
        >>> from softrepa.evaluation import compare_runs
        >>> res = compare_runs(["runs/eval_vanilla_cfg9", "runs/eval_vanilla_cfg13", "runs/eval_tokens_cfg9",
        ...                     "runs/eval_tokens_cfg13"], "runs/compare", groups=["vanilla", "vanilla",
        ...                     "softrepa", "softrepa"])
        >>> [f.rsplit("/", 1)[1] for f in res["files"]], res["sweep"]
        (['compare.csv', 'compare.md', 'compare_bars.png', 'cfg_sweep.png'], True)
        >>> res["table"][2]["delta_clip"]  # the third run's CLIP mean minus the first run's  # doctest: +SKIP
        0.0021
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(runs) < 1:
        raise UsageError("compare needs at least one run")
    data = [load_run(r) for r in runs]
    # every run's metrics as the summaries list them (adds world_quality_proxy next to world)
    for d in data:
        d["metrics"] = dict(summary_rows(d))
    labels = list(labels) if labels else [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    for name, n in (("labels", labels), ("sweep", sweep), ("groups", groups)):
        if n is not None and len(n) != len(runs):
            raise UsageError(f"{len(n)} {name} for {len(runs)} runs")
    cfgs = list(sweep) if sweep is not None else [d.get("run", {}).get("cfg") for d in data]
    groups = list(groups) if groups else [_group(d) for d in data]
    if metrics is None:
        metrics = []
        for d in data:
            metrics += [m for m in d["metrics"] if m not in metrics]

    def mean(d, m):
        v = d["metrics"].get(m, {})
        return None if "error" in v else v.get("mean")

    rows = []
    for lab, d, cfg, grp in zip(labels, data, cfgs, groups):
        row = {"run": lab, "group": grp, "cfg": cfg, "n_images": d.get("n_images")}
        for m in metrics:
            row[m] = mean(d, m)
            base = mean(data[0], m)
            row[f"delta_{m}"] = None if row[m] is None or base is None else row[m] - base
            ci = d["metrics"].get(m, {}).get("ci95")
            row[f"ci95_{m}"] = ci
        rows.append(row)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []

    with (out / "compare.csv").open("w", newline="") as f:
        cols = ["run", "group", "cfg", "n_images"] + [c for m in metrics for c in (m, f"delta_{m}")]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    files.append(out / "compare.csv")

    def fmt(x, sign=False):
        return "n/a" if x is None else (f"{x:+.4f}" if sign else f"{x:.4f}")

    arrows = {m: (" ↓" if higher_is_better(m) is False else " ↑") for m in metrics}  # unknown: ↑
    md = [f"# Comparison (deltas vs `{labels[0]}`)", "",
          "| run | cfg | " + " | ".join(f"{m}{arrows[m]}" for m in metrics) + " |",
          "|---|---|" + "---|" * len(metrics)]
    for i, r in enumerate(rows):
        cells = [fmt(r[m]) + ("" if i == 0 else f" ({fmt(r[f'delta_{m}'], True)})") for m in metrics]
        md.append(f"| {r['run']} | {'' if r['cfg'] is None else r['cfg']} | " + " | ".join(cells) + " |")
    errs = [(lab, m, d["metrics"][m]["error"]) for lab, d in zip(labels, data) for m in metrics
            if "error" in d["metrics"].get(m, {})]
    if errs:
        md += ["", "Errors (n/a above):", ""] + [f"* {lab} / {m}: {e}" for lab, m, e in errs]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    files.append(out / "compare.md")

    fig, axes = plt.subplots(1, len(metrics), figsize=(max(3.0, 2.6 * len(metrics)), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = [r[m] if r[m] is not None else float("nan") for r in rows]
        err = [[0, 0] if not r[f"ci95_{m}"] or r[m] is None else [r[m] - r[f"ci95_{m}"][0], r[f"ci95_{m}"][1] - r[m]]
               for r in rows]
        ax.bar(range(len(rows)), vals, yerr=list(zip(*err)) if rows else None, capsize=3,
               color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_title(m + arrows[m])
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "compare_bars.png", dpi=120)
    plt.close(fig)
    files.append(out / "compare_bars.png")

    distinct = {c for c in cfgs if c is not None}
    is_sweep = len(distinct) >= 2 and all(c is not None for c in cfgs)
    absent = [m for m in dict.fromkeys((curve_x, curve_y))
              if m not in metrics or all(r[m] is None for r in rows)]
    if is_sweep and absent:
        # a CFG sweep is what the curve is for: say why it is missing instead of skipping it silently
        log.warning("compare: the runs span CFG %s but have no %s values, so no cfg_sweep.png was written; "
                    "choose the plot's axes among the evaluated metrics (%s) with --curve-x / --curve-y "
                    "(now --curve-x %s --curve-y %s)", sorted(distinct), " / ".join(absent),
                    ", ".join(m for m in metrics if any(r[m] is not None for r in rows)) or "none",
                    curve_x, curve_y)
    if is_sweep and not absent:
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        for gi, g in enumerate(dict.fromkeys(groups)):
            pts = sorted((float(r["cfg"]), r[curve_x], r[curve_y]) for r in rows
                         if r["group"] == g and r[curve_x] is not None and r[curve_y] is not None)
            if not pts:
                continue
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", color=f"C{gi}", label=g)
            for c, x, y in pts:
                ax.annotate(f"{c:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(curve_x + arrows[curve_x])
        ax.set_ylabel(curve_y + arrows[curve_y])
        ax.set_title("CFG sweep")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "cfg_sweep.png", dpi=120)
        plt.close(fig)
        files.append(out / "cfg_sweep.png")
    return {"table": rows, "files": [str(f) for f in files], "sweep": is_sweep}


__all__ = ["compare_runs", "load_run"]
