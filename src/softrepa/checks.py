"""Input checks shared by the entry points: every size bounded before it allocates, every value
meaningful, every file read with a message that names it (issue 26).

The command line, the config and the artefact readers call these *before* they build anything, so
that a small input (a 136-byte option, a 100 KB tokens header, a 20 KB PNG) can never make softrepa
allocate gigabytes, compute a silently wrong result or end in a traceback. Each error is one line
naming the option / file / field, the value and the bound.

The bounds (`LIMITS`) are far above any real use (the paper: 4 tokens, 5 layers, 100 buckets, 1024
pixels, 28-50 steps, 512 text tokens) and far below what would exhaust a machine.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, DatasetError, SoftTokensError, UsageError

#: seeds of one `generate` call (refused above; the seed list is materialised, so this bounds its memory)
MAX_SEEDS = 100_000
#: images of one `generate` call (prompts x seeds)
MAX_IMAGES = 1_000_000
#: image side in pixels (`--size`, `resolution`): 8192 is 8x SD3's native 1024
MAX_SIDE = 8192
#: images per training step (each step evaluates batch^2 image x caption pairs)
MAX_BATCH = 4096
#: sampling / FlowEdit steps
MAX_STEPS = 10_000
#: text length in tokens (`--max-sequence-length`): T5's 512 is the largest a family uses
MAX_TEXT_LENGTH = 4096
#: soft tokens per set, time buckets (t lives on 0..1000), token sets, token / model width
MAX_TOKENS, MAX_BUCKETS, MAX_SETS, MAX_WIDTH = 1024, 1000, 1024, 65536
#: the largest soft-token parameter count a layout may declare (64M floats = 256 MB)
MAX_TOKEN_PARAMS = 1 << 26
#: seeds are 64-bit (torch.Generator.manual_seed)
MAX_SEED = (1 << 64) - 1

LIMITS = {"seeds": MAX_SEEDS, "images": MAX_IMAGES, "side": MAX_SIDE, "steps": MAX_STEPS,
          "text_length": MAX_TEXT_LENGTH, "tokens": MAX_TOKENS, "buckets": MAX_BUCKETS, "sets": MAX_SETS,
          "width": MAX_WIDTH, "token_params": MAX_TOKEN_PARAMS}


# --------------------------------------------------------------------------- numbers
def int_in(value: Any, option: str, lo: int, hi: int | None = None, error: type = UsageError) -> int:
    """`value` as an int in [lo, hi], else `error` naming `option`, the value and the bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{option}: expected an integer, got {value!r}")
    # the side that failed first, with the whole range: "--steps must be >= 1 (1..10000), got 0"
    if value < lo:
        raise error(f"{option} must be >= {lo}{'' if hi is None else f' ({lo}..{hi})'}, got {value}")
    if hi is not None and value > hi:
        raise error(f"{option} must be <= {hi} ({lo}..{hi}), got {value}")
    return value


def finite(value: Any, option: str, *, above: float | None = None, at_least: float | None = None,
           error: type = UsageError) -> float:
    """`value` as a finite float (> `above` / >= `at_least` when given), else `error` naming `option`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(f"{option} must be a finite number, got {value!r}")
    if above is not None and not value > above:
        raise error(f"{option} must be > {above:g}, got {value}")
    if at_least is not None and not value >= at_least:
        raise error(f"{option} must be >= {at_least:g}, got {value}")
    return float(value)


def check_device(device: str | None, option: str = "--device") -> None:
    """A torch device this build and machine have (`cuda:7` on a CPU build is one line, not a traceback)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"{option}: not a torch device: {device!r} (use cpu, cuda, cuda:1, mps)") from e
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{option} {device}: this torch build / machine has no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"{option} {device}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{option} {device}: MPS is not available here; use --device cpu")


def check_sampling_args(args: Any) -> None:
    """The options of generate / edit / diagnose that size or steer the work, before the model loads."""
    check_device(getattr(args, "device", None))
    if getattr(args, "max_sequence_length", None) is not None:
        int_in(args.max_sequence_length, "--max-sequence-length", 1, MAX_TEXT_LENGTH)
    if getattr(args, "steps", None) is not None:
        int_in(args.steps, "--steps", 1, MAX_STEPS)
    for name in ("cfg", "true_cfg", "src_cfg"):
        if getattr(args, name, None) is not None:
            finite(args.__dict__[name], "--" + {"src_cfg": "source-cfg"}.get(name, name.replace("_", "-")))
    if getattr(args, "seed", None) is not None:  # torch.Generator takes 64 bits; more was an OverflowError
        int_in(args.seed, "--seed", -(1 << 63), MAX_SEED)
    if getattr(args, "max_prompts", None) is not None:
        int_in(args.max_prompts, "--max-prompts", 1)


def check_pipeline_size(pipe: Any, height: int, width: int, option: str = "--size") -> None:
    """An image size the loaded model can render: sides multiples of its size multiple and, for
    models with a bounded position table (SD3's `pos_embed_max_size`), within it — diffusers raises a
    bare ValueError deep in the forward otherwise."""
    import math

    from .registry import resolve_denoiser

    # `softrepa.edit.size_multiple`, computed here (edit imports this module): the VAE factor times the
    # patch size, and the image processor's factor (FLUX packs 2 x 2 latents)
    config = resolve_denoiser(pipe).config
    # video pipelines (Wan) name the spatial factor apart and patch (t, h, w): the spatial parts count
    factor = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None)
    if not factor:
        return  # a pipeline that does not say: its own call checks the size
    patch = getattr(config, "patch_size", None) or 1
    patch = max(int(p) for p in patch[-2:]) if isinstance(patch, (list, tuple)) else int(patch)
    multiple = int(factor) * patch
    processor = getattr(getattr(pipe, "image_processor", None), "config", None)
    multiple = math.lcm(multiple, int(getattr(processor, "vae_scale_factor", None) or multiple))
    if height % multiple or width % multiple:
        raise UsageError(f"{option} {height}x{width}: both sides must be multiples of {multiple} for this model")
    table = getattr(config, "pos_embed_max_size", None)
    if table:
        largest = int(table) * patch * int(factor)
        if max(height, width) > largest:
            raise UsageError(f"{option} {height}x{width}: this model renders at most {largest} pixels a side "
                             f"(its pos_embed_max_size {table})")


# --------------------------------------------------------------------------- files
def read_text(path: str | os.PathLike, what: str = "file", error: type = DatasetError) -> str:
    """A UTF-8 text file; a file that is not UTF-8 is one line naming it, the line and the byte."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error(f"{what} {path}: not UTF-8 text (invalid byte on line {line}, byte {e.start}); "
                    "save it as UTF-8") from e


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a mapping that names a key twice (PyYAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}, again on line "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: the stock constructor reports it
            break
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str, source: str, error: type = ConfigError) -> Any:
    """YAML (safe: no tags run code) with duplicate keys refused; errors name `source` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{source}: not valid YAML{where}: {problem}") from e
    except RecursionError as e:
        raise error(f"{source}: YAML nested too deeply") from e


def json_loads(text: str | bytes, source: str, error: type = DatasetError) -> Any:
    """JSON with a deeply nested document (RecursionError) reported like any other malformed one."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        detail = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise error(f"{source}: not valid JSON ({detail})") from e


def check_out_folder(path: str | os.PathLike | None, option: str = "--out") -> None:
    """An output folder that exists as a file is one clear line (not `[Errno 17] File exists`)."""
    if path is None:
        return
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise UsageError(f"{option} {path}: {q} is a file, not a folder; choose another {option}")
            return


def path_problem(path: Path) -> str | None:
    """Why a path cannot name a file at all (too long, a NUL byte), or None (missing is not a problem here)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        return f"unusable image path ({getattr(e, 'strerror', None) or e}): {str(path)[:60]}..."
    return None


# --------------------------------------------------------------------------- images
def image_size_ok(image: Any, path: Any) -> None:
    """Refuse an image whose header declares more pixels than PIL's bomb limit, before it is decoded
    (PIL only warns between 1x and 2x its `MAX_IMAGE_PIXELS`; a 48 KB PNG can declare 400 M pixels)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise DatasetError(f"{path}: {image.width}x{image.height} pixels, above the limit of {limit} "
                           "(PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?)")


def upright_8bit(image: Any) -> Any:
    """A decoded image turned as its EXIF orientation says and in an 8-bit mode, so that
    `.convert("RGB")` keeps its values: 16-bit / 32-bit grayscale is scaled (not clipped to white),
    float images taken as 0..1 (or 0..255 when they go above 1)."""
    import numpy as np
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        else:  # "I" from a 16-bit PNG / TIFF holds 0..65535; 8-bit data in "I" stays as it is
            scale = 1 / 257 if image.mode.startswith("I;16") or (arr.size and arr.max() > 255) else 1.0
        arr = np.nan_to_num(arr * scale, nan=0.0).round().clip(0, 255).astype(np.uint8)
        image = Image.fromarray(arr, mode="L")
    return image


# --------------------------------------------------------------------------- tokens files
def layout_fields(d: Any, source: str) -> None:
    """The JSON layout of a tokens file: types and bounds, checked before anything is built from it."""
    if not isinstance(d, dict):
        raise SoftTokensError(f"{source}: the layout is not a JSON object")

    def whole(name: str, lo: int, hi: int) -> None:
        if name in d:
            int_in(d[name], f"{source}: layout field {name!r}", lo, hi, error=SoftTokensError)

    for name in ("token_dim", "model_dim"):
        whole(name, 1, MAX_WIDTH)
    whole("num_tokens", 1, MAX_TOKENS)
    whole("time_buckets", 0, MAX_BUCKETS)
    whole("model_depth", 0, MAX_SETS)
    for name, kind in (("layers", int), ("blocks", str)):
        value = d.get(name, [])
        if not isinstance(value, list) or len(value) > MAX_SETS or not all(
                isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise SoftTokensError(f"{source}: layout field {name!r} must be a list of at most {MAX_SETS} "
                                  f"{kind.__name__}s, got {str(value)[:80]}")
    if any(not 0 <= v < MAX_SETS for v in d.get("layers", [])):
        raise SoftTokensError(f"{source}: layout field 'layers' holds an index outside 0..{MAX_SETS - 1}")
    for name in ("family", "token_space"):
        if name in d and not isinstance(d[name], str):
            raise SoftTokensError(f"{source}: layout field {name!r} must be a string, got {d[name]!r}")


def tensor_shapes(path: str | os.PathLike, expected: dict[str, tuple[int, ...] | None]) -> None:
    """Compare a safetensors file's own tensor shapes and dtypes (read from its header, nothing
    loaded) with what the layout expects, before anything of that size is allocated.

    Args:
        path: the file.
        expected: tensor name -> shape, or None where the layout has no such tensor.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for name, shape in expected.items():
            if shape is None:
                if name in names:
                    raise SoftTokensError(f"{path}: field {name!r} present but layout says time_buckets=0")
                continue
            if name not in names:
                raise SoftTokensError(f"{path}: missing tensor {name!r}")
            part = f.get_slice(name)
            got = tuple(part.get_shape())
            if got != shape:
                raise SoftTokensError(f"{path}: tensor {name!r} has shape {got}, layout expects {shape}")
            dtype = str(part.get_dtype())
            if dtype not in ("F16", "BF16", "F32", "F64"):
                raise SoftTokensError(f"{path}: tensor {name!r} is {dtype}, expected floating point (F32); "
                                      "token values are never cast from integers or booleans")


__all__ = ["image_size_ok", "upright_8bit", "LIMITS", "MAX_IMAGES", "MAX_SEEDS", "MAX_SIDE", "MAX_STEPS", "MAX_TEXT_LENGTH", "check_device", "check_pipeline_size",
           "check_out_folder", "check_sampling_args", "finite", "int_in", "json_loads", "layout_fields",
           "load_yaml", "path_problem", "read_text", "tensor_shapes"]
