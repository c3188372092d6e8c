"""Safe soft-token artefacts: a safetensors file whose metadata holds the JSON layout.

`tokens.safetensors` holds `base` (num_sets, m, token_dim) and, when present, `time`
(buckets, num_sets, model_dim), both fp32; its header metadata holds `softrepa_layout` (JSON) and
`softrepa_version`. A readable copy of the layout is written beside it as `tokens.json`.
Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .hooks import AttachHandle, attach
from .errors import SoftTokensError
from .family import resolve_denoiser
from .runfolder import atomic_write_bytes
from .tokens import SoftTokens, TokenLayout

LAYOUT_KEY = "softrepa_layout"
VERSION_KEY = "softrepa_version"


def save_soft_tokens(tokens: SoftTokens, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Save tokens as safetensors (+ a `.json` copy of the layout), atomically.

    Args:
        tokens: the `SoftTokens` to save.
        path: target file; `.safetensors` is appended when missing.
        extra_metadata: more string key/values for the safetensors header (e.g. training step).
    Returns:
        The path written.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    tensors = {"base": tokens.base.detach().float().cpu().contiguous()}
    if tokens.time is not None:
        tensors["time"] = tokens.time.detach().float().cpu().contiguous()
    meta = {LAYOUT_KEY: json.dumps(tokens.layout.to_dict()), VERSION_KEY: __version__}
    meta.update(extra_metadata or {})
    atomic_write_bytes(path, save(tensors, metadata=meta))
    sidecar = {"layout": tokens.layout.to_dict(), "softrepa_version": __version__,
               "parameters": sum(t.numel() for t in tensors.values())}
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(sidecar, indent=2) + "\n").encode())
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of a tokens file (clear errors for bad files)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SoftTokensError(f"{path}: no such tokens file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error type for every malformed header
        raise SoftTokensError(
            f"{path}: not a readable safetensors file ({e}). If this is one of the paper authors' "
            "released .pth files, convert it with `softrepa import-official`."
        ) from e


def load_soft_tokens(path: str | os.PathLike, device: str | torch.device | None = None) -> SoftTokens:
    """Load tokens saved by `save_soft_tokens`.

    Args:
        path: the `.safetensors` file.
        device: where to put the parameters (default CPU).
    Raises:
        SoftTokensError: missing, truncated or non-safetensors file; missing/invalid layout;
            tensor shapes that disagree with the layout (the message names the field).
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    if LAYOUT_KEY not in meta:
        raise SoftTokensError(f"{path}: safetensors file has no '{LAYOUT_KEY}' metadata; not a softrepa tokens file")
    try:
        layout = TokenLayout.from_dict(json.loads(meta[LAYOUT_KEY]))
    except (json.JSONDecodeError, TypeError) as e:
        raise SoftTokensError(f"{path}: invalid '{LAYOUT_KEY}' metadata: {e}") from e
    except SoftTokensError as e:
        raise SoftTokensError(f"{path}: {e}") from e
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise SoftTokensError(f"{path}: cannot read tensors ({e}); the file may be truncated") from e
    tokens = SoftTokens(layout)
    _check_shape(path, "base", tensors.get("base"), tuple(tokens.base.shape))
    expected_time = None if tokens.time is None else tuple(tokens.time.shape)
    if expected_time is None and "time" in tensors:
        raise SoftTokensError(f"{path}: field 'time' present but layout says time_buckets=0")
    if expected_time is not None:
        _check_shape(path, "time", tensors.get("time"), expected_time)
    with torch.no_grad():
        tokens.base.copy_(tensors["base"])
        if tokens.time is not None:
            tokens.time.copy_(tensors["time"])
    return tokens.to(device) if device is not None else tokens


def _check_shape(path: Path, name: str, tensor: torch.Tensor | None, expected: tuple[int, ...]) -> None:
    if tensor is None:
        raise SoftTokensError(f"{path}: missing tensor '{name}'")
    if tuple(tensor.shape) != expected:
        raise SoftTokensError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, layout expects {expected}")
    if not torch.isfinite(tensor).all():
        raise SoftTokensError(f"{path}: tensor '{name}' holds NaN/inf values")


def load_into(pipeline: Any, path: str | os.PathLike) -> AttachHandle:
    """Load a tokens file and attach it to a pipeline (or model) in one call.

    Args:
        pipeline: a stock diffusers pipeline (or its transformer / UNet).
        path: tokens `.safetensors`.
    Returns:
        The `AttachHandle`; `handle.remove()` detaches.

    Example:
        >>> pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
        >>> handle = softrepa.load_into(pipe, "tokens.safetensors")
        >>> image = pipe("two cats and a red ball").images[0]     # the stock call, with the tokens
        >>> handle.remove()                                        # the stock model again, bit for bit
    """
    denoiser = resolve_denoiser(pipeline)
    try:
        device = next(denoiser.parameters()).device
    except StopIteration:
        device = None
    tokens = load_soft_tokens(path, device=device)
    try:
        return attach(pipeline, tokens)
    except SoftTokensError as e:
        raise SoftTokensError(f"{path}: {e}") from e
