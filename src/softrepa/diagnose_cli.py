"""`softrepa diagnose`: the loss regime of SoftREPA on a model and a dataset, per timestep bin.

    softrepa diagnose --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --data coco/annotations/captions_train2017.json --resolution 512 --out runs/diagnose
    softrepa diagnose --model @assets/toy_sd3 --data demo_out/data --tokens demo_out/train/tokens.safetensors

Writes diagnosis.md (the table), diagnosis.json (rows + the calibrated `loss.tau_table`) and
diagnosis.png into --out; prints the table. Everything is `softrepa.diagnose.diagnose`.
"""

from __future__ import annotations

import argparse

import torch


def add_diagnose_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers pipeline: hub id, local folder or @assets/toy_sd3")
    p.add_argument("--data", required=True, help="dataset (COCO captions JSON, image folder, JSONL / CSV manifest)")
    p.add_argument("--data-images", default=None, help="COCO image folder (when --data is a captions JSON)")
    p.add_argument("--tokens", default=None, help="soft tokens .safetensors to measure with (default: the bare model)")
    p.add_argument("--out", default="diagnose_out", help="output folder")
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
    p.add_argument("--max-sequence-length", type=int, default=256, help="SD3 T5 prompt length")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="weights dtype (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_diagnose(args: argparse.Namespace) -> int:
    from .backbones import load_pipeline
    from .config import LossConfig
    from .data import build_dataset
    from .diagnose import diagnose
    from .negatives import NegativesConfig
    from .sample import native_resolution

    for name in ("bins", "batches_per_bin", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if args.no_progress:  # also the libraries' "Loading ..." bars
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    if args.tokens:
        from .io import load_soft_tokens

        load_soft_tokens(args.tokens)  # a bad tokens file fails before the (slow) model load
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
    import shlex
    import sys

    report.setup["command"] = "softrepa " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report.save(args.out)
    print(report.table())
    print(f"\ncalibrated tau table (loss.tau_table): {[round(v, 4) for v in report.tau_table]}")
    print(f"written: {args.out}/diagnosis.md, diagnosis.json, diagnosis.png")
    return 0


def _loss(tau: str, scale: float):
    from .config import LossConfig

    if tau == "calibrated":
        return LossConfig(tau_schedule="calibrated", scale=scale)
    try:
        value = float(tau)
    except ValueError:
        raise ValueError(f"--tau must be a number or 'calibrated', got {tau!r}") from None
    return LossConfig(tau=value, scale=scale)


__all__ = ["add_diagnose_arguments", "run_diagnose"]
