"""`softrepa generate`: images from prompts with the stock pipeline, with (and without) soft tokens.

    softrepa generate --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --tokens tokens.safetensors --prompts captions_val2017.json --seeds 0 --out runs/gen

Output: one PNG per (prompt, seed), `{prompt_index:05d}_s{seed}.png`, plus `metadata.jsonl`
(one row per finished image). Re-running the same command resumes: finished images are skipped.
`--compare` writes `vanilla/`, `tokens/` (each with its metadata) and side-by-side `compare/` grids.
"""

from __future__ import annotations

import argparse

from ..checks import MAX_IMAGES
from ..errors import UsageError
from ..generate import generate_comparison, generate_images
from ..prompts import parse_seeds, parse_size, read_prompts
from .common import add_model_arguments, add_uncond_argument, add_offload_arguments, add_out_argument, add_progress_argument, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_offload_arguments(p)
    p.add_argument("--prompts", required=True,
                   help="a prompt, a .txt file (one per line), a .jsonl file (rows with \"prompt\"), "
                        "or a COCO captions .json (first caption of each image)")
    p.add_argument("--seeds", default="0", help="seeds: 0,1,2 or 0-9 (default 0); one image per prompt and seed")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: SD3 4.0, SD1.5/SDXL 7.0)")
    p.add_argument("--true-cfg", type=float, default=None,
                   help="also two-branch CFG with this scale on a guidance-distilled model (FLUX.1-dev), "
                        "tokens on both branches")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: SD3 28, SD1.5/SDXL 30)")
    p.add_argument("--size", default=None, help="H or HxW (default: the model's native resolution)")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    add_uncond_argument(p)
    p.add_argument("--compare", action="store_true",
                   help="also render without tokens (same seeds): vanilla/, tokens/ and compare/ grids")
    add_progress_argument(p)
    add_out_argument(p)


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts, args.max_prompts)
    seeds = parse_seeds(args.seeds)
    size = parse_size(args.size)
    if args.compare and not args.tokens:
        raise UsageError("--compare needs --tokens")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if len(prompts) * len(seeds) > MAX_IMAGES:
        raise UsageError(f"--prompts x --seeds: {len(prompts)} x {len(seeds)} images, more than the limit of "
                         f"{MAX_IMAGES} for one run; use --max-prompts or fewer seeds (runs into one --out resume)")
    pipe, _ = load_model(args)
    kw = dict(steps=args.steps, cfg=args.cfg, height=size[0] if size else None, width=size[1] if size else None,
              batch_size=args.batch_size, max_sequence_length=args.max_sequence_length, tokens=args.tokens,
              model=args.model, progress=not args.no_progress, true_cfg=args.true_cfg,
              uncond_tokens=args.uncond_tokens)
    if args.compare:
        grids = generate_comparison(pipe, prompts, seeds, args.out, **kw)
        print(f"{len(prompts) * len(seeds)} image pairs in {args.out}/vanilla, {args.out}/tokens; grids in {grids}")
    else:
        rows = generate_images(pipe, prompts, seeds, args.out, **kw)
        print(f"{len(rows)} images in {args.out} (metadata.jsonl)")
    return 0


__all__ = ["add_arguments", "run"]
