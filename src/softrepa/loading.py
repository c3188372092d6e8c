"""Load a diffusers pipeline with soft tokens attached: the loader of `generate`, `edit` and the web page.

`load_model` checks everything cheap first (a local model folder that holds no pipeline, a tokens
file that does not parse, CPU offload without CUDA), then loads the stock pipeline, places it
(device, dtype, optional model CPU offload and VAE tiling / slicing), attaches the tokens and
optionally compiles the denoiser's repeated blocks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

#: dtype names softrepa accepts, short and long spellings alike.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16", "float": "fp32"}


def dtype_key(value: str) -> str | None:
    """A dtype spelling -> its short name (fp32 / fp16 / bf16), or None when it is none of them."""
    key = DTYPE_ALIASES.get(value.lower(), value.lower())
    return key if key in DTYPES else None


def resolve_device_dtype(device: str | torch.device | None = None,
                         dtype: str | torch.dtype | None = None) -> tuple[str, torch.dtype]:
    """The device and weights dtype to load with.

    Args:
        device: a torch device (default: cuda when available, else cpu).
        dtype: a `torch.dtype` or a name (fp32 / fp16 / bf16, float32 / float16 / bfloat16);
            default fp16 on CUDA, fp32 elsewhere.
    Raises:
        UsageError: an unknown dtype name.
    """
    device = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        return device, torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return device, dtype
    key = dtype_key(str(dtype))
    if key is None:
        raise UsageError(f"dtype: expected one of fp32, fp16, bf16 (or float32, float16, bfloat16), got {dtype!r}")
    return device, DTYPES[key]


def check_model(model: str) -> None:
    """Fail in milliseconds, before anything heavy loads, on a local model folder that is not one.

    Raises:
        FileNotFoundError: a local path without a `model_index.json`.
    """
    from .pipeline import INDEX_FILES, resolve_model_path

    path = resolve_model_path(model)
    looks_local = Path(path).exists() or path.startswith((".", "/", "~")) or re.search(r"[\\/].*[\\/]", path)
    if looks_local and not any((Path(path).expanduser() / index).is_file() for index in INDEX_FILES):
        raise FileNotFoundError(f"--model {model}: no diffusers pipeline there (no model_index.json or "
                                "modular_model_index.json)")


def _modular_folder(model: str) -> bool:
    """A local folder holding only a modular pipeline (`modular_model_index.json`, no `model_index.json`)."""
    from .pipeline import INDEX_FILES, resolve_model_path

    path = Path(resolve_model_path(model)).expanduser()
    return (path / INDEX_FILES[1]).is_file() and not (path / INDEX_FILES[0]).is_file()


def quiet_loading_bars() -> None:
    """Silence diffusers' / transformers' "Loading ..." progress bars."""
    import diffusers.utils.logging as dlog  # here: importing diffusers costs seconds, `--help` must not
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def load_model(model: str, *, tokens: str | Path | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, cpu_offload: bool = False, compile: bool = False,
               vae_tiling: bool = False, vae_slicing: bool = False, progress: bool = True,
               uncond_tokens: str = "positive") -> tuple[Any, Any]:
    """Load a diffusers pipeline and attach soft tokens to it.

    Args:
        model: hub id, local pipeline folder or `@assets/toy_sd3` (a bundled miniature).
        tokens: soft tokens: a `.safetensors` file, a run folder or a Hub reference
            `owner/name[@revision][:file.safetensors]`; None for the vanilla model.
        device: torch device (default: cuda when available, else cpu).
        dtype: weights dtype, a `torch.dtype` or fp32 / fp16 / bf16 (default: fp16 on CUDA, fp32 on CPU).
        cpu_offload: model CPU offload (accelerate): the weights stay on the CPU and each model
            moves to `device` while it runs (needs a CUDA device).
        compile: regional `torch.compile` of the denoiser's repeated blocks (`compile_blocks`).
        vae_tiling, vae_slicing: decode large images tile by tile / a batch one image at a time.
        progress: False silences the libraries' "Loading ..." progress bars.
        uncond_tokens: what the unconditional CFG branch carries ("positive", "negative", "none";
            see `softrepa.load_into`).
    Returns:
        (pipeline, attach handle or None without tokens).
    Raises:
        UsageError: CPU offload without a CUDA device, an unknown dtype name;
        FileNotFoundError: the model cannot be loaded; SoftTokensError: tokens that do not parse
        or do not fit the model (both checked before the slow model load where possible).

    Example:
        >>> import softrepa
        >>> pipe, handle = softrepa.load_model("stabilityai/stable-diffusion-3-medium-diffusers",
        ...                                    tokens="runs/sd3/tokens.safetensors", dtype="fp16")
        >>> image = pipe("a red cube on top of a blue sphere").images[0]   # with the tokens
        >>> with handle.disabled():                                         # the vanilla model
        ...     vanilla = pipe("a red cube on top of a blue sphere").images[0]
    """
    from .artifact import load_into, load_soft_tokens, token_sets_of
    from .branches import check_choice
    from .compilation import compile_blocks
    from .pipeline import load_pipeline

    device, torch_dtype = resolve_device_dtype(device, dtype)
    if cpu_offload and not device.startswith("cuda"):
        raise UsageError("--cpu-offload needs a CUDA --device")
    check_model(model)
    check_choice(uncond_tokens)
    if cpu_offload and _modular_folder(model):  # refused before minutes of loading
        raise UsageError(f"--cpu-offload: {model} is a modular pipeline, which has no model CPU offload; load it "
                         "with a diffusers ComponentsManager (enable_auto_cpu_offload) and attach with "
                         "softrepa.load_into")
    if tokens:
        load_soft_tokens(tokens)  # a bad tokens file fails before the (slow) model load
        if uncond_tokens == "negative" and "negative" not in token_sets_of(tokens)[1:]:
            raise UsageError(f"{tokens}: --uncond-tokens negative needs a file with a 'negative' token set (an "
                             f"AGSM run's tokens.safetensors); this one holds {', '.join(token_sets_of(tokens))}")
    elif uncond_tokens != "positive":
        raise UsageError(f"--uncond-tokens {uncond_tokens} needs --tokens")
    if not progress:
        quiet_loading_bars()
    # with offload the weights stay on the CPU and accelerate moves each model in when it runs
    pipe = load_pipeline(model, torch_dtype, "cpu" if cpu_offload else device)
    if cpu_offload:
        if not hasattr(pipe, "enable_model_cpu_offload"):  # a modular pipeline offloads through its ComponentsManager
            raise UsageError(f"--cpu-offload: {type(pipe).__name__} has no model CPU offload; load it with a diffusers "
                             "ComponentsManager (enable_auto_cpu_offload) and attach with softrepa.load_into")
        pipe.enable_model_cpu_offload(device=device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    handle = load_into(pipe, tokens, uncond_tokens=uncond_tokens) if tokens else None
    if compile:
        compile_blocks(pipe)
    return pipe, handle


__all__ = ["DTYPES", "check_model", "dtype_key", "load_model", "quiet_loading_bars", "resolve_device_dtype"]
