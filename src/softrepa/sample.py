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

import hashlib
import inspect
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .hooks import attached_handle, describe_model, resolve_denoiser
from .io import atomic_write_bytes

log = logging.getLogger(__name__)

#: Paper settings per family (Table 4): sampling steps and CFG scale. The default size is the
#: pipeline's native resolution (SD3 / SDXL 1024, SD1.5 512, as in the paper).
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "sd3": {"steps": 28, "cfg": 4.0},
    "sd15": {"steps": 30, "cfg": 7.0},
    "sdxl": {"steps": 30, "cfg": 7.0},
}
METADATA = "metadata.jsonl"
#: Settings that must agree between a run and the images already in its output folder.
RESUME_KEYS = ("cfg", "steps", "height", "width", "model", "tokens_sha256", "family", "dtype", "max_sequence_length")


# --------------------------------------------------------------------------- parsing helpers
def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """Seeds from "0,1,2", "0-9", "0-3,7" (or an int / list), duplicates removed, order kept.

    Args:
        spec: the seed specification.
    Raises:
        ValueError: malformed spec (the message names --seeds).
    """
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return list(dict.fromkeys(int(s) for s in spec))
    seeds: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"--seeds: range {part!r} runs backwards")
            seeds += range(lo, hi + 1)
        elif re.fullmatch(r"\d+", part):
            seeds.append(int(part))
        else:
            raise ValueError(f"--seeds: cannot parse {part!r} (use e.g. 0,1,2 or 0-9)")
    return list(dict.fromkeys(seeds))


def parse_size(spec: str | int | None) -> tuple[int, int] | None:
    """"512" -> (512, 512); "768x512" -> (768, 512) as (height, width); None -> None.

    Args:
        spec: the size specification (H or HxW).
    """
    if spec is None or spec == "":
        return None
    if isinstance(spec, int):
        return spec, spec
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(spec))
    if not m or int(m.group(1)) <= 0 or (m.group(2) and int(m.group(2)) <= 0):
        raise ValueError(f"--size: cannot parse {spec!r} (use H or HxW, e.g. 1024 or 768x1024)")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def read_prompts(spec: str, max_prompts: int | None = None) -> list[str]:
    """Prompts from a literal text, a .txt file (one per line), a .jsonl file (rows with "prompt"),
    or a COCO captions .json file (one prompt per image: its first caption, images in file order).

    Args:
        spec: the prompt text or a file path.
        max_prompts: keep only the first N prompts.
    Raises:
        FileNotFoundError: `spec` names a .txt / .jsonl / .json file that does not exist.
        ValueError: a file without prompts, or a .jsonl row without "prompt" (line number named).
    """
    path = Path(spec).expanduser()
    is_file_name = re.fullmatch(r"\S+\.(txt|jsonl|json)", spec.strip()) is not None
    if not path.is_file():
        if is_file_name:  # a typo in a file name must not silently become the prompt text
            raise FileNotFoundError(f"--prompts: no such file {spec!r}")
        prompts = [spec]
    elif path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(str(row["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with a \"prompt\" field ({e!r})") from e
    elif path.suffix == ".json":
        prompts = _coco_prompts(path)
    else:
        prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {spec!r} holds no prompts")
    return prompts[:max_prompts] if max_prompts else prompts


def _coco_prompts(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, list) and all(isinstance(p, str) for p in data):
        return [p.strip() for p in data if p.strip()]  # a plain JSON list of prompts
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: expected a COCO captions file with 'images' and 'annotations' "
                         "(or a JSON list of prompts)")
    first: dict[Any, str] = {}
    for ann in data["annotations"]:  # annotation order decides which caption is "first"
        cap = ann.get("caption")
        if isinstance(cap, str) and cap.strip():
            first.setdefault(ann.get("image_id"), " ".join(cap.split()))
    return [first[im["id"]] for im in data["images"] if im.get("id") in first]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (the tokens artefact recorded in the metadata)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def warn_long_prompts(pipe: Any, prompts: Sequence[str]) -> int:
    """Log one warning for prompts longer than the CLIP tokenizer limit (the pipeline truncates them).

    Args:
        pipe: the pipeline (its `tokenizer` decides the limit; SD3's T5 reads up to 256 tokens).
        prompts: the prompts to check.
    Returns:
        The number of prompts that will be truncated.
    """
    tok = getattr(pipe, "tokenizer", None)
    if tok is None:
        return 0
    limit = tok.model_max_length
    long = [i for i, p in enumerate(prompts) if len(tok(p, truncation=False).input_ids) > limit]
    if long:
        log.warning("%d prompt(s) exceed the text encoder limit of %d tokens and will be truncated "
                    "by the pipeline (first: %r)", len(long), limit, prompts[long[0]][:80])
    return len(long)


# --------------------------------------------------------------------------- metadata rows
def read_rows(path: Path) -> list[dict]:
    """Rows of a metadata.jsonl; an unreadable (half-written) line is dropped with a warning."""
    rows = []
    if path.is_file():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s:%d: dropping an unreadable metadata line (interrupted write?)", path, n)
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line and fsync it (written only after the image it describes)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finished_rows(out_dir: Path, settings: dict[str, Any], keys: Iterable[str] = RESUME_KEYS) -> dict[str, dict]:
    """Rows of `out_dir/metadata.jsonl` whose image exists, keyed by file name.

    Rows whose image is gone (or unreadable lines) are dropped from the file, atomically, so
    that redoing them does not duplicate rows.

    Raises:
        ValueError: the folder holds results made with other settings (the key is named).
    """
    meta = out_dir / METADATA
    rows = read_rows(meta)
    keep = {}
    for row in rows:
        for k in keys:
            if k in settings and row.get(k) != settings[k]:
                raise ValueError(f"{out_dir}: holds results made with {k}={row.get(k)!r}, this run uses "
                                 f"{k}={settings[k]!r}; choose another output folder or the same settings")
        if (out_dir / row["file"]).is_file():
            keep[row["file"]] = row
    if meta.is_file() and len(keep) != len(meta.read_text(encoding="utf-8").strip().splitlines()):
        text = "".join(json.dumps(r) + "\n" for r in keep.values())
        atomic_write_bytes(meta, text.encode())
    return keep


def png_bytes(image: Any) -> bytes:
    """PNG encoding of a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def tokens_record(pipe: Any, tokens: str | os.PathLike | None) -> dict[str, Any]:
    """The "tokens" / "tokens_sha256" metadata of the tokens currently in effect on `pipe`."""
    handle = attached_handle(pipe)
    if handle is None or not handle.enabled:
        return {"tokens": None, "tokens_sha256": None}
    if tokens is not None:
        return {"tokens": str(tokens), "tokens_sha256": file_sha256(tokens)}
    h = hashlib.sha256()  # in-memory tokens: hash their values so runs stay distinguishable
    for p in handle.tokens.state_dict().values():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return {"tokens": "<in-memory>", "tokens_sha256": h.hexdigest()}


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
        max_sequence_length: SD3 only: T5 prompt length (pipeline default 256; the authors
            trained their SD3 tokens with 512).
        tokens: the tokens file in effect (recorded with its sha256 in the metadata).
        model: model id / folder recorded in the metadata (default: the pipeline's name_or_path).
        progress: show a progress bar.
        call_kwargs: extra keyword arguments for `pipe(...)` (e.g. negative_prompt).
    Returns:
        The metadata rows of every requested image (already finished ones included), in order.
    """
    from . import __version__
    from .io import load_into

    own = None
    if tokens is not None and attached_handle(pipe) is None:
        own = load_into(pipe, tokens)
    try:
        family = describe_model(resolve_denoiser(pipe))["family"]
        d = FAMILY_DEFAULTS[family]
        native = native_resolution(pipe)
        call_kwargs = dict(call_kwargs or {})
        if max_sequence_length is not None:
            if "max_sequence_length" not in inspect.signature(pipe.__call__).parameters:
                raise ValueError(f"--max-sequence-length applies to SD3 pipelines, not {type(pipe).__name__}")
            call_kwargs["max_sequence_length"] = int(max_sequence_length)
        settings = {
            "cfg": float(cfg if cfg is not None else d["cfg"]), "steps": int(steps or d["steps"]),
            "height": int(height or width or native), "width": int(width or height or native),
            "model": model or getattr(pipe.config, "_name_or_path", None) or type(pipe).__name__,
            "max_sequence_length": max_sequence_length, **tokens_record(pipe, tokens), "family": family,
            "dtype": str(pipe.dtype).replace("torch.", ""),
            "softrepa_version": __version__,
        }
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        done = finished_rows(out, settings)
        jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
        for i, p, s in jobs:  # a changed prompt list must not be mistaken for finished work
            row = done.get(image_name(i, s))
            if row is not None and row["prompt"] != p:
                raise ValueError(f"{out}: {row['file']} was made for prompt {row['prompt']!r}, not {p!r}; "
                                 "choose another output folder")
        todo = [j for j in jobs if image_name(j[0], j[2]) not in done]
        if todo:
            warn_long_prompts(pipe, list(dict.fromkeys(p for _, p, _ in todo)))
        _render(pipe, todo, out, settings, max(1, int(batch_size)), progress, call_kwargs, done)
        return [done[image_name(i, s)] for i, _, s in jobs]
    finally:
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
    from tqdm.auto import tqdm

    saved_cfg = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)  # one bar over images, not one per call
    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            # one CPU generator per image: the image depends on its seed only, not on the batch/device
            gens = [torch.Generator().manual_seed(int(s)) for _, _, s in chunk]
            images = pipe(prompt=[p for _, p, _ in chunk], num_inference_steps=settings["steps"],
                          guidance_scale=settings["cfg"], height=settings["height"], width=settings["width"],
                          generator=gens, output_type="pil", **call_kwargs).images
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
        ValueError: no tokens attached and none given.
    """
    from .io import load_into
    from .viz import image_grid

    own = load_into(pipe, tokens) if tokens is not None and attached_handle(pipe) is None else None
    handle = attached_handle(pipe)
    if handle is None:
        raise ValueError("--compare needs soft tokens (--tokens FILE)")
    out = Path(out_dir)
    try:
        handle.enabled = False  # hooks stay, tokens are skipped: the exact vanilla model
        try:
            vanilla = generate_images(pipe, prompts, seeds, out / "vanilla", **kwargs)
        finally:
            handle.enabled = True
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
        rows = [[_open_rgb(out / sub / r["file"]) for r in rows_[k * n:(k + 1) * n]]
                for sub, rows_ in (("vanilla", vanilla), ("tokens", with_tokens))]
        grid = image_grid(rows, row_labels=["vanilla", "tokens"], col_labels=[f"seed {s}" for s in seeds])
        atomic_write_bytes(path, png_bytes(grid))
    return grids


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


__all__ = ["FAMILY_DEFAULTS", "file_sha256", "finished_rows", "generate_comparison", "generate_images",
           "image_name", "native_resolution", "parse_seeds", "parse_size", "read_prompts", "read_rows",
           "warn_long_prompts"]
