"""Shared pieces of the evaluation metrics: errors, weight resolution, image preprocessing.

Weights. Every metric names its weights in `metrics.yaml` as either a local path (file or folder)
or a Hugging Face hub id. `resolve_file` / `resolve_pretrained` turn that into something loadable
and, when they cannot, raise `WeightsError` with the file or id, the URL where it is published and
(for hub ids) whether the machine is offline. A value with a file suffix (.pt, .pth, .safetensors,
...), a ./ ../ / ~ prefix or more than one "/" is always a local path, reported as "local path not
found" (with the absolute path and the current directory relative paths are read from) when it is
missing; only a bare "org/name" is tried as a hub id. Nothing is ever substituted: a metric whose
weights are missing fails, the evaluator records the failure and moves on to the next metric.

Checkpoints published as pickles (`.pt` / `.pth`) are read with `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers, so a tampered file cannot run code.

Preprocessing. torchvision does not import beside the CPU torch build we pin, so the transforms the
reference implementations use (`Resize(n, BICUBIC)` + `CenterCrop(n)` + `ToTensor` + `Normalize`
in OpenAI CLIP, open_clip, ImageReward; `Resize((299, 299))` in the SoftREPA authors' LPIPS) are
reproduced here on PIL images with torchvision's exact size / crop arithmetic (for PIL inputs
torchvision itself calls `PIL.Image.resize`, so the pixels are the same). Two reference
pipelines differ from that one and are reproduced as they are:

* HPSv2 (`hpsv2` 1.2.0, `image_transform(..., resize_longest_max=True)`): `ToTensor` first, then
  `ResizeMaxSize(224)`: the longest side to 224 (new sides `round(side * 224 / longest)`, Python
  rounding) by torchvision's tensor bicubic resize (antialias on, no clamp), then zero padding
  (black, before normalisation) to a square, `pad // 2` on the left / top and the rest on the
  right / bottom. See `letterbox_pixels`.
* PickScore (transformers' `CLIPImageProcessor`): the same shorter-side resize, but the centre
  crop's offset is floored (`(h - 224) // 2`) where torchvision rounds. `center_crop(offset="floor")`.

Text. The official CLIP tokenizers (OpenAI `clip.tokenize`, which ImageReward's CLIPScore calls,
and open_clip's, which hpsv2 calls) clean the text before BPE: `ftfy.fix_text`, `html.unescape`
twice, strip, runs of whitespace to one space, lower case. transformers' CLIP tokenizers do not;
`clean_text` applies the official cleaning first, so the token ids are the official ones.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, MetricError, UsageError, WeightsError  # the one error hierarchy (softrepa.errors)

#: OpenAI CLIP's normalisation, also used by open_clip's LAION models, PickScore and ImageReward.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)




def hub_offline(cfg: dict | None = None) -> bool:
    """Whether hub ids may only be read from the local cache.

    Args:
        cfg: the metrics config; its `offline` key is true / false / "auto" (auto: honour the
            HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE environment variables).
    """
    flag = (cfg or {}).get("offline", "auto")
    if isinstance(flag, bool):
        return flag
    env = (os.environ.get("HF_HUB_OFFLINE", "") + os.environ.get("TRANSFORMERS_OFFLINE", "")).lower()
    return any(v in env for v in ("1", "true", "yes", "on"))


#: Suffixes of checkpoint / config files. A value ending in one is a local file, never a hub repo id.
#: (Only these: hub names themselves may hold dots, e.g. "stable-diffusion-3.5-large".)
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".pickle", ".npz", ".npy", ".json",
                  ".yaml", ".yml", ".txt", ".onnx", ".h5", ".msgpack", ".gguf")


def _is_local_path(spec: str) -> bool:
    """Whether a weights entry can only mean a path on this machine (it is never tried as a hub id).

    Hub ids are exactly "org/name". A file suffix, a ./ ../ / ~ prefix (or any leading dot), a
    backslash or more than one "/" (e.g. "weights/ImageReward/ImageReward.pt") rule that out, so a
    missing file is reported as a missing file instead of as an unavailable hub repo.

    Args:
        spec: the metrics.yaml value (after `~` expansion).
    """
    return (spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1
            or Path(spec).suffix.lower() in _FILE_SUFFIXES)


def _looks_like_hub_id(spec: str) -> bool:
    # "org/name" (one slash, both parts non-empty) that is neither local-path-shaped nor on this machine.
    if _is_local_path(spec) or Path(spec).exists():
        return False
    parts = spec.split("/")
    return len(parts) == 2 and all(parts)


def _cwd_note() -> str:
    # Relative metrics.yaml paths are opened from the directory `softrepa evaluate` runs in, not the
    # yaml's folder; saying so is the usual fix for "the file is right there".
    return f"relative paths are relative to the current directory {Path.cwd()}"


def _local_missing(spec: str) -> str:
    """The message for a local path that does not exist (absolute, with the cwd rule)."""
    return f"local path not found: {os.path.abspath(spec)} ({_cwd_note()})"


def _no_local_folder(spec: str) -> str:
    """Appended when an "org/name" value failed as a hub id: it was not a local folder either."""
    return f"no local folder {os.path.abspath(spec)} exists either ({_cwd_note()})"


def _offline_note(offline: bool) -> str:
    return ("this machine is offline (HF_HUB_OFFLINE / `offline: true` in metrics.yaml), so hub ids are "
            "only read from the local Hugging Face cache" if offline else
            "the download failed (is the machine offline?)")


def resolve_file(spec: str | os.PathLike | None, *, metric: str, what: str, filename: str | None = None,
                 url: str, offline: bool) -> Path:
    """Turn a weights entry into a local file path, or raise `WeightsError`.

    Args:
        spec: a local file, a folder holding `filename`, or a hub repo id ("org/name") holding
            `filename`; relative paths are read from the current directory.
        metric: metric name, for the message.
        what: what the file is (e.g. "ImageReward checkpoint"), for the message.
        filename: the file inside a folder / hub repo.
        url: where the file is published, for the message.
        offline: only read hub ids from the local cache.
    Returns:
        Path of an existing file.
    """
    hint = f"download it from {url} and set its local path in metrics.yaml"
    if spec is None or str(spec).strip() == "":
        raise WeightsError(f"{metric}: no {what} configured; {hint}")
    spec = os.path.expanduser(str(spec))
    p = Path(spec)
    if p.is_file():
        return p
    if p.is_dir():
        if filename and (p / filename).is_file():
            return p / filename
        raise WeightsError(f"{metric}: {what} {filename!r} not found in folder {p}; {hint}")
    if _looks_like_hub_id(spec) and filename:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec, filename, local_files_only=offline))
        except Exception as e:  # noqa: BLE001 - every hub failure becomes one clear message
            raise WeightsError(f"{metric}: {what} {filename!r} from hub repo {spec!r} is not available: "
                               f"{_offline_note(offline)}; {_no_local_folder(spec)}; {hint} "
                               f"({type(e).__name__})") from e
    raise WeightsError(f"{metric}: {what}: {_local_missing(spec)}; {hint}")


def resolve_pretrained(loader, spec: str | None, *, metric: str, what: str, url: str, offline: bool, **kw):
    """Call `loader(spec, ...)` (a transformers `from_pretrained`) with a clear error on failure.

    Args:
        loader: e.g. `CLIPModel.from_pretrained`.
        spec: local folder (relative to the current directory) or hub id ("org/name").
        metric, what, url: for the message.
        offline: pass `local_files_only=True` for hub ids.
        **kw: extra keyword arguments for the loader.
    """
    hint = f"it is published at {url}; download it and set the local folder in metrics.yaml"
    if not spec:
        raise WeightsError(f"{metric}: no {what} configured; {hint}")
    spec = os.path.expanduser(str(spec))
    local = Path(spec).is_dir()
    if not local and Path(spec).exists():
        raise WeightsError(f"{metric}: {what} must be a folder (from_pretrained layout), not the file "
                           f"{os.path.abspath(spec)}; {hint}")
    if not local and not _looks_like_hub_id(spec):
        raise WeightsError(f"{metric}: {what} folder: {_local_missing(spec)}; {hint}")
    try:
        return loader(spec, local_files_only=offline or local, **kw)
    except Exception as e:  # noqa: BLE001
        where = (f"folder {spec}" if local else
                 f"hub id {spec!r} ({_offline_note(offline)}; {_no_local_folder(spec)})")
        raise WeightsError(f"{metric}: could not load {what} from {where}; {hint} "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e


def load_state_dict(path: Path, *, metric: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint's state dict safely (safetensors, or a pickle with `weights_only=True`).

    Args:
        path: checkpoint file.
        metric: for the message.
        key: take `checkpoint[key]` when the file wraps the state dict (e.g. HPSv2's "state_dict").
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{metric}: cannot read {path} as a tensor-only checkpoint: {e}") from e
    if key is not None and isinstance(sd, dict) and key in sd:
        sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{metric}: {path} does not hold a state dict of tensors")
    return sd


def check_keys(sd: dict, expected: dict[str, tuple], *, metric: str, path: Any) -> None:
    """Fail with a readable message when a converted state dict differs from the model's.

    Args:
        sd: converted state dict.
        expected: key -> shape the model needs.
        metric, path: for the message.
    """
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    bad = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    if missing or extra or bad:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[:3]})" if extra else "",
                 "shape mismatch: " + ", ".join(f"{k} {tuple(sd[k].shape)} != {tuple(expected[k])}"
                                                for k in bad[:3]) if bad else ""]
        raise WeightsError(f"{metric}: {path} does not match the architecture: "
                           + "; ".join(p for p in parts if p))


def load_on_meta(factory, sd: dict[str, torch.Tensor], *, metric: str, path: Any) -> torch.nn.Module:
    """Build `factory()` on the meta device and move the checkpoint's tensors in (no random init).

    Large scorers (ViT-H, ViT-L + BERT) would spend tens of seconds and a second copy of their
    memory on a random initialisation that the checkpoint overwrites; building on "meta" and
    assigning the loaded tensors avoids both. Keys and shapes are checked first (`check_keys`);
    non-persistent buffers (transformers' `position_ids` aranges) are rebuilt afterwards.

    Args:
        factory: zero-argument callable returning the module.
        sd: converted state dict (keys exactly the module's persistent state).
        metric, path: for messages.
    """
    with torch.device("meta"):
        model = factory()
    persistent = model.state_dict()
    check_keys(sd, {k: tuple(v.shape) for k, v in persistent.items()}, metric=metric, path=path)
    model.load_state_dict(sd, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise WeightsError(f"{metric}: buffer {name} is not in {path} and cannot be rebuilt")
            owner, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(owner), attr, torch.arange(buf.shape[-1]).expand(buf.shape).clone())
    return model.float()


# ---------------------------------------------------------------------------------------- images

def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB (fully read, file closed).

    Raises:
        MetricError: a file that is not a complete image (truncated, not an image), named.
    """
    from ..checks import image_size_ok, upright_8bit
    from ..errors import DatasetError

    try:
        with Image.open(path) as im:
            image_size_ok(im, path)  # a bomb is refused before decoding
            im.load()
            return upright_8bit(im).convert("RGB")  # EXIF orientation; 16-bit grayscale scaled, not white
    except (OSError, SyntaxError, ValueError, DatasetError, Image.DecompressionBombError) as e:  # PIL: UnidentifiedImageError / "image file is truncated"
        raise MetricError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def resize_shorter(img: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """torchvision `Resize(size)` on a PIL image: shorter side to `size`, longer side truncated."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), resample)


def crop_offset(extent: int, size: int, offset: str = "round") -> int:
    """Start of a centred `size` window in `extent` pixels.

    Args:
        extent: the image side.
        size: the crop side.
        offset: "round" = torchvision `CenterCrop` (`int(round((extent - size) / 2))`, Python's
            round half to even); "floor" = transformers' image processors (`(extent - size) // 2`).
    """
    if offset == "round":
        return int(round((extent - size) / 2.0))
    if offset == "floor":
        return (extent - size) // 2
    raise ConfigError(f"crop offset must be 'round' or 'floor', got {offset!r}")


def center_crop(img: Image.Image, size: int, offset: str = "round") -> Image.Image:
    """A centred `size` x `size` crop for images at least `size` on each side.

    Args:
        img: PIL image.
        size: crop side.
        offset: "round" (torchvision `CenterCrop`) or "floor" (transformers' `CLIPImageProcessor`).
    """
    w, h = img.size
    top, left = crop_offset(h, size, offset), crop_offset(w, size, offset)
    return img.crop((left, top, left + size, top + size))


def letterbox_geometry(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """hpsv2's `ResizeMaxSize(size)`: the resized (width, height) and the padding (left, top, right, bottom).

    The longest side becomes `size`, each side `round(side * size / longest)` (Python's round, as
    the reference); the padding centres the image, the odd pixel going to the right / bottom.
    Unlike the reference, an image whose longest side already is `size` is still padded to a
    square (the reference returns it unpadded, which its ViT cannot take unless it is square).

    Args:
        width, height: input size.
        size: output side.
    """
    if width < 1 or height < 1 or size < 1:
        raise UsageError(f"letterbox: sizes must be positive, got {width}x{height} -> {size}")
    scale = size / float(max(height, width))
    new_h, new_w = (round(height * scale), round(width * scale)) if scale != 1.0 else (height, width)
    pad_h, pad_w = size - new_h, size - new_w
    return (new_w, new_h), (pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2)


def letterbox_pixels(images: Sequence[Image.Image], size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """HPSv2's evaluation transform (`preprocess_val` of hpsv2 1.2.0), batched.

    `ToTensor` -> bicubic resize of the tensor (torchvision's tensor path: `interpolate(...,
    mode="bicubic", antialias=True)`, no clamp) so the longest side is `size` -> zero padding to
    `size` x `size` (`letterbox_geometry`) -> normalisation (padding becomes -mean / std).

    Args:
        images: RGB PIL images.
        size: model input side (224).
        mean, std: per-channel normalisation.
    Returns:
        (B, 3, size, size) float tensor.
    """
    import torch.nn.functional as F

    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    out = []
    for im in images:
        x = to_tensor(im)
        (new_w, new_h), (left, top, right, bottom) = letterbox_geometry(im.width, im.height, size)
        if (new_w, new_h) != (im.width, im.height):
            x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[0]
        x = F.pad(x, (left, right, top, bottom), value=0.0)
        out.append((x - m) / s)
    return torch.stack(out)


def clean_text(text: str) -> str:
    """The official CLIP tokenizers' text cleaning (OpenAI CLIP / open_clip `simple_tokenizer`).

    `ftfy.fix_text`, `html.unescape` twice and strip (their `basic_clean`), runs of whitespace to
    one space and strip (`whitespace_clean`), lower case. Curly quotes become straight ones,
    `&amp;` becomes `&`, mojibake is repaired, text is NFC-normalised.

    Args:
        text: the prompt.
    """
    try:
        import ftfy
    except ImportError as e:  # a core dependency; only a broken install lands here
        raise MetricError("text cleaning needs the `ftfy` package (pip install ftfy), as the official "
                          "CLIP tokenizers use it") from e
    if not isinstance(text, str):
        raise MetricError(f"prompt must be a string, got {type(text).__name__}")
    try:  # the reference tokenizers' `re` is the `regex` module (a transformers dependency)
        import regex as rx
    except ImportError:  # pragma: no cover
        rx = re
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return rx.sub(r"\s+", " ", text).strip().lower()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision `ToTensor`: HxWx3 uint8 -> 3xHxW float in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)


def clip_pixels(images: Sequence[Image.Image], size: int, mean=CLIP_MEAN, std=CLIP_STD,
                crop_offset: str = "round") -> torch.Tensor:
    """The CLIP / open_clip / ImageReward evaluation transform, batched.

    Args:
        images: RGB PIL images.
        size: model input side (224 for the models used here).
        mean, std: per-channel normalisation.
        crop_offset: "round" (torchvision `CenterCrop`: OpenAI CLIP, ImageReward) or "floor"
            (transformers' `CLIPImageProcessor`: PickScore).
    Returns:
        (B, 3, size, size) float tensor.
    """
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return torch.stack([(to_tensor(center_crop(resize_shorter(im, size), size, crop_offset)) - m) / s
                        for im in images])


def batched(seq: Sequence, batch_size: int, desc: str | None = None) -> Iterator[Sequence]:
    """Consecutive slices of `seq` with a tqdm progress bar (to stderr).

    Args:
        seq: the items.
        batch_size: items per slice (>= 1).
        desc: progress bar label; None disables the bar.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    bar = tqdm(total=len(seq), desc=desc, unit="img", disable=desc is None, leave=False)
    try:
        for i in range(0, len(seq), batch_size):
            chunk = seq[i:i + batch_size]
            yield chunk
            bar.update(len(chunk))
    finally:
        bar.close()


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """"float32" / "float16" / "bfloat16" (or a dtype) -> torch dtype; None -> float32."""
    if isinstance(name, torch.dtype):
        return name
    table = {None: torch.float32, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise UsageError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return table[name]


__all__ = ["CLIP_MEAN", "CLIP_STD", "MetricError", "WeightsError", "batched", "center_crop", "check_keys",
           "clean_text", "clip_pixels", "crop_offset", "hub_offline", "letterbox_geometry", "letterbox_pixels",
           "load_on_meta", "load_rgb", "load_state_dict", "resize_shorter", "resolve_file", "resolve_pretrained",
           "to_tensor", "torch_dtype"]
