"""`softrepa diagnose`: the loss regime of SoftREPA on a model and a dataset, per timestep bin.

    softrepa diagnose --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --data coco/annotations/captions_train2017.json --resolution 512 --out runs/diagnose
    softrepa diagnose --model @assets/toy_sd3 --data demo_out/data --tokens demo_out/train/tokens.safetensors

Writes diagnosis.md (the table), diagnosis.json (rows + the calibrated `loss.tau_table`) and
diagnosis.png into --out; prints the table. Everything is `softrepa.diagnose.diagnose`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..artifact import load_soft_tokens
from ..config import LossConfig
from ..data import build_dataset
from ..diagnose import diagnose
from ..generate import native_resolution
from ..negatives import NegativesConfig
from ..pipeline import load_pipeline
from .common import add_dtype_argument, add_out_argument, add_progress_argument, check_data, check_model, \
    device_and_dtype, quiet_libraries


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers pipeline: hub id, local folder or @assets/toy_sd3")
    p.add_argument("--data", required=True, help="dataset (COCO captions JSON, image folder, JSONL / CSV manifest)")
    p.add_argument("--data-images", default=None, help="COCO image folder (when --data is a captions JSON)")
    p.add_argument("--tokens", default=None, help="soft tokens to measure with: a .safetensors file, a run folder or a Hub id "
                        "owner/name[@rev][:file] (default: the bare model)")
    add_out_argument(p, required=False, default="diagnose_out")
    p.add_argument("--bins", type=int, default=10, help="timestep bins over 0..1000")
    p.add_argument("--batches-per-bin", type=int, default=2, help="batches drawn per bin")
    p.add_argument("--batch-size", type=int, default=16, help="images (= captions) per batch (paper: 16)")
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
    p.add_argument("--max-sequence-length", type=int, default=None, help="text length (default: the family's)")
    add_dtype_argument(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    add_progress_argument(p)


def run(args: argparse.Namespace) -> int:
    for name in ("bins", "batches_per_bin", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device, dtype = device_and_dtype(args)
    check_data(args.data)  # before the (slow) model load
    check_model(args.model)
    quiet_libraries(args)
    if args.tokens:
        load_soft_tokens(args.tokens)  # a bad tokens file fails before the model load
    pipe = load_pipeline(args.model, dtype, device)
    pipe.set_progress_bar_config(disable=True)
    res = args.resolution or native_resolution(pipe)
    dataset = build_dataset(args.data, res, seed=args.seed, images=args.data_images)
    negatives = None
    if args.hard_negatives:
        negatives = NegativesConfig(per_image=args.hard_negatives)
        if args.swap:
            negatives.swap = [[w.strip() for w in g.split(",") if w.strip()] for g in args.swap]
            negatives.__post_init__()
    report = diagnose(pipe, dataset, args.tokens, bins=args.bins, batches_per_bin=args.batches_per_bin,
                      batch_size=args.batch_size, loss=_loss(args.tau, args.scale),
                      negatives=negatives, resolution=res, max_sequence_length=args.max_sequence_length,
                      seed=args.seed, grad_share=not args.no_grad_share, progress=not args.no_progress,
                      pair_chunk=args.pair_chunk)
    report.setup["command"] = "softrepa " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report.save(args.out)
    print(report.table())
    print(f"\ncalibrated tau table (loss.tau_table): {[round(v, 4) for v in report.tau_table]}")
    print(f"written: {args.out}/diagnosis.md, diagnosis.json, diagnosis.png")
    return 0


def _loss(tau: str, scale: float) -> LossConfig:
    if tau == "calibrated":
        return LossConfig(tau_schedule="calibrated", scale=scale)
    try:
        value = float(tau)
    except ValueError:
        raise ValueError(f"--tau must be a number or 'calibrated', got {tau!r}") from None
    return LossConfig(tau=value, scale=scale)


__all__ = ["add_arguments", "run"]
