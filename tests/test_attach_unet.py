"""Soft tokens on UNets (SD1.5 / SDXL): exactness against a hand-built context, detach, gradients."""

from __future__ import annotations

import pytest
import torch

from softrepa import SoftTokens, SoftTokensConfig, SoftTokensError, attach
from tests.conftest import randomize_tokens, unet_inputs
from tests.reference import ref_unet_forward




@pytest.mark.parametrize("blocks", [("down", "mid"), ("down",), ("down", "mid", "up")])
@torch.no_grad()
def test_attached_matches_reference(unet_model, blocks):
    tokens = randomize_tokens(SoftTokens.for_model(unet_model, SoftTokensConfig(num_tokens=3, blocks=blocks)))
    inp = unet_inputs(unet_model, timesteps=[999, 503, 9])
    ref = ref_unet_forward(unet_model, tokens, **inp)
    with attach(unet_model, tokens):
        out = unet_model(**inp).sample
    assert (out - ref).abs().max().item() <= 1e-5
    assert (out - unet_model(**inp).sample).abs().max().item() > 1e-4


@torch.no_grad()
def test_all_groups_equal_stock_unet_on_hand_built_context(unet_model):
    """With every group selected, attaching == feeding the stock UNet [BOS, tokens, rest]."""
    tokens = randomize_tokens(SoftTokens.for_model(unet_model, SoftTokensConfig(blocks=("down", "mid", "up"))))
    inp = unet_inputs(unet_model, timesteps=[640, 640, 640])
    s = tokens(torch.tensor(640), 3)[:, 0]  # (B, m, D)
    ctx = inp["encoder_hidden_states"]
    hand = dict(inp, encoder_hidden_states=torch.cat([ctx[:, :1], s, ctx[:, 1:]], dim=1))
    ref = unet_model(**hand).sample
    with attach(unet_model, tokens):
        out = unet_model(**inp).sample
    assert (out - ref).abs().max().item() <= 1e-5


@torch.no_grad()
def test_scalar_timestep_and_attention_mask(unet_model):
    tokens = randomize_tokens(SoftTokens.for_model(unet_model))
    inp = unet_inputs(unet_model)
    inp["timestep"] = 321  # pipelines may pass a scalar
    mask = torch.ones(3, inp["encoder_hidden_states"].shape[1])
    with attach(unet_model, tokens):
        a = unet_model(**inp).sample
        b = unet_model(**inp, encoder_attention_mask=mask).sample  # all-ones mask == no mask
    assert (a - b).abs().max() <= 1e-5


@torch.no_grad()
def test_detach_is_bit_exact(unet_model):
    inp = unet_inputs(unet_model)
    before = unet_model(**inp).sample
    n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet_model.modules())
    for _ in range(2):
        attach(unet_model, SoftTokens.for_model(unet_model)).remove()
    assert n_hooks == sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet_model.modules())
    assert torch.equal(before, unet_model(**inp).sample)


def test_gradients_only_on_tokens_with_and_without_checkpointing(unet_model):
    unet_model.requires_grad_(False)
    tokens = randomize_tokens(SoftTokens.for_model(unet_model), std=0.1)
    inp = unet_inputs(unet_model)
    grads = []
    for ckpt in (False, True):
        if ckpt:
            unet_model.enable_gradient_checkpointing()
        unet_model.train()
        tokens.zero_grad(set_to_none=True)
        with attach(unet_model, tokens):
            unet_model(**inp).sample.square().mean().backward()
        grads.append(tokens.base.grad.clone())
    assert all(p.grad is None for p in unet_model.parameters())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_family_mismatch_is_named(unet_model):
    from softrepa.tiny import tiny_sd3_transformer

    tokens = SoftTokens.for_model(unet_model)
    with pytest.raises(SoftTokensError, match="family"):
        attach(tiny_sd3_transformer(num_layers=6), tokens)
