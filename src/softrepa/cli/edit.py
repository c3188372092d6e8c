"""`softrepa edit`: FlowEdit text-guided editing, one image or a manifest, with CFG sweeps.

    softrepa edit --model stabilityai/stable-diffusion-3-medium-diffusers --tokens tokens.safetensors \\
        --image cat.png --source-prompt "a cat on a sofa" --target-prompt "a dog on a sofa" --out edits/
    softrepa edit --model ... --tokens ... --manifest div2k.jsonl --target-cfg 9,11,13 --out edits/

A manifest is a .jsonl file (or a .json list) of rows {"image", "source_prompt", "target_prompt"},
or the official FlowEdit .yaml edit file (`input_img`, `source_prompt`, `target_prompts`: one row per
target); relative image paths are resolved against the manifest's folder. Several --target-cfg values write one
subfolder per value (`cfg_9/`, `cfg_11/`, ...); `--tar-cfg` / `--src-cfg` are accepted as aliases of
`--target-cfg` / `--source-cfg`. Images are resized (never cropped) to a size the model accepts and
the edit is resized back to the source image's size. Every output folder has a `metadata.jsonl`; images
are written atomically and their row only afterwards, so a re-run resumes where it stopped.
Defaults: the model family's paper presets (`softrepa.family.EditPresets`): 50 steps, source CFG
3.5; vanilla n_max 33 and target CFG 13.5; with --tokens n_max 30 and target CFG 9 (the paper's
SoftREPA setting, Tables 5-6). Everything is `softrepa.edit.edit_manifest`. The authors' editing script
resizes every image to 1024 x 1024 and pads T5 prompts to 512 tokens: `--size 1024
--max-sequence-length 512 --guidance authors` reproduces their setting.

Guidance-distilled families (FLUX.1-dev, FLUX.2) guide through the model's guidance embedding, as the
official FlowEdit edits FLUX: --source-cfg / --target-cfg are then the embedding's values of one
conditional pass per branch (no empty-prompt branch), --guidance authors does not apply, and the
presets are FlowEdit's FLUX.1-dev ones (28 steps, n_max 24, 1.5 -> 5.5; also with --tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..edit import edit_manifest, parse_cfgs, read_manifest
from ..errors import UsageError
from ..family import family_of
from ..flowedit import FlowEditParams
from ..prompts import parse_size
from ..runfolder import open_image
from .common import add_model_arguments, add_offload_arguments, add_uncond_argument, add_out_argument, add_progress_argument, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_offload_arguments(p)
    src = p.add_argument_group("input (one image, or --manifest)")
    src.add_argument("--image", default=None, help="source image file")
    src.add_argument("--source-prompt", default=None, help="caption of the source image")
    src.add_argument("--target-prompt", default=None, help="caption of the wanted edit")
    src.add_argument("--manifest", default=None,
                     help=".jsonl / .json rows {image, source_prompt, target_prompt}, or FlowEdit's .yaml edit "
                          "file (input_img, source_prompt, target_prompts); paths relative to it")
    fe = p.add_argument_group("FlowEdit")
    fe.add_argument("--steps", type=int, default=None, help="NFE of the sigma grid (default: the preset's 50)")
    fe.add_argument("--n-max", type=int, default=None,
                    help="edit over the last n_max steps (default 33; 30 with --tokens)")
    fe.add_argument("--n-min", type=int, default=0, help="final steps done as plain target sampling (default 0)")
    fe.add_argument("--n-avg", type=int, default=1, help="velocity samples averaged per step (default 1)")
    # the spellings first; the short FlowEdit-repo names stay as aliases (same dest)
    fe.add_argument("--source-cfg", "--src-cfg", dest="src_cfg", metavar="CFG", type=float, default=None,
                    help="source CFG scale (default: the preset's 3.5)")
    fe.add_argument("--target-cfg", "--tar-cfg", dest="tar_cfg", metavar="CFG[,CFG...]", default=None,
                    help="target CFG scale, or a comma list for a sweep, e.g. 9,11,13: one subfolder per value "
                         "(default 13.5; 9 with --tokens)")
    fe.add_argument("--guidance", choices=["standard", "authors"], default="standard",
                    help="CFG form of the target: standard u+s(c-u), or the SoftREPA authors' c+s(c-u)")
    fe.add_argument("--seed", type=int, default=0, help="forward-noise seed (default 0)")
    p.add_argument("--size", default=None,
                   help="working size H or HxW (default: the image's own, longer side capped at the model's "
                        "native resolution); images are resized, not cropped, and the output keeps the source "
                        "image's size")
    add_uncond_argument(p)
    add_progress_argument(p)
    add_out_argument(p)


def run(args: argparse.Namespace) -> int:
    if args.manifest:
        if args.image or args.source_prompt or args.target_prompt:
            raise UsageError("--manifest replaces --image / --source-prompt / --target-prompt; give one or the other")
        rows = read_manifest(args.manifest)
    else:
        for opt in ("image", "source_prompt", "target_prompt"):
            if not getattr(args, opt):
                raise UsageError(f"--{opt.replace('_', '-')} is required (or use --manifest)")
        open_image(args.image)  # missing / unreadable image: fail before loading the model
        rows = [{"image": str(Path(args.image).expanduser().resolve()), "source_prompt": args.source_prompt,
                 "target_prompt": args.target_prompt}]
    size = parse_size(args.size)
    cfgs = parse_cfgs(args.tar_cfg, 0.0) if args.tar_cfg is not None else None
    pipe, _ = load_model(args)
    params = FlowEditParams.preset(family_of(pipe), with_tokens=bool(args.tokens), steps=args.steps,
                                   n_max=args.n_max, n_min=args.n_min, n_avg=args.n_avg, src_cfg=args.src_cfg,
                                   guidance=args.guidance, seed=args.seed).validate()
    total = edit_manifest(pipe, rows, args.out, target_cfgs=cfgs, params=params, size=size,
                          max_sequence_length=args.max_sequence_length, model=args.model, tokens=args.tokens,
                          manifest=bool(args.manifest), size_spec=args.size, progress=not args.no_progress)
    n_cfg = len(cfgs) if cfgs else 1
    print(f"{total} edited image(s) written under {args.out} ({n_cfg} target CFG value(s))")
    return 0


__all__ = ["add_arguments", "run"]
