"""Rotary rows for soft tokens in models whose text is a *sequence* on one rotary axis (FLUX.2, FLUX.3).

Both models give every text token 4-axis ids (T, H, W, L) = (0, 0, 0, l) for l = 0 .. n_txt - 1 and
compute rotary (cos, sin) once per call from (text ids, image ids), handing the concatenation to
every joint block. The m tokens of a block get the ids of m text positions just *before* the first
text token on the sequence axis: the first text id with L = l_0 - m .. l_0 - 1 (`token_ids`).

Why this rule: rotary attention depends only on differences of ids, so (i) no existing pair of
positions changes its offset — text-text and text-image offsets are the vanilla model's — and (ii)
the tokens stand where m extra text tokens prepended to the prompt would stand, which is what
Algorithm 1 does (prepend to the text). Giving every token the first text id (FLUX.1's rule, whose
text ids are all zero) would put m tokens at the position of the first text token, and appending
them after the padded text would make their distance to the prompt depend on the padding length.

The rows are computed once per denoiser call by the model's own `pos_embed` from the call's
`txt_ids` (a placement's `call_state`, kept in the attachment's hooks: nothing is stored on the
model) and prepended to the rotary of each selected block by its pre-hook (a placement's `rotary`).
"""

from __future__ import annotations

import torch
from torch import nn

from .hooks import call_argument


def token_ids(txt_ids: torch.Tensor, m: int) -> torch.Tensor:
    """(m, A) ids of the soft tokens: the first text id with the last (sequence) axis moved back by m .. 1.

    Args:
        txt_ids: (n_txt, A) or (B, n_txt, A) text ids of the call, the sequence on the last axis.
        m: number of tokens.

    Example:
        >>> token_ids(torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]]), 2).tolist()
        [[0, 0, 0, -2], [0, 0, 0, -1]]
    """
    first = (txt_ids[0] if txt_ids.ndim == 3 else txt_ids)[:1]  # (1, A)
    offsets = torch.zeros(m, first.shape[-1], dtype=first.dtype, device=first.device)  # (m, A)
    offsets[:, -1] = torch.arange(-m, 0, dtype=first.dtype, device=first.device)
    return first + offsets  # (m, A): L = l_0 - m .. l_0 - 1


def token_rotary(model: nn.Module, args: tuple, kwargs: dict, m: int) -> dict:
    """A placement's `call_state`: the rotary (cos, sin) rows of the tokens' ids, each (m, d), computed by
    the model's `pos_embed` from the call's `txt_ids`."""
    txt_ids = call_argument(model, args, kwargs, "txt_ids")  # (n_txt, A) or (B, n_txt, A)
    return {"rotary": model.pos_embed(token_ids(txt_ids, m))}


def prepend_token_rows(rotary: tuple, m: int, at: int, state: dict) -> tuple:
    """A placement's `rotary` rule: the block's rotary (cos, sin), each (n_txt + n_img, d), with this
    call's token rows first (the text leads the joint sequence)."""
    return tuple(torch.cat([t.to(r.device, r.dtype), r], dim=0) for t, r in zip(state["rotary"], rotary))


__all__ = ["prepend_token_rows", "token_ids", "token_rotary"]
