"""`softrepa edit`: FlowEdit text-guided editing, one image or a manifest, with CFG sweeps.

    softrepa edit --model stabilityai/stable-diffusion-3-medium-diffusers --tokens tokens.safetensors \\
        --image cat.png --source-prompt "a cat on a sofa" --target-prompt "a dog on a sofa" --out edits/
    softrepa edit --model ... --tokens ... --manifest div2k.jsonl --target-cfg 9,11,13 --out edits/

A manifest is a .jsonl file (or a .json list) of rows {"image", "source_prompt", "target_prompt"};
relative image paths are resolved against the manifest's folder. Several --target-cfg values write one
subfolder per value (`cfg_9/`, `cfg_11/`, ...); `--tar-cfg` / `--src-cfg` are accepted as aliases of
`--target-cfg` / `--source-cfg`. Images are resized (never cropped) to a size the model accepts and
the edit is resized back to the source image's size. Every output folder has a `metadata.jsonl`; images
are written atomically and their row only afterwards, so a re-run resumes where it stopped.
Paper defaults: 50 steps, source CFG 3.5; vanilla n_max 33 and target CFG 13.5; with --tokens
n_max 30 and target CFG 9 (the paper's SoftREPA setting, Tables 5-6). The authors' editing script
resizes every image to 1024 x 1024 and pads T5 prompts to 512 tokens: `--size 1024
--max-sequence-length 512 --guidance authors` reproduces their setting.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from .generate_cli import add_model_arguments, load_model

log = logging.getLogger(__name__)

#: (vanilla, with tokens) defaults from the paper
N_MAX_DEFAULT = (33, 30)
TAR_CFG_DEFAULT = (13.5, 9.0)
RESUME_KEYS = ("model", "tokens_sha256", "family", "dtype", "steps", "n_max", "n_min", "n_avg", "src_cfg",
               "tar_cfg", "guidance", "seed", "size", "max_sequence_length", "size_conditioning")
#: SDXL's added time ids: "hw" = the real (H, W) of the input since softrepa 0.1.0's edit fix;
#: folders edited before it carry no such key and are not resumed into (outputs would mix).
SDXL_SIZE_CONDITIONING = "hw"


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    src = p.add_argument_group("input (one image, or --manifest)")
    src.add_argument("--image", default=None, help="source image file")
    src.add_argument("--source-prompt", default=None, help="caption of the source image")
    src.add_argument("--target-prompt", default=None, help="caption of the wanted edit")
    src.add_argument("--manifest", default=None,
                     help=".jsonl / .json rows {image, source_prompt, target_prompt} (paths relative to it)")
    fe = p.add_argument_group("FlowEdit")
    fe.add_argument("--steps", type=int, default=50, help="NFE of the sigma grid (default 50)")
    fe.add_argument("--n-max", type=int, default=None,
                    help="edit over the last n_max steps (default 33; 30 with --tokens)")
    fe.add_argument("--n-min", type=int, default=0, help="final steps done as plain target sampling (default 0)")
    fe.add_argument("--n-avg", type=int, default=1, help="velocity samples averaged per step (default 1)")
    # the spellings first; the short FlowEdit-repo names stay as aliases (same dest)
    fe.add_argument("--source-cfg", "--src-cfg", dest="src_cfg", metavar="CFG", type=float, default=3.5,
                    help="source CFG scale (default 3.5)")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output folder")


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows {image (absolute), source_prompt, target_prompt} of a .jsonl or .json manifest.

    Args:
        path: the manifest file.
    Raises:
        FileNotFoundError: missing manifest or images (the first few are named);
        ValueError: malformed rows (row number and missing field named).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--manifest: no such file {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            raw = [(n, json.loads(ln)) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        else:
            data = json.loads(text)
            data = data.get("rows", data) if isinstance(data, dict) else data
            raw = list(enumerate(data, 1))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    rows, missing = [], []
    for n, r in raw:
        if not isinstance(r, dict):
            raise ValueError(f"{path}: row {n} is not an object")
        for key in ("image", "source_prompt", "target_prompt"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ValueError(f"{path}: row {n} has no {key!r}")
        image = Path(r["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            missing.append(str(image))
        # absolute, so that `evaluate` (LPIPS against the source) finds it from any directory
        rows.append({"image": str(image.resolve()), "source_prompt": r["source_prompt"],
                     "target_prompt": r["target_prompt"]})
    if missing:  # checked up front: a run must not stop half-way over a typo
        raise FileNotFoundError(f"{path}: {len(missing)} source image(s) not found, e.g. {missing[:3]}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def parse_cfgs(spec: str | None, default: float) -> list[float]:
    """"9,11,13" -> [9.0, 11.0, 13.0] (None -> [default])."""
    if spec is None:
        return [default]
    try:
        vals = [float(v) for v in str(spec).split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"--target-cfg: cannot parse {spec!r} (use e.g. 13.5 or 9,11,13)") from e
    if not vals:
        raise ValueError(f"--target-cfg: no values in {spec!r}")
    return list(dict.fromkeys(vals))


def output_name(index: int, image: str, manifest: bool) -> str:
    """`{stem}.png` for one image; `{index:05d}_{stem}.png` in manifest mode (stems may repeat)."""
    stem = Path(image).stem
    return f"{index:05d}_{stem}.png" if manifest else f"{stem}.png"


def run_edit(args: argparse.Namespace) -> int:
    from . import __version__
    from .edit import FlowEditParams, load_source_image
    from .hooks import describe_model, resolve_denoiser
    from .sample import finished_rows, parse_size, tokens_record, warn_long_prompts

    if args.manifest:
        if args.image or args.source_prompt or args.target_prompt:
            raise ValueError("--manifest replaces --image / --source-prompt / --target-prompt; give one or the other")
        rows = read_manifest(args.manifest)
    else:
        for opt in ("image", "source_prompt", "target_prompt"):
            if not getattr(args, opt):
                raise ValueError(f"--{opt.replace('_', '-')} is required (or use --manifest)")
        load_source_image(args.image)  # missing / unreadable image: fail before loading the model
        rows = [{"image": str(Path(args.image).expanduser().resolve()), "source_prompt": args.source_prompt,
                 "target_prompt": args.target_prompt}]
    k = 1 if args.tokens else 0
    n_max = N_MAX_DEFAULT[k] if args.n_max is None else args.n_max
    cfgs = parse_cfgs(args.tar_cfg, TAR_CFG_DEFAULT[k])
    size = parse_size(args.size)
    base = FlowEditParams(steps=args.steps, n_max=n_max, n_min=args.n_min, n_avg=args.n_avg, src_cfg=args.src_cfg,
                          tar_cfg=cfgs[0], guidance=args.guidance, seed=args.seed).validate()

    pipe, _ = load_model(args)
    common: dict[str, Any] = {"model": args.model, **tokens_record(pipe, args.tokens),
                              "family": describe_model(resolve_denoiser(pipe))["family"],
                              "dtype": str(pipe.dtype).replace("torch.", ""), "size": args.size,
                              "max_sequence_length": args.max_sequence_length,
                              "softrepa_version": __version__}
    if common["family"] == "sdxl":
        common["size_conditioning"] = SDXL_SIZE_CONDITIONING
    if args.max_sequence_length is not None and common["family"] != "sd3":
        raise ValueError(f"--max-sequence-length applies to SD3 models, not {common['family']}")
    out_root = Path(args.out)
    plan = []  # every output folder is checked before anything is edited
    for cfg in cfgs:
        params = FlowEditParams(**{**base.to_dict(), "tar_cfg": cfg})
        out = out_root / f"cfg_{cfg:g}" if len(cfgs) > 1 else out_root
        settings = {**common, **params.to_dict()}
        done = finished_rows(out, settings, RESUME_KEYS) if out.is_dir() else {}
        for i, r in enumerate(rows):  # a changed manifest must not be mistaken for finished work
            old = done.get(output_name(i, r["image"], bool(args.manifest)))
            if old is not None and any(old.get(key) != r[key] for key in r):
                raise ValueError(f"{out}: {old['file']} was made from another manifest row; choose another --out")
        todo = [(i, r) for i, r in enumerate(rows) if output_name(i, r["image"], bool(args.manifest)) not in done]
        log.info("tar_cfg %g: %d to edit, %d already done in %s", cfg, len(todo), len(rows) - len(todo), out)
        plan.append((out, params, settings, todo))
    pending = {p for _, _, _, todo in plan for _, r in todo for p in (r["source_prompt"], r["target_prompt"])}
    if pending:  # once for the whole run, before hours of editing, instead of once per row
        warn_long_prompts(pipe, sorted(pending))
    total = 0
    for out, params, settings, todo in plan:
        out.mkdir(parents=True, exist_ok=True)
        total += _edit_rows(pipe, todo, out, params, size, settings, bool(args.manifest), not args.no_progress)
    print(f"{total} edited image(s) written under {out_root} ({len(cfgs)} target CFG value(s))")
    return 0


def _edit_rows(pipe: Any, todo: list[tuple[int, dict]], out: Path, params: Any, size: tuple[int, int] | None,
               settings: dict, manifest: bool, progress: bool) -> int:
    """Edit the pending rows into `out`, one image + metadata row at a time; returns the count."""
    from tqdm.auto import tqdm

    from .edit import edit_image, load_source_image
    from .io import atomic_write_bytes
    from .sample import append_row, png_bytes

    for i, r in tqdm(todo, desc=f"edit tar_cfg={params.tar_cfg:g}", unit="img", disable=not progress):
        src = load_source_image(r["image"])
        edited = edit_image(pipe, src, r["source_prompt"], r["target_prompt"], params, size=size,
                            max_sequence_length=settings["max_sequence_length"] or 256,
                            warn_long=False)  # checked once for all rows in run_edit
        name = output_name(i, r["image"], manifest)
        atomic_write_bytes(out / name, png_bytes(edited))  # the image first, then its row
        append_row(out / "metadata.jsonl", {"file": name, "index": i, **r, "width": src.width,
                                            "height": src.height, **settings})
    return len(todo)


__all__ = ["add_edit_arguments", "output_name", "parse_cfgs", "read_manifest", "run_edit"]
