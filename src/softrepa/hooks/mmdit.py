"""MM-DiT (SD3 / SD3.5 `SD3Transformer2DModel`): Algorithm 1 through hooks on the stock blocks.

At each selected block k the block's m tokens are prepended to the text hidden states entering
the block, and the first m positions are dropped from the block's text output, so the next
block sees the plain text stream again (and, if selected, its own fresh tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import AttachHandle, call_argument, model_pre_hook, replace_argument


def install_mmdit_hooks(model: nn.Module, handle: AttachHandle) -> None:
    """Register the denoiser pre-hook and one pre/post hook pair per selected block."""
    layout = handle.tokens.layout
    projection = model.context_embedder if layout.token_space == "text" else None
    handle.add(model.register_forward_pre_hook(model_pre_hook(handle, projection, "hidden_states"),
                                               with_kwargs=True))
    for set_index, block_index in enumerate(layout.layers):
        block = model.transformer_blocks[block_index]
        handle.add(block.register_forward_pre_hook(_prepend(handle, set_index), with_kwargs=True))
        handle.add(block.register_forward_hook(_drop(handle)))


def _prepend(handle: AttachHandle, set_index: int):
    def hook(block: nn.Module, args: tuple, kwargs: dict) -> Any:
        toks = handle.current
        if toks is None:
            return None
        ehs = call_argument(block, args, kwargs, "encoder_hidden_states")  # (B, n_txt, D)
        if ehs.shape[0] != toks.shape[0]:
            raise RuntimeError(
                f"soft tokens were computed for a batch of {toks.shape[0]} but block received {ehs.shape[0]}"
            )
        new = torch.cat([toks[:, set_index].to(ehs.dtype), ehs], dim=1)  # (B, m + n_txt, D)
        return replace_argument(block, args, kwargs, "encoder_hidden_states", new)

    return hook


def _drop(handle: AttachHandle):
    m = handle.tokens.layout.num_tokens

    def hook(block: nn.Module, args: tuple, output: Any) -> Any:
        if handle.current is None:
            return None
        ehs_out, hs = output
        if ehs_out is None:  # context_pre_only (last) block: no text output to trim
            return None
        return ehs_out[:, m:], hs  # (B, n_txt, D)

    return hook
