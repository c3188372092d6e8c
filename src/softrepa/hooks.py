"""Attach soft tokens to unmodified diffusers models through removable forward hooks.

Nothing of the model is replaced or forked: the model's family installs, through its placement
template (`softrepa.templates`), a forward pre-hook on the denoiser, which computes the tokens once
per call from the per-sample timesteps, and hooks on the selected blocks that insert them into the text.
`handle.remove()` removes every hook, after which the model is the same object with the same
parameters and the same outputs, bit for bit. This module knows no family: the handle and the
forward-argument helpers live here, the three templates in `softrepa.templates`, the per-family data
in `softrepa/families/`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import SoftTokensError
from .registry import family_of, resolve_denoiser
from .tokens import SoftTokens

# Which models currently carry tokens; a weak map so that nothing is stored on the model itself.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, AttachHandle]" = weakref.WeakKeyDictionary()


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

    Use `handle.remove()` (or `with attach(...):`) to restore the model exactly, and
    `with handle.disabled():` to run the exact vanilla model without removing anything.
    """

    def __init__(self, model: nn.Module, tokens: SoftTokens):
        self.model = model
        self.tokens = tokens
        self.enabled = True
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._removers: list[Callable[[], None]] = []
        # The tokens of the model call in flight, (B, num_sets, m, D). Kept after the call so that
        # activation-checkpoint recomputation in the backward pass sees the same tokens.
        self.current: torch.Tensor | None = None
        # What the unconditional CFG branch carries (`softrepa.branches`): "positive" = `tokens`,
        # "negative" = `uncond_tokens` (AGSM's psi-), "none" = nothing (the vanilla model).
        self.uncond_mode = "positive"
        self.uncond_tokens: SoftTokens | None = None
        self.rows_rule: Callable[[int], torch.Tensor | None] | None = None  # the pipeline's rows
        self.rows_override: torch.Tensor | None = None  # rows named by the caller (`uncond_rows`)
        self.branch: str | None = None  # the diffusers cache-context name of the call in flight
        self.uncond_calls = 0  # model calls that had unconditional rows (to tell a choice that did nothing)
        self.splitting = False  # a "none" call split in two is in flight (its rows are conditional)

    def add(self, hook: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append(hook)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    @contextlib.contextmanager
    def disabled(self) -> Iterator["AttachHandle"]:
        """Within the block the hooks stay but skip the tokens: the model is exactly the vanilla one.

        Example:
            >>> with handle.disabled():
            ...     vanilla = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
        """
        before = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = before

    @contextlib.contextmanager
    def carrying(self, tokens: SoftTokens) -> Iterator["AttachHandle"]:
        """Within the block the hooks insert `tokens` instead of the attached ones (same layout);
        how a trainer evaluates pairs under another token set or its EMA copy without re-attaching.

        Raises:
            SoftTokensError: `tokens` has another layout than the attached tokens.

        Example:
            >>> with handle.carrying(ema_tokens):
            ...     reference = backbone.denoise(x_t, t, cond)
        """
        if tokens.layout != self.tokens.layout:
            raise SoftTokensError("carrying: the tokens' layout differs from the attached tokens' "
                                  f"({tokens.layout} vs {self.tokens.layout})")
        before = self.tokens
        self.tokens = tokens
        try:
            yield self
        finally:
            self.tokens = before

    def uncond_mask(self, batch: int) -> torch.Tensor | None:
        """(batch,) bool: the unconditional rows of the call in flight, or None (none known)."""
        if self.rows_override is not None:
            if self.rows_override.numel() != batch:
                raise SoftTokensError(f"uncond_rows names {self.rows_override.numel()} rows for a call of {batch}")
            return self.rows_override
        return self.rows_rule(batch) if self.rows_rule is not None else None

    @contextlib.contextmanager
    def uncond_rows(self, mask: torch.Tensor) -> Iterator["AttachHandle"]:
        """Within the block the model calls' unconditional rows are `mask` (B,) bool, whatever the
        pipeline says: how a caller that builds its own CFG rows (FlowEdit) applies `uncond_mode`.

        Example:
            >>> with handle.uncond_rows(torch.arange(2 * b) < b):   # [uncond; cond]
            ...     v = backbone.denoise(torch.cat([x, x]), t, cond)
        """
        before = self.rows_override
        self.rows_override = mask.bool().reshape(-1).cpu()
        try:
            yield self
        finally:
            self.rows_override = before

    def add_remover(self, fn: Callable[[], None]) -> None:
        """Something other than a torch hook to undo at `remove()` (the cache-context probe)."""
        self._removers.append(fn)

    def remove(self) -> None:
        """Remove every hook; the model is then exactly as before `attach()`."""
        for fn in reversed(self._removers):
            fn()
        self._removers.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.current = None
        for model in [m for m, h in _ATTACHED.items() if h is self]:  # every denoiser it was installed on
            del _ATTACHED[model]

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
        model_or_pipeline: a denoiser of a registered family (`softrepa.family.family_names()`) or a
            pipeline holding one (e.g. `StableDiffusion3Pipeline`);
            stock pipelines keep working and use the tokens on both classifier-free-guidance branches.
            The tokens reach every denoiser the family names (`Family.denoisers`: both experts of a
            Wan 2.2 A14B pipeline).
        tokens: a `SoftTokens` whose layout fits the model (checked; errors name the field).
    Returns:
        An `AttachHandle`; `handle.remove()` detaches.
    Raises:
        SoftTokensError: tokens do not fit, or the model already carries tokens.

    Example:
        >>> tokens = softrepa.SoftTokens.for_model(pipe)
        >>> with softrepa.attach(pipe, tokens):
        ...     image = pipe("a red circle left of a blue square").images[0]
        >>> # here the hooks are gone and the pipeline is the stock one again
    """
    denoiser = resolve_denoiser(model_or_pipeline)
    if not isinstance(tokens, SoftTokens):
        raise SoftTokensError(f"expected a SoftTokens module, got {type(tokens).__name__}")
    family = family_of(denoiser)
    targets = family.denoisers(model_or_pipeline, denoiser)  # Wan 2.2 A14B: both experts
    for target in targets:
        family.check_fits(tokens.layout, target)
        prev = _ATTACHED.get(target)
        if prev is not None and prev.active:
            raise SoftTokensError("this model already carries soft tokens; call handle.remove() first "
                                  "(attaching twice would insert the tokens twice)")
    handle = AttachHandle(denoiser, tokens)
    for target in targets:
        family.install_hooks(target, handle)
        _ATTACHED[target] = handle
    return handle


def attached_handle(model_or_pipeline: Any) -> AttachHandle | None:
    """The active handle of a model, or None."""
    h = _ATTACHED.get(resolve_denoiser(model_or_pipeline))
    return h if h is not None and h.active else None


__all__ = ["AttachHandle", "attach", "attached_handle", "call_argument", "replace_argument"]
