"""`softrepa toy`: pretrain the bundled miniature pipelines, and check a pipeline with the judge.

    softrepa toy pretrain --backbone both --out src/softrepa/assets
    softrepa toy check --model src/softrepa/assets/toy_sd3

`pretrain` defaults reproduce the bundled assets (`PretrainConfig`); `--steps`, `--vae-steps`,
`--seed`, `--batch-size` override the budget (e.g. `--steps 3 --vae-steps 3` for a smoke run).
`check` loads the folder with the stock `DiffusionPipeline.from_pretrained`, generates the
train-distribution and held-out prompts and prints the judge's alignment accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path


def add_toy_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `toy pretrain` and `toy check` on the `softrepa toy` parser.

    Args:
        parser: the subcommand's parser (from `softrepa.cli`).
    """
    sub = parser.add_subparsers(dest="toy_command", required=True)
    p = sub.add_parser("pretrain", help="train the miniature SD3 / SD1.5 pipelines from scratch",
                       description="Train the shared tiny VAE and the miniature SD3 and/or SD1.5 pipelines "
                                   "on the world's train split; save them as diffusers folders "
                                   "OUT/toy_sd3, OUT/toy_sd15.")
    p.add_argument("--backbone", choices=("sd3", "sd15", "both"), default="both")
    p.add_argument("--out", required=True, help="output directory (pipelines go to OUT/toy_sd3, OUT/toy_sd15)")
    p.add_argument("--steps", type=int, default=None,
                   help="diffusion steps for each backbone (default: the assets' settings, 4000)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default 1000)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="diffusion batch size (default 32)")
    p.add_argument("--images", type=int, default=None, help="training scenes rendered (default 16384)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 1: fastest on a shared 2-core machine)")
    p.add_argument("--caption-noise", type=float, default=None,
                   help="share of two-object captions describing a corrupted scene (web-like noise; default: the bundle's)")
    p.add_argument("--vae-from", default=None,
                   help="reuse the trained VAE of this pipeline folder instead of training one "
                        "(e.g. src/softrepa/assets/toy_sd15: the bundled miniatures share it)")
    p.add_argument("--text-steps", type=int, default=None,
                   help="SD3: contrastive text-encoder pretraining steps before the denoiser (0 = joint "
                        "training, the first-generation miniature; default 1500)")
    p.add_argument("--pooled-drop", type=float, default=None,
                   help="SD3: share of samples trained with the empty prompt's pooled vector (default 0.8)")
    p.add_argument("--caption-omit", type=float, default=None,
                   help="SD3: share of captions leaving an attribute or the relation out (default 0.7)")
    p.add_argument("--snapshots", type=int, nargs="+", default=None,
                   help="SD3: also save the EMA model after these steps (OUT/toy_sd3_step<N>)")
    p.add_argument("--tokenizer", choices=("word", "char"), default=None,
                   help="SD3: word-level (default) or character-level (the first-generation miniature) tokenizer")
    p.add_argument("--heads", type=int, default=None, help="SD3: attention heads of the transformer (default 4)")
    p.add_argument("--joint-text", action="store_true",
                   help="SD3: train the text encoders with the denoiser instead of freezing them")
    p.add_argument("--no-amp", action="store_true", help="fp32 VAE training instead of bf16 autocast")
    p.add_argument("--sequential", action="store_true",
                   help="with --backbone both, train one after the other instead of in two processes")
    p.add_argument("--check", action="store_true", help="judge the saved pipelines afterwards (as `toy check`)")

    c = sub.add_parser("check", help="judge a pipeline on train-distribution and held-out prompts",
                       description="Load a pipeline folder with the stock from_pretrained, generate the "
                                   "world's train-distribution and held-out prompts, print judge accuracy.")
    c.add_argument("--model", required=True, help="pipeline folder (e.g. src/softrepa/assets/toy_sd3)")
    c.add_argument("--single", type=int, default=64, help="train-distribution one-object prompts")
    c.add_argument("--pairs", type=int, default=64, help="train-distribution two-object prompts (0 = skip)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0], help="generation seeds")
    c.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    c.add_argument("--cfg", type=float, default=None, help="guidance scale (default 4.5 SD3, 6 SD1.5)")
    c.add_argument("--max-sequence-length", type=int, default=None,
                   help="SD3 only: zero 'T5' tokens appended to the prompt (pipeline default 256)")
    c.add_argument("--grid", default=None, help="also save a PNG grid of the first seed's held-out generations")
    c.add_argument("--json", default=None, help="write the result as JSON here")
    c.add_argument("--threads", type=int, default=None, help="torch threads")


def _run_pretrain(args) -> int:
    from .pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig()
    over = {}
    if args.steps is not None:
        over.update(sd3_steps=args.steps, sd15_steps=args.steps)
    if args.vae_steps is not None:
        over["vae_steps"] = args.vae_steps
    for key, attr in (("seed", "seed"), ("batch_size", "batch_size"), ("n_images", "images"), ("threads", "threads"),
                      ("caption_noise", "caption_noise"), ("vae_from", "vae_from"), ("text_steps", "text_steps"),
                      ("pooled_drop", "pooled_drop"), ("caption_omit", "caption_omit")):
        if getattr(args, attr) is not None:
            over[key] = getattr(args, attr)
    if args.snapshots:
        over["snapshots"] = tuple(args.snapshots)
    if args.heads is not None or args.tokenizer is not None:
        over["sd3"] = {**cfg.sd3, **({"heads": args.heads} if args.heads is not None else {}),
                       **({"tokenizer": args.tokenizer} if args.tokenizer else {})}
    if args.joint_text:
        over["freeze_text"] = False
    if args.no_amp:
        over["vae_amp"] = False
    if args.sequential:
        over["parallel"] = False
    cfg = replace(cfg, **over)
    summary = pretrain(args.backbone, args.out, cfg)
    print(f"[toy pretrain] stages (s): {json.dumps(summary['stage_seconds'])}; total {summary['total_seconds']} s")
    if args.check:
        from .check import check_pipeline, format_check, load_pipeline

        for name, info in summary["backbones"].items():
            print(format_check(check_pipeline(load_pipeline(info["path"])), f"{name}: {info['path']}"))
    return 0


def _run_check(args) -> int:
    from .check import check_pipeline, format_check, generate, load_pipeline, sample_grid
    from .pretrain_common import set_threads
    from .world import heldout_prompts

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"no pipeline folder at {args.model}")
    set_threads(args.threads)
    pipe = load_pipeline(args.model)
    kwargs = {}
    if args.max_sequence_length is not None:
        kwargs["max_sequence_length"] = args.max_sequence_length
    result = check_pipeline(pipe, n_single=args.single, n_pair=args.pairs, seeds=args.seeds,
                            steps=args.steps, guidance_scale=args.cfg, **kwargs)
    print(format_check(result, f"{type(pipe).__name__}: {args.model}"))
    if args.grid:
        images = generate(pipe, heldout_prompts(), seed=args.seeds[0], steps=args.steps,
                          guidance_scale=args.cfg, **kwargs)
        sample_grid(images, cols=11).save(args.grid)
        print(f"held-out grid: {args.grid}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_toy(args) -> int:
    """Dispatch `softrepa toy pretrain | check`.

    Args:
        args: parsed arguments (see `add_toy_arguments`).
    Returns:
        Process exit code.
    """
    if args.toy_command == "pretrain":
        return _run_pretrain(args)
    return _run_check(args)


__all__ = ["add_toy_arguments", "run_toy"]
