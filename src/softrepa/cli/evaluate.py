"""`softrepa evaluate` and `softrepa compare` command lines (registered in `softrepa.cli.main`).

    softrepa evaluate --images DIR [--reference DIR|stats.npz] [--reference-captions captions.json] [--prompts FILE]
                      [--metrics imagereward,pickscore,clip,hps,fid,lpips,world]
                      [--metrics-config metrics.yaml] [--batch-size N] [--device cuda] --out DIR
    softrepa compare RUN_A RUN_B [...] --out DIR [--labels a,b] [--sweep 9,11,13] [--groups x,y]

`evaluate` exits 0 when every requested metric was computed and 1 when some failed (their errors
are in results.json / results.md; the others are still reported). Library errors (missing image
folder, bad arguments) exit 2 through `softrepa.cli`. Argument parsing only: the work is
`softrepa.evaluation.evaluate` / `compare_runs`, the console summary `summary_lines`.
"""

from __future__ import annotations

import argparse
import sys

from ..checks import check_device
from ..errors import UsageError
from ..evaluation import PAPER_METRICS, compare_runs, evaluate, metric_names, summary_lines
from .common import add_dtype_argument, add_out_argument, add_progress_argument

#: --dtype short names -> the names `evaluate` records in results.json
_EVAL_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _float_list(text: str) -> list[float]:
    """argparse type: "13.5,9" -> [13.5, 9.0] (argparse reports a bad number as a usage error)."""
    return [float(t) for t in _csv_list(text)]


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `softrepa evaluate`.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--images", required=True, help="folder of images (with the generator's metadata.jsonl)")
    parser.add_argument("--reference", default=None,
                        help="real images (FID; LPIPS pairs by file name; world quality proxy) or a pytorch-fid .npz")
    parser.add_argument("--reference-captions", default=None,
                        help="COCO captions JSON the prompts came from: LPIPS pairs each image (metadata prompt_index) "
                             "with the COCO image in --reference it was captioned from (the authors' pairing)")
    parser.add_argument("--prompts", default=None,
                        help="prompt file (.txt in sorted image order, or .jsonl/.json/.csv with file,prompt)")
    parser.add_argument("--metrics", default=",".join(PAPER_METRICS),
                        help=f"comma-separated subset of {','.join(metric_names())} (default: the paper's six)")
    parser.add_argument("--metrics-config", default=None,
                        help="metrics.yaml naming each metric's weights, or 'metrics' (the packaged configs/metrics.yaml); "
                             "default: the paper's hub ids")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model call")
    parser.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: cuda when available)")
    add_dtype_argument(parser, help="metric models' dtype (default: the metrics config's, else fp32)")
    add_progress_argument(parser)
    add_out_argument(parser, help="output folder for results.{json,csv,md} and per_image.csv")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of another image folder already in --out")


def run_evaluate(args: argparse.Namespace) -> int:
    """Run `softrepa evaluate`; returns the exit code."""
    metrics = _csv_list(args.metrics)
    known = metric_names()
    unknown = [m for m in metrics if m not in known]
    if unknown or not metrics:
        raise UsageError(f"--metrics: unknown {unknown}; choose from {','.join(known)}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_device(args.device)
    res = evaluate(args.images, args.out, metrics=metrics, reference=args.reference, prompts=args.prompts,
                   reference_captions=args.reference_captions, config=args.metrics_config,
                   batch_size=args.batch_size, device=args.device,
                   dtype=_EVAL_DTYPES[args.dtype] if args.dtype else None, progress=not args.no_progress,
                   overwrite=args.overwrite)
    for line in summary_lines(res):
        print(line)
    print(f"wrote {args.out}/results.json, results.csv, results.md, per_image.csv")
    if res["errors"]:
        print(f"{len(res['errors'])} metric(s) failed: {', '.join(res['errors'])}", file=sys.stderr)
        return 1
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `softrepa compare`.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("runs", nargs="+", help="evaluated run folders (or results.json); the first is the baseline")
    add_out_argument(parser)
    parser.add_argument("--labels", default=None, help="comma-separated run names (default: folder names)")
    parser.add_argument("--sweep", type=_float_list, default=None,
                        help="comma-separated CFG of each run (default: the target CFG in each run's metadata)")
    parser.add_argument("--groups", default=None,
                        help="comma-separated method of each run for the sweep curves (e.g. vanilla,vanilla,softrepa)")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics to include (default: all)")
    parser.add_argument("--curve-x", default="lpips", help="sweep plot x axis metric (paper Fig. 5: lpips)")
    parser.add_argument("--curve-y", default="clip", help="sweep plot y axis metric (paper Fig. 5: clip)")


def run_compare(args: argparse.Namespace) -> int:
    """Run `softrepa compare`; returns the exit code."""
    sweep = args.sweep or None
    res = compare_runs(args.runs, args.out, labels=_csv_list(args.labels) if args.labels else None, sweep=sweep,
                       groups=_csv_list(args.groups) if args.groups else None,
                       metrics=_csv_list(args.metrics) if args.metrics else None,
                       curve_x=args.curve_x, curve_y=args.curve_y)
    for f in res["files"]:
        print(f"wrote {f}")
    if not res["sweep"] and (sweep or len(args.runs) > 1):
        print("no CFG sweep detected (runs need distinct target CFGs in their metadata, or --sweep)")
    return 0


__all__ = ["add_compare_arguments", "add_evaluate_arguments", "run_compare", "run_evaluate"]
