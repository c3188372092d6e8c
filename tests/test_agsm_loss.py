"""AGSM's loss as a pure function (issue 23's first piece): against a loop over pairs written from the
paper's formula, stable where the official softmax is 0 / 0, and its gradient on the right tensors."""

from __future__ import annotations

import pytest
import torch

from softrepa.errors import ConfigError
from softrepa.loss import agsm_loss


def reference(pred, ema, target, positive, tau, gp, gn):
    """Pair by pair in float64, as written: r = -mean (target - ema)^2, w = exp(r / tau) / sum, ..."""
    pred, ema, target = pred.double(), ema.double(), target.double()
    b, p = pred.shape[:2]
    pos_terms, neg_terms = [], []
    for i in range(b):
        tgt = target[i, 0] if target.shape[1] == 1 else None
        r = torch.stack([-((target[i, j if tgt is None else 0] - ema[i, j]) ** 2).mean() for j in range(p)])
        w = torch.exp((r - r.max()) / tau)
        w = w / w.sum()
        mix = sum(w[j] * ema[i, j] for j in range(p))
        for j in range(p):
            y = target[i, j if tgt is None else 0]
            g = ema[i, j] - mix
            if positive[i, j]:
                pos_terms.append(((pred[i, j] - (y + gp * g)) ** 2).mean())
            else:
                neg_terms.append(((pred[i, j] - (y - gn * g)) ** 2).mean())
    loss = torch.stack(pos_terms).mean()
    if gn > 0 and neg_terms:
        loss = loss + torch.stack(neg_terms).mean()
    return loss


def inputs(b=3, p=5, seed=0, scale=1.0, full_target=False):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, p, 4, 2, 2, generator=g)
    ema = scale * torch.randn(b, p, 4, 2, 2, generator=g)
    target = torch.randn(b, p if full_target else 1, 4, 2, 2, generator=g)
    positive = torch.zeros(b, p, dtype=torch.bool)
    positive[torch.arange(b), torch.arange(b)] = True  # P > B: the last captions are hard negatives
    return pred, ema, target, positive


@pytest.mark.parametrize("full_target", [False, True])
@pytest.mark.parametrize("gammas", [(1.0, 1.0), (1.0, 0.1), (0.5, 0.0)])
def test_agsm_loss_equals_the_formula_pair_by_pair(full_target, gammas):
    pred, ema, target, positive = inputs(full_target=full_target)
    got = agsm_loss(pred, ema, target, positive, tau=0.1, gamma_pos=gammas[0], gamma_neg=gammas[1])
    want = reference(pred, ema, target, positive, 0.1, *gammas)
    assert got.ndim == 0
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 2), (3, 7), (4, 4)])
def test_off_diagonal_positives_and_gradients_match_the_formula(shape):
    """Positives anywhere in their row (a permutation, P >= B), the gradient w.r.t. pred equal to the
    float64 formula's."""
    b, p = shape
    pred, ema, target, _ = inputs(b=b, p=p, seed=7)
    positive = torch.zeros(b, p, dtype=torch.bool)
    positive[torch.arange(b), torch.randperm(p, generator=torch.Generator().manual_seed(1))[:b]] = True
    pred.requires_grad_(True)
    got = agsm_loss(pred, ema, target, positive, tau=0.2, gamma_pos=0.7, gamma_neg=0.3)
    (grad,) = torch.autograd.grad(got, pred)
    pred64 = pred.detach().double().requires_grad_(True)
    want = reference(pred64, ema, target, positive, 0.2, 0.7, 0.3)
    (grad64,) = torch.autograd.grad(want, pred64)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad.double(), grad64, rtol=1e-5, atol=1e-7)


def test_stable_where_the_official_softmax_is_zero_over_zero():
    """Every error of a row above ~8.7 at tau 0.1: exp(r / tau) underflows to 0 in fp32."""
    pred, ema, target, positive = inputs(scale=40.0)
    r = -((target - ema) ** 2).mean(dim=(2, 3, 4))
    official = torch.exp(r / 0.1)
    assert bool((official.sum(1) == 0).any())  # the official weights would be 0 / 0 = nan here
    got = agsm_loss(pred, ema, target, positive)
    assert torch.isfinite(got) and torch.allclose(got.double(), reference(pred, ema, target, positive, 0.1, 1.0, 1.0),
                                                  rtol=1e-5)


def test_gradient_reaches_pred_only_and_negatives_only_when_gamma_neg_is_positive():
    pred, ema, target, positive = inputs()
    pred.requires_grad_(True)
    ema.requires_grad_(True)
    agsm_loss(pred, ema, target, positive, gamma_neg=1.0).backward()
    assert ema.grad is None  # the EMA predictions are constants to the gradient
    assert bool((pred.grad[~positive].abs().sum(dim=(1, 2, 3)) > 0).all())
    pred.grad = None
    agsm_loss(pred, ema, target, positive, gamma_neg=0.0).backward()
    assert bool((pred.grad[~positive] == 0).all()) and bool((pred.grad[positive] != 0).any())


def test_target_of_one_row_broadcasts_like_the_full_one():
    pred, ema, target, positive = inputs()
    full = target.expand(-1, pred.shape[1], -1, -1, -1)
    assert torch.equal(agsm_loss(pred, ema, target, positive), agsm_loss(pred, ema, full, positive))


def test_bad_settings_and_shapes_are_named():
    pred, ema, target, positive = inputs()
    with pytest.raises(ConfigError, match="tau"):
        agsm_loss(pred, ema, target, positive, tau=0.0)
    with pytest.raises(ConfigError, match="gamma"):
        agsm_loss(pred, ema, target, positive, gamma_neg=-1.0)
    two = positive.clone()
    two[0, 4] = True
    with pytest.raises(ValueError, match="one True per row"):
        agsm_loss(pred, ema, target, two)
    with pytest.raises(ValueError, match="target"):
        agsm_loss(pred, ema, target[:, :, :2], positive)
