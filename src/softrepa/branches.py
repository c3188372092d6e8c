"""Which soft tokens the unconditional CFG branch carries: AGSM's psi+ / psi- at sampling time.

An AGSM run trains two token sets (psi+ for the matching caption, psi- for the mismatched ones). At
sampling the official code puts psi+ on both classifier-free-guidance branches by default and psi-
on the unconditional branch with `--uncon2neg`. Three choices, `UNCOND_CHOICES`:

* "positive": the attached tokens on both branches (every SoftREPA file; the default);
* "negative": a second token set (AGSM's psi-) on the unconditional branch;
* "none": the unconditional branch runs the vanilla model (no tokens at all).

Where the unconditional rows are is the pipeline's business, told by the family's `cfg_branches`:

* "batch": one denoiser call on [uncond; cond] rows (SD3 / SD3.5, SD1.5, SDXL pipelines): the
  first half of a batch the pipeline runs with `do_classifier_free_guidance` on;
* "calls": one call per branch inside diffusers' `transformer.cache_context("uncond")` (FLUX.1 true
  CFG, Qwen-Image, FLUX.2 [klein]); we learn the branch's name by wrapping the denoiser's
  `cache_context` for as long as the attachment lives (diffusers tells its own stateful hooks the
  name, but registering one rewrites `forward` and leaves a bound method behind on removal, which
  would break "detaching restores the model exactly"; an instance attribute we delete does not).

* "guider": one call per branch, each prepared by the modular pipeline's guider (FLUX.3's
  `Flux3ModularPipeline` with diffusers' `ClassifierFreeGuidance`): the guider names each batch it
  prepares (`pred_cond`, `pred_uncond`, ...) and calls `prepare_models` before each batch's call; we
  read the names by wrapping its `prepare_inputs` / `prepare_models` (instance attributes, deleted on
  removal, as for `cache_context`). A pipeline without a guider (FLUX.3's step-distilled one), or CFG
  at scale 1, has no unconditional branch, and generate says the choice had no effect.

Callers that build the rows themselves (FlowEdit) name them with `handle.uncond_rows(mask)`.

"none" on a batched call cannot be done by inserting something into the unconditional rows (any
inserted row changes attention), so the denoiser call is split: a pre-hook hands the model the
conditional rows only, a forward hook runs the unconditional rows with the tokens disabled and puts
both outputs back in the caller's row order. Nothing of the model's forward is copied.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import UsageError

UNCOND_CHOICES = ("positive", "negative", "none")
CFG_BRANCHES = ("batch", "calls", "guider")

#: (batch size) -> (B,) bool mask of the unconditional rows of this call, or None (no such rows)
RowRule = Callable[[int], "torch.Tensor | None"]


def check_choice(mode: str) -> str:
    if mode not in UNCOND_CHOICES:
        raise UsageError(f"--uncond-tokens must be one of {', '.join(UNCOND_CHOICES)}, got {mode!r}")
    return mode


def batch_rule(pipeline: Any) -> RowRule:
    """The unconditional rows of a pipeline that batches CFG: the first half while its
    `do_classifier_free_guidance` is on (read at every call: the scale is set per pipeline call)."""
    ref = weakref.ref(pipeline)

    def rule(batch: int) -> torch.Tensor | None:
        pipe = ref()
        if pipe is None or batch % 2 or not getattr(pipe, "do_classifier_free_guidance", False):
            return None
        return torch.arange(batch) < batch // 2  # (B,): [uncond; cond]

    return rule


def install_call_probe(denoiser: nn.Module, handle: Any) -> Callable[[], None]:
    """Record the name of diffusers' `cache_context` in `handle.branch` while the pipeline is inside
    it. Returns the function that removes the probe (the model's own `cache_context` again)."""
    if "cache_context" in vars(denoiser):
        raise UsageError(f"{type(denoiser).__name__}.cache_context is already wrapped (another attachment?)")
    original = denoiser.cache_context  # the class's method, bound

    @contextlib.contextmanager
    def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        with original(name, *args, **kwargs):
            before, handle.branch = handle.branch, name
            try:
                yield
            finally:
                handle.branch = before

    denoiser.cache_context = cache_context

    def remove() -> None:
        vars(denoiser).pop("cache_context", None)

    return remove


def install_guider_probe(pipeline: Any, handle: Any, models: list[nn.Module]) -> Callable[[], None]:
    """Record in `handle.branch` which batch the pipeline's guider prepared for the denoiser call in
    flight: "uncond" for the batch the guider names `pred_uncond`, "cond" for every other one (the
    conditional batch, and perturbed conditional ones of PAG-style guiders), None between calls.

    A guider's `prepare_inputs` returns one batch per prediction, each carrying its name (the guider's
    `_identifier_key`), and the pipeline calls `prepare_models` once before each batch's denoiser call:
    the k-th `prepare_models` of a step is the k-th batch. A forward hook on each denoiser (run also
    when the call raises) clears the branch, so a call outside the guider never counts as a branch.
    Returns the function that removes the probe; a pipeline without a guider gets none."""
    guider = getattr(pipeline, "guider", None)
    if guider is None:
        return lambda: None
    if "prepare_models" in vars(guider) or "prepare_inputs" in vars(guider):
        raise UsageError(f"{type(guider).__name__} is already probed (another attachment?)")
    prepare_models = guider.prepare_models  # the class's, bound
    key = getattr(guider, "_identifier_key", "__guidance_identifier__")
    step = {"names": [], "next": 0}

    def probe(prepare: Callable) -> Callable:
        def probed_inputs(*args: Any, **kwargs: Any) -> Any:
            batches = prepare(*args, **kwargs)
            step["names"] = [getattr(b, key, None) if not isinstance(b, dict) else b.get(key) for b in batches]
            step["next"] = 0
            return batches

        return probed_inputs

    def probed_models(denoiser: nn.Module) -> None:
        prepare_models(denoiser)
        names, k = step["names"], step["next"]
        step["next"] += 1
        handle.branch = "uncond" if k < len(names) and names[k] == "pred_uncond" else "cond"

    # both ways a modular pipeline asks for the batches (FLUX.3 uses the first)
    inputs = [n for n in ("prepare_inputs", "prepare_inputs_from_block_state") if hasattr(guider, n)]
    for name in inputs:
        setattr(guider, name, probe(getattr(guider, name)))
    guider.prepare_models = probed_models

    def clear(module: nn.Module, args: tuple, output: Any) -> None:
        handle.branch = None

    hooks = [m.register_forward_hook(clear, always_call=True) for m in models]

    def remove() -> None:
        for name in (*inputs, "prepare_models"):
            vars(guider).pop(name, None)
        for h in hooks:
            h.remove()
        handle.branch = None

    return remove


def call_rule(handle: Any) -> RowRule:
    """Every row is unconditional in a call made inside `cache_context("uncond")` (or a guider's
    unconditional batch)."""
    def rule(batch: int) -> torch.Tensor | None:
        return torch.ones(batch, dtype=torch.bool) if handle.branch == "uncond" else None

    return rule


# ------------------------------------------------------------------ splitting a batched call
def take_rows(value: Any, index: torch.Tensor, batch: int) -> Any:
    """`value` with every tensor whose first dim is the batch indexed by `index` (through dicts,
    lists and tuples: SDXL's `added_cond_kwargs`); everything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return type(value)((k, take_rows(v, index, batch)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(take_rows(v, index, batch) for v in value)
    return value


def put_rows(kept: Any, other: Any, mask: torch.Tensor) -> Any:
    """Merge two outputs of the same structure: `other`'s rows where `mask`, `kept`'s elsewhere.

    `kept` (rows ~mask) and `other` (rows mask) are outputs of one model on complementary rows:
    tensors are put back into (B, ...) in the caller's order; other values are taken from `kept`."""
    if isinstance(kept, torch.Tensor) and isinstance(other, torch.Tensor):
        out = kept.new_empty((mask.numel(),) + tuple(kept.shape[1:]))  # (B, ...)
        m = mask.to(kept.device)
        out[m] = other.to(kept.dtype)
        out[~m] = kept
        return out
    if isinstance(kept, dict):  # diffusers' BaseOutput is an ordered dict and a dataclass
        merged = {k: put_rows(v, other[k], mask) for k, v in kept.items()}
        return type(kept)(**merged)
    if isinstance(kept, tuple):
        return type(kept)(put_rows(a, b, mask) for a, b in zip(kept, other))
    return kept


def split_pre_hook(handle: Any, call: dict, batch_of: Callable[[nn.Module, tuple, dict], int]) -> Callable:
    """Denoiser pre-hook for "none": keep the conditional rows only (the caller's unconditional
    rows are run by `split_post_hook`). Registered before the token pre-hook, so that the tokens
    are computed for the rows the model actually gets. `batch_of` reads the call's batch size.
    A call whose rows are all unconditional is not split: the token pre-hook runs it vanilla."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        call.clear()
        handle.splitting = False
        if not handle.enabled or handle.uncond_mode != "none":
            return None
        batch = batch_of(module, args, kwargs)
        mask = handle.uncond_mask(batch)
        if mask is None or not bool(mask.any()) or bool(mask.all()):
            return None
        handle.uncond_calls += 1
        call.update(mask=mask, batch=batch, args=args, kwargs=kwargs)
        handle.splitting = True  # the token pre-hook: these rows are all conditional
        keep = (~mask).nonzero().squeeze(1)
        return take_rows(args, keep, batch), take_rows(kwargs, keep, batch)

    return hook


def split_post_hook(handle: Any, call: dict) -> Callable:
    """Denoiser forward hook for "none": the unconditional rows with the tokens disabled, merged
    back with the conditional rows' output in the caller's order."""
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if "mask" not in call:
            return None
        mask, batch = call["mask"], call["batch"]
        outer_args, outer_kwargs = call["args"], call["kwargs"]
        call.clear()  # the nested call below runs these hooks again; they must see nothing to do
        handle.splitting = False
        uncond = mask.nonzero().squeeze(1)
        with handle.disabled():
            vanilla = module(*take_rows(outer_args, uncond, batch), **take_rows(outer_kwargs, uncond, batch))
        return put_rows(output, vanilla, mask)

    return hook


def configure(handle: Any, target: Any, mode: str, negative: Any = None) -> None:
    """Set what the unconditional branch of `handle`'s model carries (see the module docstring).

    Args:
        handle: an active `AttachHandle`.
        target: the pipeline the handle's model runs in (its CFG rows are found through it), or the
            bare denoiser (then only callers naming rows with `handle.uncond_rows` get the choice).
        mode: one of `UNCOND_CHOICES`.
        negative: the `SoftTokens` for "negative" (same layout as the attached tokens).
    Raises:
        UsageError: an unknown mode, "negative" without tokens, a family whose pipeline's CFG
            rows softrepa cannot tell, or a handle already configured.
        SoftTokensError: `negative` does not have the attached tokens' layout.

    Example:
        >>> handle = softrepa.load_into(pipe, "agsm_run/tokens.safetensors", uncond_tokens="negative")
    """
    from .errors import SoftTokensError
    from .hooks import call_argument
    from .registry import family_of

    check_choice(mode)
    if handle.uncond_mode != "positive" or handle.rows_rule is not None:
        raise UsageError("the unconditional branch's tokens are already set for this attachment; re-attach to change")
    if mode == "positive":
        return
    if mode == "negative":
        if negative is None:
            raise UsageError("--uncond-tokens negative needs a second token set (an AGSM run's psi-); "
                             "this tokens file holds one set")
        if negative.layout != handle.tokens.layout:
            raise SoftTokensError(f"the negative tokens' layout differs from the attached tokens' "
                                  f"({negative.layout} vs {handle.tokens.layout})")
    family = family_of(handle.model)
    kind = getattr(family, "cfg_branches", "")
    is_pipeline = target is not handle.model
    models = family.denoisers(target, handle.model) if is_pipeline else [handle.model]  # Wan 2.2 A14B: 2
    if is_pipeline:
        if kind == "batch":
            handle.rows_rule = batch_rule(target)
        elif kind == "calls":
            for model in models:
                handle.add_remover(install_call_probe(model, handle))
            handle.rows_rule = call_rule(handle)
        elif kind == "guider":
            handle.add_remover(install_guider_probe(target, handle, models))
            handle.rows_rule = call_rule(handle)
        else:
            raise UsageError(f"--uncond-tokens {mode}: softrepa does not know where {family.title}'s pipeline "
                             "puts its unconditional rows; use the default (tokens on both branches)")
    handle.uncond_tokens = negative
    handle.uncond_mode = mode
    if mode == "none":
        sample_arg = family.placement.sample_arg

        def batch_of(module: nn.Module, args: tuple, kwargs: dict) -> int:
            value = call_argument(module, args, kwargs, sample_arg)
            return len(value) if isinstance(value, (list, tuple)) else int(value.shape[0])

        for model in models:
            call: dict = {}  # per model: the split call in flight
            # prepended: they run before the token pre-hook / after the model, whatever was registered first
            handle.add(model.register_forward_pre_hook(split_pre_hook(handle, call, batch_of),
                                                       with_kwargs=True, prepend=True))
            handle.add(model.register_forward_hook(split_post_hook(handle, call), with_kwargs=True, prepend=True))


__all__ = ["configure", "CFG_BRANCHES", "UNCOND_CHOICES", "batch_rule", "call_rule", "check_choice", "install_call_probe",
           "install_guider_probe", "put_rows", "split_post_hook", "split_pre_hook", "take_rows"]
