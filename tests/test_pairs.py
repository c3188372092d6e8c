"""Exact contrastive gradients: chunked two-pass == plain single pass; pair evaluation semantics."""

from __future__ import annotations

import pytest
import torch

from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.pairs import PairBatch, contrastive_backward, error_matrix
from softrepa.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline
from softrepa.tiny import tiny_flux2_pipeline
from softrepa.tiny import tiny_qwenimage_pipeline

CAPTIONS = ["a red circle", "a blue square", "a red circle", "a green triangle"]
BUILD = {"sd3": lambda: tiny_sd3_pipeline(num_layers=6), "sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline,
         "flux": tiny_flux_pipeline, "flux-dev": lambda: tiny_flux_pipeline(guidance_embeds=True)}
BUILD["flux2"] = tiny_flux2_pipeline
BUILD["flux2-no-guidance"] = lambda: tiny_flux2_pipeline(guidance_embeds=False)
BUILD["qwenimage"] = tiny_qwenimage_pipeline  # captions of different lengths: padded text masks


def make_batch(backbone, n=4, shared_t=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    lat = backbone.encode_images(pixels, generator=g)
    t = backbone.sample_timesteps(n, g, shared=shared_t)
    noise = torch.randn((1,) + lat.shape[1:], generator=g)
    cond = backbone.encode_prompts(CAPTIONS[:n], resolution=32)
    return PairBatch(lat, cond, CAPTIONS[:n], t, noise)


def _tokens(pipe):
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2, blocks=("down", "mid")), seed=0)
    with torch.no_grad():
        for p in tokens.parameters():
            p.mul_(10)
    return tokens


@pytest.mark.parametrize("family", ["sd3", "sd15", "sdxl", "flux", "flux-dev", "flux2", "flux2-no-guidance", "qwenimage"])
@pytest.mark.parametrize("shared_t", [True, False])
def test_chunked_equals_plain(family, shared_t):
    pipe = BUILD[family]()
    bb = backbone_for(pipe)
    bb.freeze()
    batch = make_batch(bb, shared_t=shared_t)
    tokens = _tokens(pipe)
    kw = {"tau": 0.07, "scale": 4.0, "denoise_weight": 0.5 if family in ("sd15", "sdxl") else 0.0}
    results = {}
    with attach(pipe, tokens):
        for chunk in (None, 1, 3, 5, 16):
            tokens.zero_grad(set_to_none=True)
            out = contrastive_backward(bb, batch, pair_chunk=chunk, loss_kwargs=kw)
            results[chunk] = (out.loss.item(), [p.grad.clone() for p in tokens.parameters()])
    ref_loss, ref_grads = results[None]
    assert any(g.abs().sum() > 0 for g in ref_grads)
    for chunk, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), chunk
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7 + 1e-4 * r.abs().max().item())
    assert all(p.grad is None for p in pipe.text_encoder.parameters())


def test_error_matrix_entries_are_pair_errors():
    pipe = tiny_sd3_pipeline(num_layers=6)
    bb = backbone_for(pipe)
    batch = make_batch(bb, n=3)
    with torch.no_grad():
        E = error_matrix(bb, batch, chunk=2)
        i, j = 2, 0
        x0 = batch.latents[i:i + 1]
        s = batch.t[i] / 1000
        x_t = (1 - s) * x0 + s * batch.noise
        pred = pipe.transformer(hidden_states=x_t, timestep=batch.t[i:i + 1], encoder_hidden_states=batch.cond.embeds[j:j + 1],
                                pooled_projections=batch.cond.pooled[j:j + 1]).sample
        direct = (pred - (batch.noise - x0)).pow(2).mean()
    assert E.shape == (3, 3)
    assert E[i, j].item() == pytest.approx(direct.item(), rel=1e-5)


def test_shared_timestep_and_noise_by_default():
    bb = backbone_for(tiny_sd15_pipeline())
    t = bb.sample_timesteps(5, torch.Generator().manual_seed(0))
    assert t.unique().numel() == 1 and 0 <= t[0] < 1000
    t2 = bb.sample_timesteps(64, torch.Generator().manual_seed(0), shared=False)
    assert t2.unique().numel() > 1
