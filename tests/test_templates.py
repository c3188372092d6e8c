"""The three placement templates against plain re-computations, and the family contract's shape.

The dual-stream and cross-attention templates run on every registered family in the conformance
suite; the single-stream one has no built-in family yet (Z-Image is next), so it is checked here on a
tiny joint-sequence model `[image, text]` against a forward written out by hand.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import softrepa
import softrepa.backbone
import softrepa.tiny
from softrepa.family import Family, family_names, get_family
from softrepa.hooks import AttachHandle, call_argument
from softrepa.templates import (CROSS_ATTENTION, SINGLE_STREAM, Placement, insert_rows, install, per_layer,
                                remove_rows)
from softrepa.tokens import SoftTokens, TokenLayout

D, M = 8, 3


class JointBlock(nn.Module):
    """Single-stream block: attention over the whole sequence, then an MLP; returns the sequence."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.qkv, self.mlp = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, hidden_states: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / D ** 0.5, dim=-1)  # (B, n, n)
        x = hidden_states + att @ v
        return x + self.mlp(x)


class JointModel(nn.Module):
    """[image, text] through single-stream blocks; the image rows come out."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(JointBlock(i) for i in range(depth))

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        n_img = hidden_states.shape[1]
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1)  # (B, n_img + n_txt, D)
        for block in self.blocks:
            x = block(x, image_seq_len=n_img)
        return x[:, :n_img]


def _tokens(layers=(0, 2)) -> SoftTokens:
    # any registered per-block family's rules serve: the template itself never reads the family
    layout = TokenLayout("sd3", D, D, M, 10, "block", tuple(layers), (), 3)
    tokens = SoftTokens(layout)
    with torch.no_grad():
        for p in tokens.parameters():
            p.normal_()
    return tokens


SINGLE = Placement(SINGLE_STREAM, select=per_layer("blocks"), text_arg="hidden_states",
                   text_start=lambda block, args, kwargs: call_argument(block, args, kwargs, "image_seq_len"))


def test_single_stream_template_equals_the_forward_written_by_hand():
    torch.manual_seed(0)
    model, tokens = JointModel(), _tokens()
    img, txt, t = torch.randn(2, 5, D), torch.randn(2, 4, D), torch.tensor([100.0, 900.0])
    vanilla = model(img, txt, t)
    handle = AttachHandle(model, tokens)
    install(model, handle, SINGLE, None)
    got = model(img, txt, t)
    with handle.disabled():
        assert torch.equal(model(img, txt, t), vanilla)
    handle.remove()
    assert torch.equal(model(img, txt, t), vanilla)
    assert not model.blocks[0]._forward_pre_hooks and not model._forward_pre_hooks

    # by hand (on the bare model): block k of the layout sees [image, s_k, text] and returns it without the s_k rows
    toks = tokens(t, 2)  # (B, sets, m, D)
    x = torch.cat([img, txt], dim=1)
    for k, block in enumerate(model.blocks):
        if k in tokens.layout.layers:
            s = toks[:, tokens.layout.layers.index(k)]
            y = block(torch.cat([x[:, :5], s, x[:, 5:]], dim=1), image_seq_len=5)
            x = torch.cat([y[:, :5], y[:, 5 + M:]], dim=1)
        else:
            x = block(x, image_seq_len=5)
    assert torch.equal(got, x[:, :5])
    assert not torch.allclose(got, vanilla)


def test_cross_attention_template_prepends_at_position_zero_and_grows_a_bias_mask():
    """SANA / Wan style: the context gets the tokens first; an additive mask gets zeros for them."""
    seen = {}

    class CrossBlock(nn.Module):
        def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask=None):
            seen["ctx"], seen["mask"] = encoder_hidden_states, encoder_attention_mask
            return hidden_states + encoder_hidden_states.mean(1, keepdim=True)

    class CrossModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([CrossBlock()])

        def forward(self, hidden_states, encoder_hidden_states, timestep, mask):
            return self.blocks[0](hidden_states, encoder_hidden_states, encoder_attention_mask=mask)

    model, tokens = CrossModel(), _tokens(layers=(0,))
    handle = AttachHandle(model, tokens)
    install(model, handle, Placement(CROSS_ATTENTION, select=per_layer("blocks"), mask_arg="encoder_attention_mask",
                                     mask_kind="bias"), None)
    ctx, mask = torch.randn(2, 4, D), torch.tensor([[0.0, 0, -1e4, -1e4], [0, 0, 0, -1e4]])[:, None]
    model(torch.randn(2, 5, D), ctx, torch.tensor([1.0, 2.0]), mask)
    assert torch.equal(seen["ctx"][:, M:], ctx)
    assert torch.equal(seen["ctx"][:, :M], tokens(torch.tensor([1.0, 2.0]), 2)[:, 0])
    assert torch.equal(seen["mask"], torch.cat([torch.zeros(2, 1, M), mask], dim=-1))
    handle.remove()


@pytest.mark.parametrize("at", [0, 1, 4])
def test_insert_then_remove_rows_is_the_identity(at):
    x, rows = torch.randn(2, 6, D), torch.randn(2, M, D)
    grown = insert_rows(x, rows, at)
    assert torch.equal(grown[:, at:at + M], rows)
    assert torch.equal(remove_rows(grown, at, M), x)


def test_placement_refuses_inconsistent_metadata():
    with pytest.raises(ValueError, match="template"):
        Placement("sideways")
    with pytest.raises(ValueError, match="text_start"):
        Placement(SINGLE_STREAM)
    with pytest.raises(ValueError, match="rotary"):
        Placement(CROSS_ATTENTION, rotary_arg="image_rotary_emb")


def test_no_concrete_family_class_inherits_another_and_each_declares_the_contract():
    classes = {type(get_family(n)) for n in family_names()}
    for cls in classes:
        assert cls.__bases__ == (Family,), f"{cls.__name__} derives from {cls.__bases__}"
    for name in family_names():
        fam = get_family(name)
        assert isinstance(fam.placement, Placement)
        for method in ("matches", "backbone", "edit_model"):  # what every family must write itself
            assert getattr(type(fam), method) is not getattr(Family, method), f"{name} lacks {method}"
        assert fam.text_length is None or fam.text_length > 0


def test_the_backbone_declares_encode_source_and_the_text_length():
    from softrepa.backbone import Backbone

    assert "encode_source" in vars(Backbone) and "pixels" in inspect.signature(Backbone.encode_source).parameters
    pipe = softrepa.tiny.tiny_sd3_pipeline(num_layers=2)
    assert softrepa.backbone.backbone_for(pipe).max_sequence_length == get_family("sd3").text_length
    assert softrepa.backbone.backbone_for(pipe, max_sequence_length=8).max_sequence_length == 8
    with pytest.raises(softrepa.SoftrepaError, match="takes no text length|take no text length"):
        get_family("sd15").resolve_text_length(77)


def test_carrying_swaps_the_tokens_for_a_block_only_and_refuses_another_layout():
    torch.manual_seed(0)
    model, a, b = JointModel(), _tokens(), _tokens()
    with torch.no_grad():
        b.base.mul_(-1)
    img, txt, t = torch.randn(2, 5, D), torch.randn(2, 4, D), torch.tensor([100.0, 900.0])
    handle = AttachHandle(model, a)
    install(model, handle, SINGLE, None)
    with_a = model(img, txt, t)
    with handle.carrying(b) as h:
        assert h.tokens is b
        with_b = model(img, txt, t)
    assert handle.tokens is a and torch.equal(model(img, txt, t), with_a) and not torch.allclose(with_a, with_b)
    handle.tokens = b  # what `carrying` does inside: the same output
    assert torch.equal(model(img, txt, t), with_b)
    handle.tokens = a
    with pytest.raises(softrepa.SoftTokensError, match="layout"):
        with handle.carrying(_tokens(layers=(0,))):
            pass
    handle.remove()


def test_a_call_without_tokens_is_recomputed_without_them_under_checkpointing():
    """Two calls before one backward, the first with the tokens disabled: under gradient checkpointing its
    blocks are re-run without tokens (an empty call state is a state, not "none remembered"), so every
    gradient equals the one without checkpointing."""
    from softrepa.backbone import backbone_for

    pipe = softrepa.tiny.tiny_sd3_pipeline(num_layers=4)
    model = pipe.transformer
    bb = backbone_for(pipe, max_sequence_length=16)
    cond = bb.encode_prompts(["a red circle"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, 4, generator=g)
    grads = []
    for checkpointing in (False, True):
        tokens = SoftTokens.for_model(pipe, softrepa.SoftTokensConfig(num_layers=2), seed=0)
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.enable_gradient_checkpointing()
        try:
            with softrepa.attach(pipe, tokens) as handle:
                with handle.disabled():
                    first = bb.denoise(x, torch.tensor([300.0]), cond)
                second = bb.denoise(x, torch.tensor([700.0]), cond)
                (first.pow(2).mean() + second.pow(2).mean()).backward()
        finally:
            model.disable_gradient_checkpointing()
            model.requires_grad_(False)
        grads.append([p.grad.clone() for p in (*tokens.parameters(), model.proj_out.weight)])
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)
