"""Generation with soft tokens through the stock diffusers pipeline: resumable, with metadata.

The tokens are attached to the pipeline's denoiser (`softrepa.attach` / `load_into`), so the
unmodified `pipe(...)` call uses them on both classifier-free-guidance branches, exactly as the
paper samples. `generate_images` renders one PNG per (prompt, seed), named
`{prompt_index:05d}_s{seed}.png`, and appends one `metadata.jsonl` row per finished image;
a second run over the same folder skips what is done. `generate_comparison` renders the same
prompts and seeds with the tokens disabled and enabled and writes side-by-side grids.

Reproducibility: every image has its own CPU `torch.Generator` seeded with its seed, so an image
does not depend on its batch or on the device's random-number generator; the same call of
`pipe(...)` with `generator=torch.Generator().manual_seed(seed)` reproduces it (batch size 1).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ._version import __version__
from .artifact import load_into
from .hooks import attached_handle
from .checks import MAX_STEPS, check_pipeline_size, int_in
from .errors import RunFolderError, UsageError
from .family import family_of, resolve_denoiser
from .prompts import warn_long_prompts
from .runlock import RunLock
from .runfolder import METADATA, append_row, atomic_write_bytes, finished_rows, open_image, png_bytes, tokens_record
from .viz import image_grid

log = logging.getLogger(__name__)

#: Settings that must agree between a run and the images already in its output folder.
RESUME_KEYS = ("cfg", "steps", "height", "width", "model", "tokens_sha256", "family", "dtype", "max_sequence_length",
               "true_cfg")


# --------------------------------------------------------------------------- generation
def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    *,
    steps: int | None = None,
    cfg: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    max_sequence_length: int | None = None,
    tokens: str | os.PathLike | None = None,
    model: str | None = None,
    progress: bool = True,
    call_kwargs: dict[str, Any] | None = None,
    true_cfg: float | None = None,
) -> list[dict]:
    """Render one PNG per (prompt, seed) with the stock pipeline; resumable.

    Tokens are whatever is attached to `pipe` (`softrepa.load_into(pipe, file)`); when `tokens`
    names a file and nothing is attached yet, the file is attached for this call only.

    Args:
        pipe: a loaded diffusers text-to-image pipeline.
        prompts: the prompts; image files are named after the prompt's index in this list.
        seeds: one image per seed for every prompt.
        out_dir: output folder (created); holds the PNGs and `metadata.jsonl`.
        steps, cfg: sampling steps and CFG scale (default: the family's paper setting).
        height, width: image size (default: the pipeline's native resolution).
        batch_size: images per pipeline call.
        max_sequence_length: text length of families that take one (default: the family's
            `text_length`, the length train and edit use too).
        tokens: the tokens file in effect (recorded with its sha256 in the metadata).
        model: model id / folder recorded in the metadata (default: the pipeline's name_or_path).
        progress: show a progress bar.
        call_kwargs: extra keyword arguments for `pipe(...)` (e.g. negative_prompt).
        true_cfg: two-branch ("true") CFG on top of a guidance-distilled model's embedded guidance
            (FLUX.1-dev: `true_cfg_scale` with the negative prompt " " unless `call_kwargs` names
            one); the tokens are on both branches. Only for pipelines that take `true_cfg_scale`.
    Returns:
        The metadata rows of every requested image (already finished ones included), in order.

    Example:
        >>> softrepa.load_into(pipe, "tokens.safetensors")
        >>> rows = generate_images(pipe, ["a red circle left of a blue square"], seeds=[0, 1], out_dir="gen/")
        >>> rows[0]["file"], rows[0]["steps"]          # the family's paper defaults (SD3: 28 steps, CFG 4)
        ('00000_s0.png', 28)
    """
    own = None
    if tokens is not None and attached_handle(pipe) is None:
        own = load_into(pipe, tokens)
    stack = contextlib.ExitStack()
    try:
        family = family_of(pipe)
        defaults = family.sampling  # the paper's steps and CFG (Table 4)
        native = native_resolution(pipe)
        # the family maps the CFG scale onto its pipeline's arguments; explicit call_kwargs win
        call_kwargs = {**family.guidance_kwargs(float(cfg if cfg is not None else defaults.cfg)),
                       **dict(call_kwargs or {})}
        if true_cfg is not None:
            if "true_cfg_scale" in call_kwargs:  # the family already guides with true CFG (Qwen-Image: --cfg)
                raise UsageError(f"--true-cfg: {family.title} already uses two-branch CFG; set it with --cfg")
            if "true_cfg_scale" not in inspect.signature(pipe.__call__).parameters:
                raise UsageError(f"--true-cfg: {type(pipe).__name__} has no true_cfg_scale (guidance-distilled "
                                 "pipelines such as FluxPipeline have it)")
            # a negative prompt is what makes the pipeline run the second branch
            call_kwargs = {**call_kwargs, "true_cfg_scale": float(true_cfg),
                           "negative_prompt": call_kwargs.get("negative_prompt", " ")}
        # one text length per family, shared with train and edit (an explicit one wins)
        max_sequence_length = family.resolve_text_length(max_sequence_length)
        if max_sequence_length is not None:
            call_kwargs["max_sequence_length"] = max_sequence_length
        settings = {
            "cfg": float(cfg if cfg is not None else defaults.cfg),
            "steps": int_in(defaults.steps if steps is None else steps, "steps", 1, MAX_STEPS),  # 0 is not "default"
            "height": int(height or width or native), "width": int(width or height or native),
            "model": model or getattr(pipe.config, "_name_or_path", None) or type(pipe).__name__,
            "max_sequence_length": max_sequence_length, **tokens_record(pipe, tokens), "family": family.name,
            "true_cfg": None if true_cfg is None else float(true_cfg),
            "dtype": str(pipe.dtype).replace("torch.", ""),
            "softrepa_version": __version__,
        }
        check_pipeline_size(pipe, settings["height"], settings["width"])  # not a ValueError deep in diffusers
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # one writer per folder: two generations into it would interleave their metadata rows
        lock = RunLock(out, "output folder").acquire()
        stack.callback(lock.release)
        done = finished_rows(out, settings, RESUME_KEYS)
        jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
        for i, p, s in jobs:  # a changed prompt list must not be mistaken for finished work
            row = done.get(image_name(i, s))
            if row is not None and row["prompt"] != p:
                raise RunFolderError(f"{out}: {row['file']} was made for prompt {row['prompt']!r}, not {p!r}; "
                                     "choose another output folder")
        todo = [j for j in jobs if image_name(j[0], j[2]) not in done]
        if todo:
            warn_long_prompts(pipe, list(dict.fromkeys(p for _, p, _ in todo)))
        _render(pipe, todo, out, settings, max(1, int(batch_size)), progress, call_kwargs, done)
        return [done[image_name(i, s)] for i, _, s in jobs]
    finally:
        stack.close()
        if own is not None:
            own.remove()


def native_resolution(pipe: Any) -> int:
    """The pipeline's default image side in pixels (SD3 / SDXL 1024, SD1.5 512 for the real models)."""
    sample = getattr(pipe, "default_sample_size", None) or resolve_denoiser(pipe).config.sample_size
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    return int(sample) * int(pipe.vae_scale_factor)


def image_name(prompt_index: int, seed: int) -> str:
    """Deterministic file name of one (prompt, seed) image."""
    return f"{prompt_index:05d}_s{seed}.png"


def _render(pipe, todo, out: Path, settings: dict, batch_size: int, progress: bool,
            call_kwargs: dict, done: dict) -> None:
    saved_cfg = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)  # one bar over images, not one per call
    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            # one CPU generator per image: the image depends on its seed only, not on the batch/device
            gens = [torch.Generator().manual_seed(int(s)) for _, _, s in chunk]
            images = pipe(prompt=[p for _, p, _ in chunk], num_inference_steps=settings["steps"],
                          height=settings["height"], width=settings["width"],
                          generator=gens, output_type="pil", **call_kwargs).images  # CFG: in call_kwargs
            for (i, p, s), im in zip(chunk, images):
                name = image_name(i, s)
                atomic_write_bytes(out / name, png_bytes(im))  # image first, then its row
                row = {"file": name, "prompt": p, "prompt_index": i, "seed": int(s), **settings}
                append_row(out / METADATA, row)
                done[name] = row
            bar.update(len(chunk))
    finally:
        bar.close()
        pipe._progress_bar_config = saved_cfg


def generate_comparison(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    *,
    tokens: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Path:
    """Vanilla vs tokens with the same seeds: `vanilla/`, `tokens/` and `compare/` grids.

    Args:
        pipe: a pipeline with tokens attached, or plain when `tokens` names a file to attach.
        prompts, seeds: as for `generate_images`.
        out_dir: output folder; `compare/{prompt_index:05d}.png` holds one grid per prompt
            (rows: vanilla, tokens; columns: seeds).
        tokens: the tokens file (recorded in the metadata; attached when none is).
        **kwargs: passed to `generate_images` (steps, cfg, height, width, batch_size, ...).
    Returns:
        The `compare/` folder.
    Raises:
        UsageError: no tokens attached and none given.

    Example:
        >>> grids = generate_comparison(pipe, prompts, [0, 1, 2], "cmp/", tokens="tokens.safetensors")
    """
    own = load_into(pipe, tokens) if tokens is not None and attached_handle(pipe) is None else None
    handle = attached_handle(pipe)
    if handle is None:
        raise UsageError("--compare needs soft tokens (--tokens FILE)")
    out = Path(out_dir)
    try:
        with handle.disabled():  # hooks stay, tokens are skipped: the exact vanilla model
            vanilla = generate_images(pipe, prompts, seeds, out / "vanilla", **kwargs)
        with_tokens = generate_images(pipe, prompts, seeds, out / "tokens", tokens=tokens, **kwargs)
    finally:
        if own is not None:
            own.remove()
    grids = out / "compare"
    grids.mkdir(parents=True, exist_ok=True)
    n = len(seeds)
    for k in range(len(prompts)):
        path = grids / f"{k:05d}.png"
        if path.is_file():
            continue
        rows = [[open_image(out / sub / r["file"]) for r in rows_[k * n:(k + 1) * n]]
                for sub, rows_ in (("vanilla", vanilla), ("tokens", with_tokens))]
        grid = image_grid(rows, row_labels=["vanilla", "tokens"], col_labels=[f"seed {s}" for s in seeds])
        atomic_write_bytes(path, png_bytes(grid))
    return grids


__all__ = ["RESUME_KEYS", "generate_comparison", "generate_images", "image_name", "native_resolution"]
