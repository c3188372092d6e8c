"""Pair evaluation semantics (the error matrix, shared timestep and noise). Chunked two-pass == plain
single pass, on every family: tests/test_conformance.py::test_chunked_equals_plain."""

from __future__ import annotations

import pytest
import torch

from softrepa.backbone import backbone_for
from softrepa.pairs import error_matrix
from softrepa.tiny import tiny_sd3_pipeline, tiny_sd15_pipeline
from tests.conformance import pair_batch

def test_error_matrix_entries_are_pair_errors():
    pipe = tiny_sd3_pipeline(num_layers=6)
    bb = backbone_for(pipe)
    batch = pair_batch(bb, n=3)
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
