"""The rotary rows soft tokens take in the joint blocks of FLUX-style models: two rules, shared by families.

FLUX.1, FLUX.2 and FLUX.3 compute rotary (cos, sin) once per call from 4-axis (or 3-axis) ids of the
text and the image and hand the concatenation, text first, to every joint block. A selected block sees
m + n_txt text rows, so its pre-hook prepends m rotary rows (a placement's `rotary` rule).

* `first_text_rows` (FLUX.1, FLUX.3): m copies of the first text row. FLUX.1's text ids are all zero,
  so the tokens take the position of every text token. FLUX.3's text ids are (0, 0, 0, l) and its
  reference images sit at L = -1, -2, ... with their (h, w) grid: the negative L axis is where the model
  puts reference images, so the tokens take the first text token's id and relate to the prompt, the
  image and every reference exactly as that token does; they add no new position.
* `token_ids` / `token_rotary` / `prepend_token_rows` (FLUX.2): the ids of m text positions just *before*
  the first text token on the sequence axis, L = l_0 - m .. l_0 - 1. FLUX.2's text ids are also
  (0, 0, 0, l) but nothing else lives at negative L there, so the tokens stand where m more text tokens
  in front of the prompt would stand, and no existing pair of positions changes its offset (rotary
  attention depends only on differences of ids). Its rows are computed once per denoiser call by the
  model's own `pos_embed` from the call's `txt_ids` (a placement's `call_state`, kept in the
  attachment's hooks: nothing is stored on the model).
"""

from __future__ import annotations

import torch
from torch import nn

from .hooks import call_argument


def first_text_rows(rotary: tuple, m: int, at: int, state: dict) -> tuple:
    """The block's rotary (cos, sin), each (n_txt + n_img, d), with m copies of the first text row in front."""
    return tuple(torch.cat([r[:1].expand(m, -1), r], dim=0) for r in rotary)  # each (m + n_txt + n_img, d)


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


__all__ = ["first_text_rows", "prepend_token_rows", "token_ids", "token_rotary"]
