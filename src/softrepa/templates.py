"""Where soft tokens enter a denoiser: three placement templates, configured per family by data.

Every open text-to-image denoiser feeds text to its blocks in one of three ways, and each has one
template here (cf. diffusers' per-class `TransformerBlockMetadata` and its one generic hook):

* `DUAL_STREAM` — joint blocks with a separate text stream (SD3, FLUX.1 / FLUX.2 double blocks,
  Qwen-Image): the m tokens are prepended to the block's text input and the first m rows are
  dropped from its text output, so the next block sees the plain text stream again (Algorithm 1).
* `SINGLE_STREAM` — blocks over one joint sequence in which the text is a slice (Z-Image's
  `[image, caption]`): the tokens are inserted where the text starts and removed from the output.
* `CROSS_ATTENTION` — blocks that read the text as a context and never return it (UNets, SANA,
  PixArt, Wan): the tokens are inserted into the context after `position` rows (1: after BOS).

A family declares a `Placement` (which template, the block list, the call's argument names, a mask
that must grow with the tokens, the rows the tokens take in a rotary embedding, the timestep scale)
and `install` registers the hooks: one forward pre-hook on the denoiser that computes the call's
tokens from its per-sample timesteps, and per selected block a pre-hook that inserts them (plus a
post-hook that drops them for the templates whose blocks return the stream). Every hook goes
through `handle.add`, so `handle.remove()` restores the model bit for bit.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import SoftTokensError
from .hooks import AttachHandle, call_argument, replace_argument
from .tokens import TokenLayout

DUAL_STREAM, SINGLE_STREAM, CROSS_ATTENTION = "dual_stream", "single_stream", "cross_attention"
TEMPLATES = (DUAL_STREAM, SINGLE_STREAM, CROSS_ATTENTION)
#: mask conventions: "keep" is 1 where a key is attended (B, n); "bias" is added to the logits (B, 1, n)
MASK_KINDS = ("keep", "bias")
#: key of a denoiser's per-call state holding its call's tokens (B, num_sets, m, D)
TOKENS = "_tokens"
#: key of a denoiser's per-call state holding the call's number (`CallFrames.calls`)
CALL = "_call"

#: (denoiser, layout) -> [(token-set index, block)]: the blocks that get tokens and which set each gets
BlockSelector = Callable[[nn.Module, TokenLayout], list[tuple[int, nn.Module]]]
#: (rotary of the call, m, position, per-call state) -> the rotary with the tokens' m rows inserted
RotaryRule = Callable[[Any, int, int, dict], Any]
#: the same form for any further block argument that runs along the sequence (`Placement.grow`)
RowRule = RotaryRule


def per_layer(attr: str = "transformer_blocks") -> BlockSelector:
    """The blocks `layout.layers` of the list `denoiser.<attr>`, token set i for the i-th listed block."""

    def select(denoiser: nn.Module, layout: TokenLayout) -> list[tuple[int, nn.Module]]:
        blocks = getattr(denoiser, attr)
        return [(i, blocks[k]) for i, k in enumerate(layout.layers)]

    return select


@dataclass(frozen=True)
class Placement:
    """Per-family metadata of where the tokens enter (the data a template is configured with).

    Args:
        template: `DUAL_STREAM`, `SINGLE_STREAM` or `CROSS_ATTENTION`.
        select: which blocks get tokens and which token set each (`per_layer(...)` for per-block sets).
        sample_arg: the denoiser's forward argument whose batch size, dtype and device the tokens follow.
        timestep_scale: maps the denoiser's `timestep` argument onto the tokens' 0..1000 bucket scale
            (FLUX-style models are called with t / 1000: scale 1000).
        timestep_rule: (denoiser, timestep argument) -> (B,) or scalar timesteps, applied before
            `timestep_scale`, for models whose timestep argument is not one value per sample on a fixed
            scale (Wan 2.2 TI2V: one per latent token; SANA: scaled by the model's `timestep_scale`).
        timestep_arg: the denoiser's forward argument holding the timestep (Z-Image calls it `t`).
        timestep_map: where a scale cannot say it, the map of that argument onto the 0..1000 scale
            (Z-Image is called with 1 - sigma); used instead of `timestep_scale`.
        text_arg: the block argument carrying the text (dual-stream, cross-attention) or the joint
            sequence (single-stream); an IP-Adapter tuple (context, image embeds) gets them in its first part.
        position: rows kept before the tokens: cross-attention 1 keeps BOS first (UNets); dual-stream 0.
        text_start: single-stream only: (block, args, kwargs) -> the row where the text starts in the
            joint sequence (the tokens go there); a callable with a fourth parameter also gets the
            per-call state of `call_state` (Z-Image's image length is known to the denoiser call only).
        mask_arg: a block argument holding a text mask that must grow by m rows (None: no mask).
        mask_kind: "keep" (1 = attended; the tokens get 1) or "bias" (additive; the tokens get 0).
        rotary_arg: the block argument with the rotary embedding (None: no positions on the text).
        rotary: the family's rule for the m rows the tokens take in that embedding.
        call_state: (denoiser, args, kwargs, m) -> dict computed once per denoiser call, handed to
            `rotary` (FLUX.2 computes the tokens' rotary rows from the call's text ids there).
        grow: further block arguments that run along the sequence and must follow the m inserted rows,
            each `(name, rule)` with the rule `(value, m, at, state) -> grown value` (Qwen-Image 2.1's
            per-row modulation selector, its attention segments); an argument passed as None is left.
        rewrite_call: `(denoiser, args, kwargs) -> (args, kwargs)`: a change to the denoiser's own call
            while tokens are on (Qwen-Image 2.1: its prefix KV cache would keep step 0's tokens).
        output_index: dual- / single-stream: where the stream sits in the block's output tuple
            (an output of None there — SD3's last `context_pre_only` block — has nothing to drop).
        broadcast_text: accept a text batch of 1 for B latents (the model broadcasts it; Qwen-Image's
            pipeline with one negative prompt for several images) by expanding it to B.
    """

    template: str
    select: BlockSelector = per_layer()
    sample_arg: str = "hidden_states"
    timestep_scale: float = 1.0
    timestep_rule: Callable[[nn.Module, Any], Any] | None = None
    text_arg: str = "encoder_hidden_states"
    position: int = 0
    text_start: Callable[[nn.Module, tuple, dict], int] | None = None
    mask_arg: str | None = None
    mask_kind: str = "keep"
    rotary_arg: str | None = None
    rotary: RotaryRule | None = None
    call_state: Callable[[nn.Module, tuple, dict, int], dict] | None = None
    output_index: int = 0
    broadcast_text: bool = False
    timestep_arg: str = "timestep"
    timestep_map: Callable[[torch.Tensor], torch.Tensor] | None = None
    grow: tuple[tuple[str, RowRule], ...] = ()
    rewrite_call: Callable[[nn.Module, tuple, dict], tuple[tuple, dict]] | None = None
    # whether `text_start` takes the per-call state (computed once from its signature)
    start_takes_state: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {self.mask_kind!r}")
        if (self.template == SINGLE_STREAM) != (self.text_start is not None):
            raise ValueError("text_start is required by the single-stream template and only there")
        if (self.rotary is None) != (self.rotary_arg is None):
            raise ValueError("rotary and rotary_arg go together")
        if self.text_start is not None:
            takes = len(inspect.signature(self.text_start).parameters) >= 4
            object.__setattr__(self, "start_takes_state", takes)  # frozen: set once, here


# ------------------------------------------------------------------------------------ the hooks
def insert_rows(x: torch.Tensor, rows: torch.Tensor, at: int, dim: int = 1) -> torch.Tensor:
    """x with `rows` inserted before index `at` of `dim`: (B, n, D), (B, m, D) -> (B, n + m, D)."""
    if at == 0:
        return torch.cat([rows, x], dim=dim)
    return torch.cat([x.narrow(dim, 0, at), rows, x.narrow(dim, at, x.shape[dim] - at)], dim=dim)


def remove_rows(x: torch.Tensor, at: int, m: int) -> torch.Tensor:
    """Inverse of `insert_rows` on dim 1: (B, n + m, D) -> (B, n, D)."""
    if at == 0:
        return x[:, m:]
    return torch.cat([x[:, :at], x[:, at + m:]], dim=1)


class CallFrames:
    """The per-call state of each denoiser call, for blocks that run again in the backward pass.

    Gradient checkpointing re-runs a block (with its hooks) during backward, long after its call: by
    then `state` holds the *last* call's tokens. A backbone that makes several calls before one
    backward (FLUX.3: one per text window; two experts or two chunks) would re-run early blocks with
    the wrong call's tokens (other rows, other timesteps). So, while a call is in flight with
    gradients on, each block remembers its call's state under the text tensor it received — the very
    object the checkpoint re-supplies on recomputation (diffusers checkpoints with
    `use_reentrant=False`) — and a block run outside any call looks its state up there. Entries are
    keyed by `id` and dropped when the tensor is freed (`weakref.finalize`); nothing is stored on the
    model or on the tensor. Where the lookup cannot work (reentrant checkpointing or saved-tensor hooks
    hand the block a copy) and several calls' states are alive, the block refuses rather than guess
    (`state_for_recompute`); with one call per backward the current state is the right one.
    """

    def __init__(self) -> None:
        self.in_call = False
        self.grad = False  # whether the call in flight builds a graph
        self.calls = 0  # denoiser calls so far: each call's state carries its number (CALL)
        self._frames: dict[int, tuple[Any, dict]] = {}

    def remember(self, key: torch.Tensor, frame: dict) -> None:
        k = id(key)
        if k not in self._frames:
            weakref.finalize(key, self._frames.pop, k, None)
        self._frames[k] = (weakref.ref(key), frame)

    def recall(self, key: torch.Tensor) -> dict | None:
        entry = self._frames.get(id(key))
        return entry[1] if entry is not None and entry[0]() is key else None

    def state_for_recompute(self, key: torch.Tensor, state: dict) -> dict:
        """The state of the call `key` came from; `state` (the last call's) when none was remembered and at
        most one call's state is alive. An empty state is a state (a call without tokens)."""
        found = self.recall(key)
        if found is not None:
            return found
        alive = {frame.get(CALL) for _, frame in self._frames.values()}
        if len(alive) > 1:
            raise SoftTokensError(
                "a block re-run in the backward pass (gradient checkpointing) came with a copy of its input, so "
                f"softrepa cannot tell which of {len(alive)} denoiser calls it belongs to: use diffusers' default "
                "non-reentrant checkpointing without saved-tensor hooks, or one denoiser call per backward")
        return state


def denoiser_pre_hook(handle: AttachHandle, placement: Placement, projection: Callable | None,
                      state: dict, frames: CallFrames | None = None) -> Callable:
    """Denoiser pre-hook: this call's tokens (B, num_sets, m, D) into `handle.current`, and the
    placement's per-call state into `state` (both cleared when the handle is disabled)."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.clear()
        if frames is not None:
            frames.in_call = True  # until the denoiser's forward hook (`call_end_hook`)
            # a call that builds a graph: its blocks may be re-run in backward (reentrant checkpointing runs
            # them under no_grad in the forward pass, so the blocks cannot tell by themselves)
            frames.grad = torch.is_grad_enabled()
            frames.calls += 1
            state[CALL] = frames.calls
        if not handle.enabled:
            handle.current = None
            return None
        if placement.call_state is not None:  # first: it may refuse a call the placement cannot serve
            state.update(placement.call_state(module, args, kwargs, handle.tokens.layout.num_tokens))
        sample = call_argument(module, args, kwargs, placement.sample_arg)
        # a list of per-sample tensors (Z-Image's `x`): the batch is the list, dtype and device its first item's
        b, first = (len(sample), sample[0]) if isinstance(sample, (list, tuple)) else (sample.shape[0], sample)
        timestep = call_argument(module, args, kwargs, placement.timestep_arg)
        if timestep is None:
            raise SoftTokensError(f"{type(module).__name__} was called without a timestep")
        if placement.timestep_rule is not None:
            timestep = placement.timestep_rule(module, timestep)
        if placement.timestep_map is not None:
            timestep = placement.timestep_map(torch.as_tensor(timestep))
        elif placement.timestep_scale != 1.0:
            timestep = torch.as_tensor(timestep) * placement.timestep_scale
        mask = None  # the unconditional rows, when they carry other tokens than the attached ones
        if handle.uncond_mode != "positive" and not handle.splitting:
            mask = handle.uncond_mask(b)
            if mask is not None and not bool(mask.any()):
                mask = None
            handle.uncond_calls += mask is not None
            if mask is not None and handle.uncond_mode == "none":
                # all rows unconditional (a call mixing both was split before this hook): vanilla
                handle.current = None
                return None
        kw = dict(projection=projection, dtype=first.dtype, device=first.device)
        handle.current = handle.tokens(timestep, b, **kw)  # (B, num_sets, m, D)
        if mask is not None:  # "negative": AGSM's psi- on the unconditional rows
            negative = handle.uncond_tokens(timestep, b, **kw)
            handle.current = torch.where(mask.to(first.device).view(-1, 1, 1, 1), negative, handle.current)
        # this denoiser's own copy, read by its blocks: with two denoisers per step (Wan 2.2's experts)
        # checkpoint recomputation in the backward pass must see each one's tokens, not the last call's
        state[TOKENS] = handle.current
        if placement.rewrite_call is not None:
            return placement.rewrite_call(module, args, kwargs)
        return None

    return hook


def call_end_hook(frames: CallFrames) -> Callable:
    """Denoiser forward hook (also on an exception): the call is over; later block runs are recomputations."""
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        frames.in_call = False

    return hook


def block_pre_hook(handle: AttachHandle, placement: Placement, set_index: int, state: dict,
                   where: dict, frames: CallFrames | None = None) -> Callable:
    """Block pre-hook: token set `set_index` inserted into the block's text (and its mask and rotary
    rows); the insertion row and whether tokens went in are left in `where` for the post-hook."""
    p = placement

    def hook(block: nn.Module, args: tuple, kwargs: dict) -> Any:
        value = call_argument(block, args, kwargs, p.text_arg)
        seq, rest = (value[0], tuple(value[1:])) if isinstance(value, tuple) else (value, None)  # (B | 1, n, D)
        frame = state
        if frames is not None and isinstance(seq, torch.Tensor):
            if frames.in_call:
                if frames.grad:  # this block may run again in backward (checkpointing)
                    frames.remember(seq, dict(state))
            else:  # a recomputation in the backward pass: the state of the call this input came from
                frame = frames.state_for_recompute(seq, state)
        toks = frame.get(TOKENS)  # (B, num_sets, m, D)
        where["active"] = toks is not None
        if toks is None:
            return None
        b, m = toks.shape[0], toks.shape[2]
        if value is None:
            raise SoftTokensError(f"{type(block).__name__} was called without {p.text_arg}")
        mask = call_argument(block, args, kwargs, p.mask_arg) if p.mask_arg else None
        if p.broadcast_text and seq.shape[0] == 1 and b > 1:
            # one prompt for a batch of latents: the model broadcasts the text over the batch, so do we
            seq = seq.expand(b, -1, -1)
            mask = None if mask is None else mask.expand(b, *mask.shape[1:])
        if seq.shape[0] != b:
            raise RuntimeError(f"soft tokens were computed for a batch of {b} but block received {seq.shape[0]}")
        if p.text_start is None:
            at = p.position
        else:
            at = p.text_start(block, args, kwargs, frame) if p.start_takes_state else p.text_start(block, args, kwargs)
        where["at"] = at
        new = insert_rows(seq, toks[:, set_index].to(seq.dtype), at)  # (B, n + m, D)
        args, kwargs = replace_argument(block, args, kwargs, p.text_arg, new if rest is None else (new,) + rest)
        if mask is not None:
            fill = mask.new_ones if p.mask_kind == "keep" else mask.new_zeros  # the tokens are always attended
            grown = insert_rows(mask, fill(mask.shape[:-1] + (m,)), at, dim=mask.ndim - 1)  # (..., n + m)
            args, kwargs = replace_argument(block, args, kwargs, p.mask_arg, grown)
        for name, rule in p.grow:
            value = call_argument(block, args, kwargs, name)
            if value is not None:
                args, kwargs = replace_argument(block, args, kwargs, name, rule(value, m, at, frame))
        if p.rotary is not None:
            rotary = call_argument(block, args, kwargs, p.rotary_arg)
            if rotary is not None:
                args, kwargs = replace_argument(block, args, kwargs, p.rotary_arg, p.rotary(rotary, m, at, frame))
        return args, kwargs

    return hook


def block_post_hook(handle: AttachHandle, placement: Placement, state: dict, where: dict) -> Callable:
    """Block post-hook (dual- and single-stream): the m token rows removed from the block's output stream."""
    m = handle.tokens.layout.num_tokens
    idx = placement.output_index

    def hook(block: nn.Module, args: tuple, output: Any) -> Any:
        if not where.get("active"):  # the pre-hook inserted nothing (its call had no tokens)
            return None
        if not isinstance(output, tuple):
            return remove_rows(output, where["at"], m)
        if output[idx] is None:  # e.g. SD3's last `context_pre_only` block: no text output to trim
            return None
        return output[:idx] + (remove_rows(output[idx], where["at"], m),) + output[idx + 1:]

    return hook


def install(denoiser: nn.Module, handle: AttachHandle, placement: Placement, projection: Callable | None) -> None:
    """Register the hooks of `placement` on `denoiser` for `handle`'s tokens (each through `handle.add`).

    Args:
        denoiser: the unmodified diffusers model.
        handle: the attachment (its tokens, its enabled flag, the list of removable hooks).
        placement: the family's `Placement`.
        projection: the model's map of text-space tokens into the block width, or None.
    Raises:
        SoftTokensError: the layout selects no block of this model.
    """
    state: dict = {}  # per-call values of this attachment (FLUX.2's rotary rows); dropped with the hooks
    frames = CallFrames()  # each call's state, for its blocks' recomputation under checkpointing
    blocks = placement.select(denoiser, handle.tokens.layout)
    if not blocks:
        raise SoftTokensError(f"the token layout selects no block of {type(denoiser).__name__} that reads text")
    handle.add(denoiser.register_forward_pre_hook(denoiser_pre_hook(handle, placement, projection, state, frames),
                                                  with_kwargs=True))
    handle.add(denoiser.register_forward_hook(call_end_hook(frames), always_call=True))
    for set_index, block in blocks:
        where: dict = {}
        handle.add(block.register_forward_pre_hook(
            block_pre_hook(handle, placement, set_index, state, where, frames), with_kwargs=True))
        if placement.template != CROSS_ATTENTION:  # a cross-attention block never returns its context
            handle.add(block.register_forward_hook(block_post_hook(handle, placement, state, where)))


__all__ = ["CallFrames", "CROSS_ATTENTION", "DUAL_STREAM", "SINGLE_STREAM", "TEMPLATES", "Placement", "install", "insert_rows",
           "per_layer", "remove_rows"]
