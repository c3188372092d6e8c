"""`softrepa generate`: images from prompts with the stock pipeline, with (and without) soft tokens.

    softrepa generate --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --tokens tokens.safetensors --prompts captions_val2017.json --seeds 0 --out runs/gen

Output: one PNG per (prompt, seed), `{prompt_index:05d}_s{seed}.png`, plus `metadata.jsonl`
(one row per finished image). Re-running the same command resumes: finished images are skipped.
`--compare` writes `vanilla/`, `tokens/` (each with its metadata) and side-by-side `compare/` grids.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model-loading options shared by `generate` and `edit`."""
    p.add_argument("--model", required=True, help="diffusers pipeline: hub id or local folder")
    p.add_argument("--tokens", default=None, help="soft tokens .safetensors (omit for the vanilla model)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights dtype (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--cpu-offload", action="store_true",
                   help="model CPU offload (accelerate): lower GPU memory, slower")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    p.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="SD3 only: T5 prompt length (default: the pipeline's 256; the authors trained with 512)")


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the pipeline named by the CLI options and attach `--tokens`.

    Args:
        args: parsed options of `add_model_arguments`.
    Returns:
        (pipeline, attach handle or None).
    Raises:
        FileNotFoundError: the model cannot be loaded; SoftTokensError: tokens that do not fit
            the model (e.g. a tokens file for another family).
    """
    from .backbones import load_pipeline
    from .io import load_into, load_soft_tokens

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if args.cpu_offload and not device.startswith("cuda"):
        raise ValueError("--cpu-offload needs a CUDA --device")
    if args.tokens:
        load_soft_tokens(args.tokens)  # a bad tokens file fails before the (slow) model load
    if getattr(args, "no_progress", False):  # also the libraries' "Loading ..." bars
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    # with offload the weights stay on the CPU and accelerate moves each model in when it runs
    pipe = load_pipeline(args.model, dtype, "cpu" if args.cpu_offload else device)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.vae_slicing:
        pipe.vae.enable_slicing()
    handle = load_into(pipe, args.tokens) if args.tokens else None
    return pipe, handle


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompts", required=True,
                   help="a prompt, a .txt file (one per line), a .jsonl file (rows with \"prompt\"), "
                        "or a COCO captions .json (first caption of each image)")
    p.add_argument("--seeds", default="0", help="seeds: 0,1,2 or 0-9 (default 0); one image per prompt and seed")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: SD3 4.0, SD1.5/SDXL 7.0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: SD3 28, SD1.5/SDXL 30)")
    p.add_argument("--size", default=None, help="H or HxW (default: the model's native resolution)")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--compare", action="store_true",
                   help="also render without tokens (same seeds): vanilla/, tokens/ and compare/ grids")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output folder")


def run_generate(args: argparse.Namespace) -> int:
    from .sample import generate_comparison, generate_images, parse_seeds, parse_size, read_prompts

    prompts = read_prompts(args.prompts, args.max_prompts)
    seeds = parse_seeds(args.seeds)
    size = parse_size(args.size)
    if args.compare and not args.tokens:
        raise ValueError("--compare needs --tokens")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    pipe, _ = load_model(args)
    kw = dict(steps=args.steps, cfg=args.cfg, height=size[0] if size else None, width=size[1] if size else None,
              batch_size=args.batch_size, max_sequence_length=args.max_sequence_length, tokens=args.tokens,
              model=args.model, progress=not args.no_progress)
    if args.compare:
        grids = generate_comparison(pipe, prompts, seeds, args.out, **kw)
        print(f"{len(prompts) * len(seeds)} image pairs in {args.out}/vanilla, {args.out}/tokens; grids in {grids}")
    else:
        rows = generate_images(pipe, prompts, seeds, args.out, **kw)
        print(f"{len(rows)} images in {args.out} (metadata.jsonl)")
    return 0


__all__ = ["DTYPES", "add_generate_arguments", "add_model_arguments", "load_model", "run_generate"]
