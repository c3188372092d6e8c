"""Attach soft tokens to unmodified diffusers models through removable forward hooks.

Nothing of the model is replaced or forked: a forward pre-hook on the denoiser reads the
per-sample timestep and computes the tokens once per call, and hooks on the selected blocks
insert them into the text stream (MM-DiT: prepend + drop from the block's text output; UNet:
after BOS of the cross-attention context). `handle.remove()` removes every hook, after which the
model is the same object with the same parameters and the same outputs, bit for bit.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable

import torch
from torch import nn

from ..tokens import SoftTokens, SoftTokensError, TokenLayout

# Which models currently carry tokens; a weak map so that nothing is stored on the model itself.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, AttachHandle]" = weakref.WeakKeyDictionary()


def resolve_denoiser(model_or_pipeline: Any) -> nn.Module:
    """The denoising network of a pipeline (`.transformer` / `.unet`), or the model itself."""
    for name in ("transformer", "unet"):
        sub = getattr(model_or_pipeline, name, None)
        if isinstance(sub, nn.Module):
            return sub
    if isinstance(model_or_pipeline, nn.Module):
        return model_or_pipeline
    raise SoftTokensError(
        f"cannot find a denoiser in {type(model_or_pipeline).__name__}: expected an "
        "SD3Transformer2DModel, a UNet2DConditionModel or a pipeline with .transformer / .unet"
    )


def describe_model(denoiser: nn.Module) -> dict[str, Any]:
    """Family, architecture and widths of a supported denoiser.

    Returns a dict with keys: family, arch, model_dim, text_dim, depth.
    """
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if isinstance(denoiser, SD3Transformer2DModel):
        cfg = denoiser.config
        return {"family": "sd3", "arch": "mmdit", "model_dim": int(cfg.caption_projection_dim),
                "text_dim": int(cfg.joint_attention_dim), "depth": len(denoiser.transformer_blocks)}
    if isinstance(denoiser, UNet2DConditionModel):
        cfg = denoiser.config
        width = cfg.cross_attention_dim
        if isinstance(width, (list, tuple)):
            if len(set(width)) != 1:
                raise SoftTokensError(f"UNets with per-block cross_attention_dim {list(width)} are not supported")
            width = width[0]
        family = "sdxl" if cfg.addition_embed_type == "text_time" else "sd15"
        return {"family": family, "arch": "unet", "model_dim": int(width), "text_dim": int(width), "depth": 0}
    raise SoftTokensError(
        f"unsupported model {type(denoiser).__name__}: soft tokens attach to SD3Transformer2DModel "
        "(SD3 / SD3.5) and UNet2DConditionModel (SD1.5 / SDXL)"
    )


def check_fits(layout: TokenLayout, denoiser: nn.Module) -> None:
    """Raise `SoftTokensError` naming the first field of `layout` that does not fit `denoiser`."""
    info = describe_model(denoiser)
    if layout.family != info["family"]:
        raise SoftTokensError(f"family: tokens are for '{layout.family}', the model is '{info['family']}'")
    if layout.model_dim != info["model_dim"]:
        what = "caption_projection_dim" if info["arch"] == "mmdit" else "cross_attention_dim"
        raise SoftTokensError(f"model_dim: tokens have width {layout.model_dim}, the model's {what} is {info['model_dim']}")
    if info["arch"] == "mmdit":
        if layout.token_space == "text" and layout.token_dim != info["text_dim"]:
            raise SoftTokensError(
                f"token_dim: text-space tokens have width {layout.token_dim}, the model's "
                f"joint_attention_dim is {info['text_dim']}"
            )
        if layout.token_space == "block" and layout.token_dim != info["model_dim"]:
            raise SoftTokensError(f"token_dim: block-space tokens have width {layout.token_dim}, "
                                  f"the model's caption_projection_dim is {info['model_dim']}")
        if max(layout.layers) >= info["depth"]:
            raise SoftTokensError(
                f"layers: tokens use blocks {list(layout.layers)}, the model has only {info['depth']} transformer blocks"
            )


@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> tuple[str, ...]:
    """Positional parameter names of `cls.forward` (cached: hooks run on every call)."""
    names = list(inspect.signature(cls.forward).parameters)
    return tuple(names[1:])  # drop self


def call_argument(module: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """The value of forward argument `name` in a call, whether passed by position or keyword."""
    if name in kwargs:
        return kwargs[name]
    params = _forward_params(type(module))
    pos = params.index(name) if name in params else len(args)
    return args[pos] if pos < len(args) else None


def replace_argument(module: nn.Module, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """Return (args, kwargs) with argument `name` replaced, wherever the caller passed it."""
    if name in kwargs:
        kwargs = dict(kwargs)
        kwargs[name] = value
        return args, kwargs
    params = _forward_params(type(module))
    pos = params.index(name)
    if pos < len(args):
        args = args[:pos] + (value,) + args[pos + 1:]
    else:
        kwargs = dict(kwargs)
        kwargs[name] = value
    return args, kwargs


class AttachHandle:
    """Result of `attach()`: the removable hooks that carry `tokens` into `model`.

    Use `handle.remove()` (or `with attach(...):`) to restore the model exactly.
    """

    def __init__(self, model: nn.Module, tokens: SoftTokens):
        self.model = model
        self.tokens = tokens
        self.enabled = True
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        # The tokens of the model call in flight, (B, num_sets, m, D). Kept after the call so that
        # activation-checkpoint recomputation in the backward pass sees the same tokens.
        self.current: torch.Tensor | None = None

    def add(self, hook: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append(hook)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Remove every hook; the model is then exactly as before `attach()`."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.current = None
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.active else "removed"
        return f"AttachHandle({type(self.model).__name__}, {state}, {self.tokens.extra_repr()})"


def attach(model_or_pipeline: Any, tokens: SoftTokens) -> AttachHandle:
    """Attach `tokens` to an unmodified diffusers model or pipeline.

    Args:
        model_or_pipeline: `SD3Transformer2DModel`, `UNet2DConditionModel`, or a pipeline holding one
            (e.g. `StableDiffusion3Pipeline`); stock pipelines keep working and use the tokens on
            both classifier-free-guidance branches.
        tokens: a `SoftTokens` whose layout fits the model (checked; errors name the field).
    Returns:
        An `AttachHandle`; `handle.remove()` detaches.
    Raises:
        SoftTokensError: tokens do not fit, or the model already carries tokens.
    """
    denoiser = resolve_denoiser(model_or_pipeline)
    if not isinstance(tokens, SoftTokens):
        raise SoftTokensError(f"expected a SoftTokens module, got {type(tokens).__name__}")
    check_fits(tokens.layout, denoiser)
    prev = _ATTACHED.get(denoiser)
    if prev is not None and prev.active:
        raise SoftTokensError(
            "this model already carries soft tokens; call handle.remove() first "
            "(attaching twice would insert the tokens twice)"
        )
    handle = AttachHandle(denoiser, tokens)
    if tokens.layout.arch == "mmdit":
        from .mmdit import install_mmdit_hooks

        install_mmdit_hooks(denoiser, handle)
    else:
        from .unet import install_unet_hooks

        install_unet_hooks(denoiser, handle)
    _ATTACHED[denoiser] = handle
    return handle


def attached_handle(model_or_pipeline: Any) -> AttachHandle | None:
    """The active handle of a model, or None."""
    h = _ATTACHED.get(resolve_denoiser(model_or_pipeline))
    return h if h is not None and h.active else None


def model_pre_hook(handle: AttachHandle, projection: Callable | None, sample_arg: str) -> Callable:
    """Forward pre-hook for the denoiser: compute this call's tokens from its per-sample timesteps."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not handle.enabled:
            handle.current = None
            return None
        sample = call_argument(module, args, kwargs, sample_arg)
        timestep = call_argument(module, args, kwargs, "timestep")
        if timestep is None:
            raise SoftTokensError(f"{type(module).__name__} was called without a timestep")
        handle.current = handle.tokens(timestep, sample.shape[0], projection=projection,
                                       dtype=sample.dtype, device=sample.device)
        return None

    return hook


__all__ = ["AttachHandle", "attach", "attached_handle", "check_fits", "describe_model", "resolve_denoiser"]
