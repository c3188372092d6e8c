"""Soft tokens on UNets (SD1.5 / SDXL), what is specific to them: exactness against a hand-built context,
scalar timesteps and attention masks, the family check. Detach and gradients (also with checkpointing):
tests/test_conformance.py."""

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


def test_family_mismatch_is_named(unet_model):
    from softrepa.tiny import tiny_sd3_transformer

    tokens = SoftTokens.for_model(unet_model)
    with pytest.raises(SoftTokensError, match="family"):
        attach(tiny_sd3_transformer(num_layers=6), tokens)
