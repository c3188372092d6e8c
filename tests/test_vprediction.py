"""v-prediction UNets: the training target and FlowEdit's v -> eps conversion, against the textbook formulas."""

from __future__ import annotations

import math

import pytest
import torch

from softrepa.backbone import backbone_for
from softrepa.flowedit import eps_denoiser


@pytest.fixture(scope="module")
def pipes():
    """The tiny SD1.5 pipeline as shipped (epsilon) and the same one with a v-prediction scheduler."""
    from diffusers import DDIMScheduler

    from softrepa.tiny import tiny_sd15_pipeline

    eps = tiny_sd15_pipeline()
    v = tiny_sd15_pipeline()
    v.scheduler = DDIMScheduler.from_config(v.scheduler.config, prediction_type="v_prediction")
    return {"epsilon": eps, "v_prediction": v}


def _x0_eps(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 6, 6, generator=g), torch.randn(n, 4, 6, 6, generator=g)  # (n, C, h, w) each


def test_backbone_reads_prediction_type(pipes):
    assert backbone_for(pipes["epsilon"]).prediction == "epsilon"
    assert backbone_for(pipes["v_prediction"]).prediction == "v_prediction"


def test_v_target_is_textbook_v(pipes):
    """target = alpha_t eps - sigma_t x0 with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""
    pipe = pipes["v_prediction"]
    bb = backbone_for(pipe)
    x0, eps = _x0_eps()
    t = torch.tensor([0.0, 417.0, 999.0])  # one timestep per sample: the per-sample indexing is checked too
    # by hand, from the pipeline's own scheduler (not the backbone's DDPM copy), in float64
    abar = pipe.scheduler.alphas_cumprod.double()[t.long()].view(-1, 1, 1, 1)  # (3, 1, 1, 1)
    want = abar.sqrt() * eps.double() - (1 - abar).sqrt() * x0.double()
    assert (bb.target(x0, eps, t).double() - want).abs().max().item() <= 1e-6
    # and it is the v of the backbone's own forward process: eps = alpha_t v + sigma_t x_t
    x_t = bb.add_noise(x0, eps, t).double()
    back = abar.sqrt() * want + (1 - abar).sqrt() * x_t
    assert (back - eps.double()).abs().max().item() <= 1e-5
    # an epsilon model's target is the noise itself
    assert torch.equal(backbone_for(pipes["epsilon"]).target(x0, eps, t), eps)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edit_denoiser_recovers_eps(pipes, prediction, monkeypatch):
    """The edit's dx/dsigma is eps exactly when the model returns the true eps / v of a known (x0, eps)."""
    bb = backbone_for(pipes[prediction])
    abar = bb.alphas_cumprod.double()  # (1000,)
    x0, eps = _x0_eps(2, seed=1)
    calls = []

    def analytic(x_vp, t, cond):
        # the model's input must be the VP sample at the integer timestep matching sigma
        assert torch.all(t == t.round())
        a = abar[t.long()].view(-1, 1, 1, 1)  # (N, 1, 1, 1)
        torch.testing.assert_close(x_vp.double(), a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double(),
                                   rtol=0, atol=1e-5)
        calls.append(int(t[0]))
        out = eps.double() if prediction == "epsilon" else a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()
        return out.float()

    monkeypatch.setattr(bb, "denoise", analytic)
    denoise = eps_denoiser(bb)
    for t in (1, 250, 999):
        sigma = math.sqrt((1 - abar[t].item()) / abar[t].item())  # the VE sigma of training timestep t
        x = x0 + sigma * eps  # (2, C, h, w) in the VE form the edit loop integrates
        out = denoise(x, torch.tensor(sigma), None)
        if prediction == "epsilon":
            assert torch.equal(out, eps)  # identity: the model output is passed through
        else:
            assert (out - eps).abs().max().item() <= 1e-5
    assert calls == [1, 250, 999]

