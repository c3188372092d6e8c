"""The placement template's data / hook extensions added for Z-Image and Qwen-Image 2.1, each on a toy
model against a computation by hand: a timestep argument of another name and meaning (`timestep_arg`,
`timestep_map`), per-sample list inputs, a text start known only to the denoiser call (`text_start`
with the call state), further per-row block arguments (`grow`) and a change to the denoiser's own call
while tokens are on (`rewrite_call`); and the per-call state blocks recomputed under checkpointing get
(`CallFrames`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softrepa.hooks import AttachHandle
from softrepa.templates import SINGLE_STREAM, Placement, install, per_layer
from softrepa.tokens import SoftTokens, TokenLayout

D, M = 6, 2


class Block(nn.Module):
    """A joint-sequence block that records what it got and mixes the rows (so the tokens matter)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.seen: dict = {}

    def forward(self, x, row_flags=None, cache=None):
        self.seen = {"x": x, "row_flags": row_flags}
        return x + self.lin(x).mean(dim=1, keepdim=True)


class ListModel(nn.Module):
    """Z-Image-like: per-sample lists `x`, a time argument `t` = 1 - sigma, the text after the image rows,
    whose count only the call knows; a per-row flag vector and a cache the call may carry."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.calls: list = []

    def forward(self, x, t, text, cache=None, with_flags=True):
        self.calls.append(cache)
        n_img = x[0].shape[0]
        seq = torch.cat([torch.stack(x), text], dim=1)  # (B, n_img + n_txt, D)
        flags = torch.zeros(seq.shape[1], dtype=torch.bool) if with_flags else None
        if flags is not None:
            flags[:n_img] = True
        for block in self.blocks:
            seq = block(seq, flags, cache)
        return seq[:, :n_img]


def _tokens() -> SoftTokens:
    tokens = SoftTokens(TokenLayout("sd3", D, D, M, 100, "block", (1,), (), 2))
    with torch.no_grad():
        for p in tokens.parameters():
            p.normal_()
    return tokens


def _flags_rule(flags, m, at, state):
    return torch.cat([flags[:at], flags.new_zeros(m), flags[at:]])  # (n + m,): the tokens are not image rows


PLACEMENT = Placement(
    SINGLE_STREAM, select=per_layer("blocks"), sample_arg="x", timestep_arg="t",
    timestep_map=lambda t: 1000.0 * (1.0 - t), text_arg="x",
    call_state=lambda model, args, kwargs, m: {"n_img": args[0][0].shape[0]},
    text_start=lambda block, args, kwargs, state: state["n_img"],
    grow=(("row_flags", _flags_rule),),
    rewrite_call=lambda model, args, kwargs: (args, {**kwargs, "cache": None}))


def test_extensions_insert_where_the_call_says_and_rewrite_the_call_only_while_enabled():
    torch.manual_seed(0)
    model, tokens = ListModel(), _tokens()
    x = [torch.randn(3, D), torch.randn(3, D)]
    text, t = torch.randn(2, 4, D), torch.tensor([0.25, 0.875])
    vanilla = model(x, t, text, cache="kv")
    handle = AttachHandle(model, tokens)
    install(model, handle, PLACEMENT, None)
    got = model(x, t, text, cache="kv")
    seen = model.blocks[1].seen

    want_toks = tokens(torch.tensor([750.0, 125.0]), 2)[:, 0]  # buckets of 1000 (1 - t), batch = the list
    torch.testing.assert_close(handle.current[:, 0], want_toks)
    assert seen["x"].shape == (2, 3 + M + 4, D)
    torch.testing.assert_close(seen["x"][:, 3:3 + M], want_toks)  # after the 3 image rows the call reported
    assert seen["row_flags"].tolist() == [True] * 3 + [False] * (M + 4)
    assert model.calls[-1] is None  # the call was rewritten while tokens are on
    assert not torch.allclose(got, vanilla)

    with handle.disabled():
        assert torch.equal(model(x, t, text, cache="kv"), vanilla)
        assert model.calls[-1] == "kv"  # disabled: the call is the caller's
    handle.remove()
    assert torch.equal(model(x, t, text, cache="kv"), vanilla) and model.calls[-1] == "kv"

    # by hand: block 1 sees [image, tokens, text], its output without the token rows
    seq = torch.cat([torch.stack(x), text], dim=1)
    seq = model.blocks[0](seq)
    grown = torch.cat([seq[:, :3], want_toks, seq[:, 3:]], dim=1)
    out = model.blocks[1](grown)
    torch.testing.assert_close(got, out[:, :3])


def test_a_grow_rule_leaves_an_argument_passed_as_none():
    model, tokens = ListModel(), _tokens()
    handle = AttachHandle(model, tokens)
    install(model, handle, PLACEMENT, None)
    model([torch.randn(3, D)], torch.tensor([0.5]), torch.randn(1, 2, D), with_flags=False)
    assert model.blocks[1].seen["row_flags"] is None and model.blocks[1].seen["x"].shape == (1, 3 + M + 2, D)
    handle.remove()


def test_three_argument_text_start_still_works_and_fourth_gets_the_state():
    three = Placement(SINGLE_STREAM, text_start=lambda block, args, kwargs: 0)
    four = Placement(SINGLE_STREAM, text_start=lambda block, args, kwargs, state: 0)
    assert not three.start_takes_state and four.start_takes_state
    with pytest.raises(ValueError, match="text_start"):
        Placement(SINGLE_STREAM)


def test_call_frames_recall_only_the_same_tensor_and_forget_it_when_freed():
    """`CallFrames` (the state a block recomputed under checkpointing gets): found by the very tensor object
    the block received, not by an equal one; dropped when that tensor is freed."""
    import gc

    from softrepa.templates import CallFrames

    frames = CallFrames()
    a, b = torch.zeros(2, 3), torch.zeros(2, 3)  # equal values, different objects
    frames.remember(a, {"k": 1})
    assert frames.recall(a) == {"k": 1} and frames.recall(b) is None
    frames.remember(a, {"k": 2})  # the latest call that saw this tensor
    assert frames.recall(a) == {"k": 2}
    del a
    gc.collect()
    assert frames._frames == {}
