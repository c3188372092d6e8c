"""UNet (SD1.5 / SDXL `UNet2DConditionModel`): tokens right after BOS of the cross-attention context.

The selected block groups (down / mid / up) receive `[BOS, s_1..s_m, rest of the context]` as
`encoder_hidden_states`; the other groups keep the plain context, as in the authors' forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..tokens import SoftTokensError
from . import AttachHandle, model_pre_hook


def selected_blocks(model: nn.Module, groups: tuple[str, ...]) -> list[nn.Module]:
    """The cross-attention blocks of the chosen groups (blocks without cross-attention are skipped)."""
    blocks: list[nn.Module] = []
    if "down" in groups:
        blocks += list(model.down_blocks)
    if "mid" in groups and model.mid_block is not None:
        blocks.append(model.mid_block)
    if "up" in groups:
        blocks += list(model.up_blocks)
    return [b for b in blocks if getattr(b, "has_cross_attention", False)]


def install_unet_hooks(model: nn.Module, handle: AttachHandle) -> None:
    """Register the denoiser pre-hook and one pre-hook per selected cross-attention block."""
    blocks = selected_blocks(model, handle.tokens.layout.blocks)
    if not blocks:
        raise SoftTokensError(f"blocks: the groups {list(handle.tokens.layout.blocks)} of this UNet have no "
                              "cross-attention blocks")
    handle.add(model.register_forward_pre_hook(model_pre_hook(handle, None, "sample"), with_kwargs=True))
    for block in blocks:
        handle.add(block.register_forward_pre_hook(_insert_after_bos(handle), with_kwargs=True))


def insert_after_bos(context: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
    """[BOS, toks, rest]: (B, n_txt, D), (B, m, D) -> (B, n_txt + m, D)."""
    return torch.cat([context[:, :1], toks.to(context.dtype), context[:, 1:]], dim=1)


def _insert_after_bos(handle: AttachHandle):
    def hook(block: nn.Module, args: tuple, kwargs: dict) -> Any:
        toks = handle.current
        if toks is None:
            return None
        if "encoder_hidden_states" not in kwargs:
            # diffusers' UNet passes the context by keyword to every cross-attention block.
            raise SoftTokensError(f"{type(block).__name__} was called without encoder_hidden_states by keyword")
        kwargs = dict(kwargs)
        ctx = kwargs["encoder_hidden_states"]
        if isinstance(ctx, tuple):  # IP-Adapter: (text context, image embeds); tokens go to the text part
            kwargs["encoder_hidden_states"] = (insert_after_bos(ctx[0], toks[:, 0]),) + tuple(ctx[1:])
        else:
            kwargs["encoder_hidden_states"] = insert_after_bos(ctx, toks[:, 0])
        mask = kwargs.get("encoder_attention_mask")
        if mask is not None:  # additive bias (B, 1, n_txt): the tokens are always attended to
            m = toks.shape[2]
            zeros = mask.new_zeros(mask.shape[:-1] + (m,))
            kwargs["encoder_attention_mask"] = torch.cat([mask[..., :1], zeros, mask[..., 1:]], dim=-1)
        return args, kwargs

    return hook
