"""`softrepa diagnose`: the loss regime of SoftREPA on a model and a dataset, per timestep bin.

    softrepa diagnose --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --data coco/annotations/captions_train2017.json --resolution 512 --out runs/diagnose
    softrepa diagnose --model @assets/toy_sd3 --data demo_out/data --tokens demo_out/train/tokens.safetensors

Writes diagnosis.md (the table), diagnosis.json (rows + the calibrated `loss.tau_table`) and
diagnosis.png into --out; prints the table. Everything is `softrepa.diagnosis.run_diagnosis`
(the measurement: `softrepa.diagnose.diagnose`).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..diagnosis import run_diagnosis
from ..checks import MAX_BATCH, MAX_SIDE, check_sampling_args, finite, int_in
from .common import add_dtype_argument, add_out_argument, add_progress_argument, text_length_help


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers pipeline: hub id, local folder or @assets/toy_sd3")
    p.add_argument("--data", required=True, help="dataset (COCO captions JSON, image folder, JSONL / CSV manifest)")
    p.add_argument("--data-images", default=None, help="COCO image folder (when --data is a captions JSON)")
    p.add_argument("--tokens", default=None, help="soft tokens to measure with: a .safetensors file, a run folder or a Hub id "
                        "owner/name[@rev][:file] (default: the bare model)")
    add_out_argument(p, required=False, default="diagnose_out")
    p.add_argument("--bins", type=int, default=10, help="timestep bins over 0..1000")
    p.add_argument("--batches-per-bin", type=int, default=2, help="batches drawn per bin")
    p.add_argument("--batch-size", type=int, default=16, help="images (= captions) per batch, >= 2 (paper: 16)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the pipeline's native size)")
    p.add_argument("--tau", default="0.07",
                   help="temperature the table's logits use (authors: 0.07), or 'calibrated': each bin at its tau*")
    p.add_argument("--scale", type=float, default=4.0, help="logit scale (authors: 4)")
    p.add_argument("--hard-negatives", type=int, default=0,
                   help="also score K hard-negative captions per image (colour swaps, spatial flips)")
    p.add_argument("--swap", action="append", default=None, metavar="WORD,WORD,...",
                   help="a word group for hard-negative swaps (repeatable; default: colour words)")
    p.add_argument("--no-grad-share", action="store_true", help="skip the token-gradient split (one backward per batch)")
    p.add_argument("--pair-chunk", type=int, default=None, help="pairs per forward pass (memory bound)")
    p.add_argument("--max-sequence-length", type=int, default=None, help=text_length_help())
    add_dtype_argument(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    add_progress_argument(p)


def run(args: argparse.Namespace) -> int:
    # sizes and devices first: one line before the model loads (softrepa.checks)
    check_sampling_args(args)
    int_in(args.bins, "--bins", 1, 1000)
    int_in(args.batch_size, "--batch-size", 2, MAX_BATCH)
    if args.resolution is not None:
        int_in(args.resolution, "--resolution", 8, MAX_SIDE)
    finite(args.scale, "--scale", above=0)
    report = run_diagnosis(
        args.model, args.data, out=args.out, tokens=args.tokens, data_images=args.data_images, bins=args.bins,
        batches_per_bin=args.batches_per_bin, batch_size=args.batch_size, resolution=args.resolution, tau=args.tau,
        scale=args.scale, hard_negatives=args.hard_negatives, swap=[g.split(",") for g in args.swap or []] or None,
        grad_share=not args.no_grad_share, pair_chunk=args.pair_chunk, max_sequence_length=args.max_sequence_length,
        device=args.device, dtype=args.dtype, seed=args.seed, progress=not args.no_progress,
        command="softrepa " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(report.table())
    print(f"\ncalibrated tau table (loss.tau_table): {[round(v, 4) for v in report.tau_table]}")
    print(f"written: {args.out}/diagnosis.md, diagnosis.json, diagnosis.png")
    return 0


__all__ = ["add_arguments", "run"]
