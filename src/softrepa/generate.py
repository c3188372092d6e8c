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
import functools
import importlib.util
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
               "true_cfg", "uncond_tokens")


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
    uncond_tokens: str = "positive",
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
        uncond_tokens: what the unconditional branch carries when `tokens` is attached here
            ("positive", "negative": an AGSM file's psi-, "none": vanilla; see `load_into`). Tokens
            attached by the caller keep the choice made there.
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
        own = load_into(pipe, tokens, uncond_tokens=uncond_tokens)
    elif uncond_tokens != "positive" and (attached_handle(pipe) is None
                                          or attached_handle(pipe).uncond_mode != uncond_tokens):
        raise UsageError(f"--uncond-tokens {uncond_tokens}: the tokens attached to this pipeline were not loaded "
                         "with that choice (pass it to load_into)" if attached_handle(pipe) is not None
                         else f"--uncond-tokens {uncond_tokens} needs --tokens")
    handle = attached_handle(pipe)
    active = handle is not None and handle.enabled
    mode = handle.uncond_mode if active else "positive"
    calls_before = handle.uncond_calls if handle is not None else 0
    stack = contextlib.ExitStack()
    try:
        family = family_of(pipe)
        defaults = family.sampling_for(pipe)  # the paper's steps and CFG (Table 4), or the pipeline's own
        native = native_resolution(pipe)
        # the family maps the CFG scale onto its pipeline's arguments; explicit call_kwargs win
        cfg = family.applied_cfg(pipe, float(cfg if cfg is not None else defaults.cfg))
        call_kwargs = {**family.guidance_kwargs(cfg), **dict(call_kwargs or {})}
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
            "uncond_tokens": None if mode == "positive" else mode,  # None: as every file before AGSM
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
        if todo and mode != "positive" and handle.uncond_calls == calls_before:
            log.warning("--uncond-tokens %s had no effect: the pipeline ran no unconditional branch (CFG off, or "
                        "a guidance-distilled model without --true-cfg)", mode)
        return [done[image_name(i, s)] for i, _, s in jobs]
    finally:
        stack.close()
        if own is not None:
            own.remove()


def native_resolution(pipe: Any) -> int:
    """The pipeline's default image side in pixels (SD3 / SDXL 1024, SD1.5 512 for the real models)."""
    own = family_of(pipe).native_size  # a family whose pipeline declares no default size says it
    if own:
        return int(own)
    sample = getattr(pipe, "default_sample_size", None) or getattr(resolve_denoiser(pipe).config, "sample_size", None)
    if sample is None:  # no native square (Wan's call: 480 x 832): the call's default height
        return int(inspect.signature(pipe.__call__).parameters["height"].default)
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    return int(sample) * int(pipe.vae_scale_factor)


@functools.lru_cache(maxsize=1)
def _mp4_writer() -> Any:
    """diffusers' `export_to_video` when imageio and its ffmpeg are installed, else None (noticed once)."""
    from diffusers.utils import export_to_video
    from diffusers.utils.import_utils import is_imageio_available

    if is_imageio_available() and importlib.util.find_spec("imageio_ffmpeg") is not None:
        return export_to_video
    log.warning("videos are written as frames only: mp4 needs imageio and imageio-ffmpeg "
                "(pip install 'softrepa[video]')")
    return None


def write_video(pipe: Any, out: Path, name: str, frames: list) -> dict:
    """One video of a video pipeline: its frames as `{stem}_frames/00000.png, ...` and `{stem}.mp4` at the
    family's `video_fps` (where the mp4 writer is installed; else frames only, noticed once).

    Args:
        pipe: the video pipeline (its family gives the fps).
        out: the output folder.
        name: the video's image name (`image_name(i, seed)`); the stem names its files.
        frames: the video's PIL frames.
    Returns:
        The metadata entries: "frames" (folder), "num_frames", "fps", "video" (mp4 file or None).

    Example:
        >>> write_video(pipe, Path("gen"), "00000_s0.png", result.frames[0])["frames"]
        '00000_s0_frames'
    """
    stem, fps = Path(name).stem, int(family_of(pipe).video_fps or 16)
    (out / f"{stem}_frames").mkdir(exist_ok=True)
    for k, frame in enumerate(frames):
        atomic_write_bytes(out / f"{stem}_frames" / f"{k:05d}.png", png_bytes(frame))
    row = {"frames": f"{stem}_frames", "num_frames": len(frames), "fps": fps, "video": None}
    writer = _mp4_writer()
    if writer is not None:
        tmp = out / f".{stem}.partial.mp4"  # whole or absent, as every file of a run folder
        writer(frames, str(tmp), fps=fps)
        os.replace(tmp, out / f"{stem}.mp4")
        row["video"] = f"{stem}.mp4"
    return row


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
            # the family calls its stock pipeline (CFG in call_kwargs); a video: lists of frames
            images = family_of(pipe).render(pipe, [p for _, p, _ in chunk], gens, steps=settings["steps"],
                                            height=settings["height"], width=settings["width"],
                                            call_kwargs=call_kwargs)
            for (i, p, s), im in zip(chunk, images):
                name = image_name(i, s)
                video = write_video(pipe, out, name, im) if isinstance(im, list) else {}
                atomic_write_bytes(out / name, png_bytes(im[0] if video else im))  # a video: its first frame
                row = {"file": name, "prompt": p, "prompt_index": i, "seed": int(s), **settings, **video}
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
    uncond = kwargs.pop("uncond_tokens", "positive")
    own = (load_into(pipe, tokens, uncond_tokens=uncond)
           if tokens is not None and attached_handle(pipe) is None else None)
    handle = attached_handle(pipe)
    if handle is None:
        raise UsageError("--compare needs soft tokens (--tokens FILE)")
    out = Path(out_dir)
    try:
        with handle.disabled():  # hooks stay, tokens are skipped: the exact vanilla model
            vanilla = generate_images(pipe, prompts, seeds, out / "vanilla", **kwargs)
        with_tokens = generate_images(pipe, prompts, seeds, out / "tokens", tokens=tokens, uncond_tokens=uncond,
                                      **kwargs)
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
