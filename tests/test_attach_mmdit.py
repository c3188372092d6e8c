"""Soft tokens on MM-DiT (SD3 / SD3.5), what is specific to it: exactness against Algorithm 1, per-sample
buckets, the last (context_pre_only) block, bad configs, half precision. Detach, gradients (also with
checkpointing) and attaching twice: tests/test_conformance.py."""

from __future__ import annotations

import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, SoftTokensError, attach
from tests.conftest import mmdit_inputs, randomize_tokens
from tests.reference import ref_mmdit_forward


@pytest.mark.parametrize("space", ["text", "block"])
@torch.no_grad()
def test_attached_matches_reference_loop(mmdit_model, space):
    model = mmdit_model
    tokens = randomize_tokens(SoftTokens.for_model(model, SoftTokensConfig(num_tokens=3, num_layers=3, token_space=space)))
    # mixed per-sample timesteps, incl. t = 1000 (bucket clamp) and a fractional t
    inp = mmdit_inputs(model, batch=3, timesteps=[1000.0, 503.7, 9.0])
    ref = ref_mmdit_forward(model, tokens, **inp)
    with attach(model, tokens):
        out = model(**inp).sample
    assert (out - ref).abs().max().item() <= 1e-5
    plain = model(**inp).sample
    assert (out - plain).abs().max().item() > 1e-3  # the tokens do something


@torch.no_grad()
def test_per_sample_buckets_are_used(sd3_model):
    """A sample's output must not depend on the other samples' timesteps in the batch."""
    tokens = randomize_tokens(SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=2)))
    inp = mmdit_inputs(sd3_model, batch=3, timesteps=[1000.0, 503.7, 9.0])
    with attach(sd3_model, tokens):
        batched = sd3_model(**inp).sample
        single = sd3_model(**{k: v[1:2] for k, v in inp.items()}).sample
    assert torch.allclose(batched[1:2], single, atol=1e-5)


def test_last_block_context_pre_only(sd3_model):
    """Tokens in the last (context_pre_only) block still reach the image stream."""
    tokens = randomize_tokens(SoftTokens.for_model(sd3_model, SoftTokensConfig(layers=(5,))))
    inp = mmdit_inputs(sd3_model)
    with torch.no_grad():
        ref = ref_mmdit_forward(sd3_model, tokens, **inp)
        with attach(sd3_model, tokens):
            out = sd3_model(**inp).sample
    assert (out - ref).abs().max() <= 1e-5


def test_bad_configs(sd3_model):
    with pytest.raises(SoftTokensError, match="model depth"):
        SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=7))
    with pytest.raises(SoftTokensError, match="num_tokens"):
        SoftTokensConfig(num_tokens=0)
    with pytest.raises(SoftTokensError, match="token_space"):
        SoftTokensConfig(token_space="latent")
    with pytest.raises(SoftTokensError, match="family"):
        softrepa.TokenLayout("sd4", 8, 8, 4, layers=(0,))
    with pytest.raises(SoftTokensError, match="unsupported model"):
        SoftTokens.for_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_with_fp32_tokens(sd3_model, dtype):
    """Tokens stay fp32 (trainable) and are cast into a half-precision model's dtype."""
    tokens = randomize_tokens(SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=2)), std=0.1)
    inp = mmdit_inputs(sd3_model)
    with torch.no_grad():
        ref = ref_mmdit_forward(sd3_model, tokens, **inp)
    model = sd3_model.to(dtype)
    half_inp = {k: (v.to(dtype) if v.is_floating_point() and k != "timestep" else v) for k, v in inp.items()}
    with attach(model, tokens):
        out = model(**half_inp).sample
        out.float().square().mean().backward()
    assert out.dtype == dtype and tokens.base.dtype == torch.float32
    assert tokens.base.grad is not None and torch.isfinite(tokens.base.grad).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
