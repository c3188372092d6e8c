"""Loss options beyond the paper: calibrated (binned) tau, the positive-only control, hard negatives.

Each option is checked against a hand-written formula (or against the plain path it must equal):
`softrepa.loss` (binned_tau, contrastive_weight, negatives), `softrepa.pairs` (chunked two-pass
with hard negatives == one plain pass), `softrepa.negatives` (caption rules and config errors),
`softrepa.config` / `softrepa.train.loss_kwargs`, and the trainer's calibration and logging.
"""

from __future__ import annotations

import json
import logging
import math
import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.config import ConfigError, LossConfig, load_config, parse_overrides
from softrepa.loss import (
    binned_tau,
    duplicate_caption_mask,
    linear_tau,
    loss_grad_wrt_E,
    loss_grads,
    softrepa_loss,
)
from softrepa.negatives import CaptionNegatives, NegativesConfig
from softrepa.pairs import PairBatch, contrastive_backward, error_matrix
from softrepa.tiny import tiny_sd3_pipeline, tiny_sd15_pipeline
from softrepa.train import loss_kwargs
from tests.conformance import pair_tokens as _tokens  # the same strongly scaled tokens as chunked == plain

DUP_CAPS = ["a red car", "a tree", "A red  car", "the sea", "a boat"]  # 0 and 2 are duplicates


# --------------------------------------------------------------------------- helpers
def _rand_E(B: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.05 + 0.3 * torch.rand(B, B, generator=g)).to(dtype)


def _rand_H(B: int, K: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.05 + 0.3 * torch.rand(B, K, generator=g)).to(dtype)


def _lse(vals: list[float]) -> float:
    m = max(vals)
    return m + math.log(sum(math.exp(v - m) for v in vals))


def _ref_i2t(E, taus, scale=4.0, form="exp", mask=None, H=None, valid=None) -> list[float]:
    """Per-image CE over [batch prompts (unmasked), valid hard negatives], by direct loops."""
    B = E.shape[0]
    E = E.tolist()
    Hl = None if H is None else H.tolist()

    def logit(e, i):
        return scale * math.exp(-e / taus[i]) if form == "exp" else -e / taus[i]

    out = []
    for i in range(B):
        row = [logit(E[i][j], i) for j in range(B) if i == j or mask is None or not bool(mask[i][j])]
        if Hl is not None:
            row += [logit(Hl[i][k], i) for k in range(len(Hl[i])) if bool(valid[i][k])]
        out.append(_lse(row) - logit(E[i][i], i))
    return out


def _loss_and_grad(E, t=None, **kw):
    leaf = E.detach().clone().requires_grad_(True)
    out = softrepa_loss(leaf, t, **kw)
    (g,) = torch.autograd.grad(out.loss, leaf)
    return out, g


# --------------------------------------------------------------------------- binned_tau
def test_binned_tau_picks_the_bin_of_t_and_clamps():
    """tau(t) = table[floor(t * len / 1000)], clamped into the table at both ends."""
    tau = binned_tau([0.5, 0.4, 0.3, 0.2])
    t = torch.tensor([0.0, 249.9, 250.0, 500.0, 749.99, 750.0, 999.9, 1000.0, 1500.0, -3.0])
    expected = torch.tensor([0.5, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.2, 0.2, 0.5], dtype=torch.float64)
    assert torch.equal(tau(t), expected)
    assert float(tau(100.0)) == 0.5 and float(tau(999.0)) == 0.2  # python scalars too
    for bad in ([], [0.1, 0.0], [0.1, -0.2]):
        with pytest.raises(ValueError):
            binned_tau(bad)
    with pytest.raises(ValueError):
        tau(None)


def test_binned_tau_follows_the_device_of_t():
    """tau(t) is computed where t lives (the trainer passes CUDA timesteps), as linear_tau does."""
    t = torch.tensor([100.0, 600.0], device="meta")
    assert linear_tau(0.1, 0.2)(t).device == t.device  # the reference behaviour
    assert binned_tau([0.1, 0.2])(t).device == t.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_binned_tau_loss_on_cuda():
    E = _rand_E(3).cuda()
    t = torch.tensor([100.0, 600.0, 900.0], device="cuda")
    got = softrepa_loss(E, t, tau=binned_tau([0.1, 0.2])).loss
    ref = softrepa_loss(E.cpu(), t.cpu(), tau=binned_tau([0.1, 0.2])).loss
    torch.testing.assert_close(got.cpu(), ref)


@pytest.mark.parametrize("form", ["exp", "neg"])
@pytest.mark.parametrize("captions", [None, DUP_CAPS])
@pytest.mark.parametrize("per_row_t", [False, True])
def test_binned_tau_of_one_value_is_bit_identical_to_the_float(form, captions, per_row_t):
    """A table of one repeated value gives exactly the float-tau loss and dL/dE (torch.equal)."""
    B = 5
    E = _rand_E(B, seed=3)
    t = torch.tensor([10.0, 260.0, 510.0, 760.0, 999.0]) if per_row_t else torch.tensor(400.0)
    ref, g_ref = _loss_and_grad(E, None, tau=0.07, form=form, captions=captions, denoise_weight=0.5)
    got, g = _loss_and_grad(E, t, tau=binned_tau([0.07] * 4), form=form, captions=captions, denoise_weight=0.5)
    assert torch.equal(got.loss, ref.loss)
    assert torch.equal(g, g_ref)
    assert torch.equal(got.logits, ref.logits)


def test_binned_tau_per_row_t_matches_hand_computation():
    """Different temperatures per bin: image i uses table[bin(t_i)] for its whole row."""
    B = 5
    E = _rand_E(B, seed=5)
    table = [0.05, 0.1, 0.2]
    t = torch.tensor([0.0, 400.0, 999.0, 500.0, 100.0])  # bins 0, 1, 2, 1, 0
    taus = [0.05, 0.1, 0.2, 0.1, 0.05]
    for form in ("exp", "neg"):
        out = softrepa_loss(E, t, tau=binned_tau(table), form=form, reduction="none")
        ref = _ref_i2t(E, taus, form=form)
        assert out.i2t.tolist() == pytest.approx(ref, rel=1e-12)


# --------------------------------------------------------------------------- contrastive_weight
@pytest.mark.parametrize("form", ["exp", "neg"])
def test_positive_only_loss_and_gradient_are_the_denoising_term(form):
    """contrastive_weight=0: loss = w * mean(diag E); dL/dE = w/B on the diagonal, 0 elsewhere."""
    B, w = 5, 3.0
    E = _rand_E(B, seed=2)
    out, g = _loss_and_grad(E, tau=0.07, form=form, contrastive_weight=0.0, denoise_weight=w, captions=DUP_CAPS)
    assert torch.equal(out.loss, (w * E.diagonal()).mean())
    assert out.loss.item() == pytest.approx(w * E.diagonal().mean().item(), rel=1e-15)
    off = ~torch.eye(B, dtype=torch.bool)
    assert torch.equal(g[off], torch.zeros(B * B - B, dtype=g.dtype))
    torch.testing.assert_close(g.diagonal(), torch.full((B,), w / B, dtype=g.dtype), rtol=1e-15, atol=0)


@pytest.mark.parametrize("poison", [float("-inf"), float("inf"), float("nan"), -1e6, 1e30])
def test_positive_only_ignores_a_broken_contrastive_term(poison):
    """With contrastive_weight=0 a non-finite logit off the diagonal changes neither loss nor gradient."""
    B, w = 4, 1.0
    E = _rand_E(B, seed=6)
    bad = E.clone()
    bad[0, 1] = poison
    bad[2, 3] = poison
    for form in ("exp", "neg"):
        ref, g_ref = _loss_and_grad(E, tau=0.07, form=form, contrastive_weight=0.0, denoise_weight=w)
        got, g = _loss_and_grad(bad, tau=0.07, form=form, contrastive_weight=0.0, denoise_weight=w)
        assert torch.isfinite(got.loss) and torch.isfinite(g).all()
        assert torch.equal(got.loss, ref.loss) and torch.equal(g, g_ref)
        _, dE, _ = loss_grads(bad, tau=0.07, form=form, contrastive_weight=0.0, denoise_weight=w)
        assert torch.equal(dE, g_ref)
    # the poison is real: the paper's loss on the same errors is not finite for the NaN/-inf case
    if poison != poison or poison == float("-inf") or poison == -1e6:
        assert not torch.isfinite(softrepa_loss(bad, tau=0.07).loss)


def test_positive_only_without_denoise_weight_has_zero_gradient():
    """contrastive_weight=0, denoise_weight=0: nothing to train; loss_grads returns zeros, not an error."""
    E = _rand_E(4, seed=8)
    out, dE, dH = loss_grads(E, tau=0.07, contrastive_weight=0.0)
    assert out.loss.item() == 0.0 and torch.equal(dE, torch.zeros_like(E)) and dH is None


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("w", [0.0, 10.0])
def test_contrastive_weight_one_is_bit_identical_to_the_default(symmetric, w):
    """contrastive_weight=1 is the paper's loss bit for bit (loss and dL/dE)."""
    E = _rand_E(5, seed=9)
    kw = dict(tau=0.07, symmetric=symmetric, denoise_weight=w, captions=DUP_CAPS)
    ref, g_ref = _loss_and_grad(E, **kw)
    got, g = _loss_and_grad(E, contrastive_weight=1.0, **kw)
    assert torch.equal(got.loss, ref.loss) and torch.equal(g, g_ref)


def test_contrastive_weight_half_matches_hand_formula():
    """loss = mean_i(0.5 * i2t_i + w * E_ii), i2t over the unmasked prompts."""
    B, w = 5, 2.0
    E = _rand_E(B, seed=10)
    out = softrepa_loss(E, tau=0.07, contrastive_weight=0.5, denoise_weight=w, captions=DUP_CAPS)
    i2t = _ref_i2t(E, [0.07] * B, mask=duplicate_caption_mask(DUP_CAPS).tolist())
    ref = sum(0.5 * i2t[i] + w * E[i, i].item() for i in range(B)) / B
    assert out.loss.item() == pytest.approx(ref, rel=1e-12)
    assert out.i2t.item() == pytest.approx(sum(i2t) / B, rel=1e-12)  # i2t itself is not weighted
    with pytest.raises(ValueError, match="contrastive_weight"):
        softrepa_loss(E, contrastive_weight=-0.1)


# --------------------------------------------------------------------------- hard negatives
def _hard_setup():
    B, K = 5, 3
    E, H = _rand_E(B, seed=11), _rand_H(B, K, seed=12)
    valid = torch.tensor([[True, True, True], [True, False, False], [False, False, False],
                          [True, True, False], [False, True, False]])
    return E, H, valid


@pytest.mark.parametrize("form", ["exp", "neg"])
def test_hard_negatives_are_extra_columns_of_their_image_row(form):
    """i2t_i = CE([logits(E[i, :]) with the duplicate mask, logits(H[i, valid_i])], i)."""
    E, H, valid = _hard_setup()
    B = E.shape[0]
    t = torch.tensor([10.0, 600.0, 990.0, 300.0, 500.0])
    tau = binned_tau([0.05, 0.1])  # row-wise tau applies to the hard columns too
    taus = [0.05, 0.1, 0.1, 0.05, 0.1]
    out = softrepa_loss(E, t, tau=tau, form=form, captions=DUP_CAPS, negatives=H, negatives_valid=valid,
                        denoise_weight=0.5, reduction="none")
    ref = _ref_i2t(E, taus, form=form, mask=duplicate_caption_mask(DUP_CAPS).tolist(), H=H, valid=valid.tolist())
    assert out.i2t.tolist() == pytest.approx(ref, rel=1e-12)
    assert out.loss.tolist() == pytest.approx([ref[i] + 0.5 * E[i, i].item() for i in range(B)], rel=1e-12)
    assert out.logits.shape == (B, B + H.shape[1])
    assert torch.equal(torch.isinf(out.logits[:, B:]), ~valid)
    # row 2 has no valid negative: its loss is the batch-only CE
    plain = softrepa_loss(E, t, tau=tau, form=form, captions=DUP_CAPS, reduction="none")
    assert out.i2t[2].item() == pytest.approx(plain.i2t[2].item(), rel=1e-14)


@pytest.mark.parametrize("pad", [0.0, -5.0, 1e30, float("inf"), float("-inf"), float("nan")])
def test_padding_slots_change_nothing_and_get_zero_gradient(pad):
    """Whatever H holds where negatives_valid is False: same loss, dL/dH exactly 0 there."""
    E, H, valid = _hard_setup()
    kw = dict(tau=0.07, captions=DUP_CAPS, negatives_valid=valid, symmetric=True)
    ref = softrepa_loss(E, negatives=H, **kw)
    H2 = H.masked_fill(~valid, pad).requires_grad_(True)
    got = softrepa_loss(E, negatives=H2, **kw)
    assert torch.equal(got.loss, ref.loss)
    assert torch.equal(got.hard_accuracy, ref.hard_accuracy)
    (gH,) = torch.autograd.grad(got.loss, H2)
    assert torch.equal(gH[~valid], torch.zeros(int((~valid).sum()), dtype=gH.dtype))
    assert (gH[valid] != 0).all()  # valid negatives do get a gradient


def test_hard_accuracy_definition():
    """Own caption must strictly beat every valid hard negative (a tie is 'beaten'); padding never counts."""
    E = torch.tensor([[0.2, 0.9, 0.9, 0.9, 0.9],
                      [0.9, 0.3, 0.9, 0.9, 0.9],
                      [0.9, 0.9, 0.4, 0.9, 0.9],
                      [0.9, 0.9, 0.9, 0.5, 0.9],
                      [0.9, 0.9, 0.9, 0.9, 0.6]])
    H = torch.tensor([[0.3, 0.25],   # both worse than 0.2 -> correct
                      [0.3, 0.9],    # tie with own 0.3 -> wrong
                      [0.1, 0.9],    # a negative below own -> wrong
                      [0.1, 0.9],    # below own, but a padding slot -> correct
                      [0.0, 0.0]])   # no valid negative -> correct
    valid = torch.tensor([[True, True], [True, True], [True, True], [False, True], [False, False]])
    out = softrepa_loss(E, negatives=H, negatives_valid=valid)
    assert out.hard_accuracy.item() == pytest.approx(3 / 5)
    assert out.accuracy.item() == 1.0  # in-batch retrieval ignores the hard negatives
    assert softrepa_loss(E).hard_accuracy is None


def test_hard_negatives_input_errors():
    E, H, valid = _hard_setup()
    with pytest.raises(ValueError, match="negatives_valid"):
        softrepa_loss(E, negatives=H)
    with pytest.raises(ValueError, match="negatives_valid"):
        softrepa_loss(E, negatives=H, negatives_valid=valid[:, :2])
    with pytest.raises(ValueError, match="negatives"):
        softrepa_loss(E, negatives=H[:4], negatives_valid=valid[:4])
    with pytest.raises(ValueError, match="negatives"):
        softrepa_loss(E, negatives=H[:, 0], negatives_valid=valid[:, 0])


@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_grads_with_negatives_match_autograd(symmetric):
    """loss_grads returns dL/dE and dL/dH equal to autograd through the plain loss."""
    E, H, valid = _hard_setup()
    t = torch.tensor([10.0, 600.0, 990.0, 300.0, 500.0])
    kw = dict(tau=binned_tau([0.05, 0.1]), captions=DUP_CAPS, negatives_valid=valid, symmetric=symmetric,
              denoise_weight=2.0, contrastive_weight=0.7)
    El, Hl = E.clone().requires_grad_(True), H.clone().requires_grad_(True)
    ref = softrepa_loss(El, t, negatives=Hl, **kw)
    gE, gH = torch.autograd.grad(ref.loss, (El, Hl))
    out, dE, dH = loss_grads(E, t, negatives=H, **kw)
    torch.testing.assert_close(dE, gE, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(dH, gH, rtol=1e-14, atol=1e-16)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-14)
    assert not out.loss.requires_grad and out.hard_accuracy is not None
    with pytest.raises(ValueError, match="loss_grads"):
        loss_grad_wrt_E(E, t, negatives=H, **kw)
    # without negatives the third return is None
    assert loss_grads(E, t, tau=0.07)[2] is None


# --------------------------------------------------------------------------- pairs: hard negatives
CAPS3 = ["a red circle left of a blue square", "a green triangle", "a blue star above a red moon"]
NEG_TEXTS = ["a blue circle left of a red square", "a red circle right of a blue square",
             "a green square", "a red star above a blue moon", "a blue star below a red moon"]
NEG_ROWS, NEG_SLOTS = [0, 0, 1, 2, 2], [0, 1, 0, 0, 1]  # image 1 has one negative of K = 2 (padding)


def _pipe_and_backbone(family):
    pipe = tiny_sd3_pipeline(num_layers=6) if family == "sd3" else tiny_sd15_pipeline()
    bb = backbone_for(pipe, max_sequence_length=16)
    bb.freeze()
    return pipe, bb


def _pair_batch(bb, negatives=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    lat = bb.encode_images(pixels, generator=g)
    t = torch.tensor([600.0, 600.0, 600.0])
    noise = torch.randn((1,) + lat.shape[1:], generator=g)
    with torch.no_grad():
        cond = bb.encode_prompts(CAPS3, resolution=32)
    pb = PairBatch(lat, cond, CAPS3, t, noise)
    if negatives:
        with torch.no_grad():
            pb.negatives = bb.encode_prompts(NEG_TEXTS, resolution=32)
        pb.negative_rows, pb.negative_slots = torch.tensor(NEG_ROWS), torch.tensor(NEG_SLOTS)
        pb.num_negatives = 2
    return pb


def _grads(tokens):
    return [p.grad.clone() for p in tokens.parameters()]


@pytest.mark.parametrize("family", ["sd3", "sd15"])
def test_chunked_with_hard_negatives_equals_plain(family):
    """Two-pass chunked backward (pair_chunk 1, 3, 7, large) == one plain pass, hard negatives included."""
    pipe, bb = _pipe_and_backbone(family)
    pb = _pair_batch(bb)
    tokens = _tokens(pipe)
    kw = {"tau": 0.01, "form": "neg", "denoise_weight": 0.5}
    results = {}
    with attach(pipe, tokens):
        for chunk in (None, 1, 3, 7, 100):
            tokens.zero_grad(set_to_none=True)
            out = contrastive_backward(bb, pb, pair_chunk=chunk, loss_kwargs=kw)
            results[chunk] = (out, _grads(tokens))
        tokens.zero_grad(set_to_none=True)
        no_neg = contrastive_backward(bb, _pair_batch(bb, negatives=False), loss_kwargs=kw)
        g_no_neg = _grads(tokens)
    ref_out, ref_grads = results[None]
    assert ref_out.hard_accuracy is not None and ref_out.logits.shape == (3, 5)
    # the negatives matter: loss and gradient differ from the batch-only loss
    assert ref_out.loss.item() > no_neg.loss.item()
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=0) for a, b in zip(ref_grads, g_no_neg))
    for chunk, (out, grads) in results.items():
        assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=1e-5), chunk
        assert torch.equal(out.hard_accuracy, ref_out.hard_accuracy), chunk
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item(), msg=f"chunk {chunk}")


@pytest.mark.parametrize("family", ["sd3", "sd15"])
def test_positive_only_chunked_equals_plain_and_grad_of_mean_diag(family):
    """contrastive_weight=0, denoise_weight=1: token gradient == grad of mean_i E_ii (chunked and plain)."""
    pipe, bb = _pipe_and_backbone(family)
    pb = _pair_batch(bb)
    tokens = _tokens(pipe)
    kw = {"tau": 0.07, "contrastive_weight": 0.0, "denoise_weight": 1.0}
    with attach(pipe, tokens):
        tokens.zero_grad(set_to_none=True)
        error_matrix(bb, pb).diagonal().mean().backward()
        direct = _grads(tokens)
        for chunk in (None, 1, 4):
            tokens.zero_grad(set_to_none=True)
            out = contrastive_backward(bb, pb, pair_chunk=chunk, loss_kwargs=kw)
            with torch.no_grad():
                expected_loss = error_matrix(bb, pb).diagonal().mean().item()
            assert out.loss.item() == pytest.approx(expected_loss, rel=1e-6), chunk
            for g, r in zip(_grads(tokens), direct):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item(), msg=f"chunk {chunk}")
    assert any(r.abs().sum() > 0 for r in direct)


# --------------------------------------------------------------------------- negatives.py
def test_swap_needs_two_different_words_of_one_group():
    neg = CaptionNegatives(swap=[["red", "blue", "green"]])
    assert neg("a red circle and a blue square") == ["a blue circle and a red square"]
    assert neg("a red circle and a red square") == []  # the same word twice: nothing to swap
    assert neg("a red circle") == []
    assert neg("a redwood next to a blue lake") == []  # whole words only


def test_swap_when_the_first_two_hits_repeat_a_word():
    """The rule is 'two different words of the group occur', not 'the first two hits differ'."""
    neg = CaptionNegatives(swap=[["red", "blue"]])
    assert neg("a red cube, a red ball and a blue cone") != []


def test_swap_groups_are_independent():
    """A swap only trades words of one group; each group with two different words gives one negative."""
    neg = CaptionNegatives(swap=[["red", "blue"], ["circle", "square"]])
    assert neg("a red circle left of a blue square") == [
        "a blue circle left of a red square", "a red square left of a blue circle"]
    assert neg("a red circle left of a blue circle") == ["a blue circle left of a red circle"]


def test_flip_replaces_only_the_first_opposite_word():
    neg = CaptionNegatives(flip=[["left", "right"], ["above", "below"]])
    assert neg("a cat above a dog, left of a tree") == ["a cat below a dog, left of a tree"]
    assert neg("a cat right of a dog") == ["a cat left of a dog"]
    assert neg("a cat near a dog") == []


def test_rules_are_case_insensitive_and_keep_the_other_characters():
    neg = CaptionNegatives(swap=[["red", "blue"]], flip=[["left", "right"]])
    assert neg("A Red circle LEFT of a BLUE square.") == [
        "A BLUE circle LEFT of a Red square.", "A Red circle right of a BLUE square."]


def test_duplicates_of_the_caption_and_of_each_other_are_removed():
    # a flip pair that maps a word onto itself rebuilds the caption (up to case): dropped
    assert CaptionNegatives(flip=[["left", "LEFT"]])("a cat Left of a dog") == []
    # two groups that make the same swap: one negative
    neg = CaptionNegatives(swap=[["red", "blue"], ["RED", "Blue"]])
    assert neg("a red cube and a blue ball") == ["a blue cube and a red ball"]
    # a swap that yields the same text as an earlier swap, up to case: kept once
    neg = CaptionNegatives(swap=[["red", "blue"], ["Red", "BLUE", "green"]])
    assert neg("a red cube and a blue ball") == ["a blue cube and a red ball"]


def test_keep_predicate_drops_negatives():
    neg = CaptionNegatives(swap=[["red", "blue"], ["circle", "square"]], keep=lambda s: not s.startswith("a blue"))
    assert neg("a red circle left of a blue square") == ["a red square left of a blue circle"]


def test_for_batch_rows_slots_and_determinism():
    """At most k negatives per caption, each one of its own caption's, slots 0..n_i-1; seeded == repeatable."""
    neg = CaptionNegatives(swap=[["red", "blue"], ["circle", "square"]], flip=[["left", "right"]])
    caps = ["a red circle left of a blue square", "a green star", "a red square right of a blue circle",
            "a red circle and a blue circle"]
    for k in (1, 2, 5):
        texts, rows, slots = neg.for_batch(caps, k, random.Random(3))
        assert len(texts) == len(rows) == len(slots)
        for i, cap in enumerate(caps):
            mine = [s for s, r in zip(texts, rows) if r == i]
            assert len(mine) == min(k, len(neg(cap)))
            assert set(mine) <= set(neg(cap)) and len(set(mine)) == len(mine)
            assert [s for s, r in zip(slots, rows) if r == i] == list(range(len(mine)))
        assert rows == sorted(rows)
        assert neg.for_batch(caps, k, random.Random(3)) == (texts, rows, slots)
    # with room for all of them, every negative in rule order (no sampling)
    assert neg.for_batch(caps[:1], 5, random.Random(0))[0] == neg(caps[0])
    # k = 1 draws one of three: over seeds the choice varies
    picks = {neg.for_batch(caps[:1], 1, random.Random(s))[0][0] for s in range(30)}
    assert len(picks) > 1


@pytest.mark.parametrize("values, field", [
    ({"per_image": -1}, "negatives.per_image"),
    ({"swap": [["red"]]}, r"negatives.swap\[0\]"),
    ({"swap": [["red", "blue"], ["x"]]}, r"negatives.swap\[1\]"),
    ({"swap": [["red", " "]]}, r"negatives.swap\[0\]"),
    ({"flip": [["left", "right", "up"]]}, r"negatives.flip\[0\]"),
    ({"flip": [["above", "below"], ["left"]]}, r"negatives.flip\[1\]"),
])
def test_negatives_config_errors_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        NegativesConfig(**values)
    with pytest.raises(ConfigError, match=field):
        load_config(None, {"negatives": values})


def test_negatives_config_loads():
    cfg = load_config(None, parse_overrides(["--negatives.per_image", "2"])).negatives
    assert cfg.per_image == 2 and "red" in cfg.swap[0] and ["left", "right"] in cfg.flip
    assert load_config(None).negatives.per_image == 0  # off by default


# --------------------------------------------------------------------------- config
def _loss_cfg(*overrides: str) -> LossConfig:
    return load_config(None, parse_overrides(list(overrides))).loss


def test_calibrated_schedule_is_accepted_and_needs_a_table_for_loss_kwargs():
    cfg = _loss_cfg("--loss.tau_schedule", "calibrated")
    assert cfg.tau_table is None
    with pytest.raises(ConfigError, match="tau_table"):
        loss_kwargs(cfg)
    cfg = _loss_cfg("--loss.tau_schedule", "calibrated", "--loss.tau_table", "0.1,0.2")
    kw = loss_kwargs(cfg)
    assert isinstance(kw["tau"], binned_tau) and kw["tau"].table == [0.1, 0.2]
    assert float(kw["tau"](100.0)) == 0.1 and float(kw["tau"](900.0)) == 0.2


@pytest.mark.parametrize("overrides, field", [
    (["--loss.tau_table", "0.1,0.2"], "loss.tau_table"),  # constant schedule
    (["--loss.tau_schedule", "linear", "--loss.tau_min", "0.1", "--loss.tau_max", "0.2",
      "--loss.tau_table", "0.1,0.2"], "loss.tau_table"),
    (["--loss.tau_schedule", "calibrated", "--loss.tau_table", "0.1,0"], "loss.tau_table"),
    (["--loss.tau_schedule", "calibrated", "--loss.tau_table", "0.1,-0.3"], "loss.tau_table"),
    (["--loss.tau_schedule", "calibrated", "--loss.tau_min", "0.1"], "loss.tau_min"),
    (["--loss.tau_schedule", "calibrated", "--loss.tau_bins", "0"], "loss.tau_bins"),
    (["--loss.tau_schedule", "calibrated", "--loss.calibration_batches", "0"], "loss.calibration_batches"),
    (["--loss.contrastive_weight", "-0.5"], "loss.contrastive_weight"),
])
def test_loss_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _loss_cfg(*overrides)


def test_contrastive_weight_reaches_loss_kwargs_only_when_not_one():
    """The default (1) adds no key, so the paper's path is unchanged; 0 is passed through."""
    assert "contrastive_weight" not in loss_kwargs(LossConfig())
    kw = loss_kwargs(_loss_cfg("--loss.contrastive_weight", "0", "--loss.denoise_weight", "1"))
    assert kw["contrastive_weight"] == 0.0 and kw["denoise_weight"] == 1.0
    E = _rand_E(3)
    assert softrepa_loss(E, **kw).loss.item() == pytest.approx(E.diagonal().mean().item(), rel=1e-15)


# --------------------------------------------------------------------------- train
COLOUR_PAIRS = [("red", "blue", (230, 20, 20), (20, 20, 230)), ("green", "yellow", (20, 200, 20), (230, 230, 20)),
                ("blue", "green", (20, 20, 230), (20, 200, 20)), ("yellow", "red", (230, 230, 20), (230, 20, 20))]


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    """A saved tiny SD1.5 pipeline and 4 images whose captions name two colours and a relation."""
    root = tmp_path_factory.mktemp("effect_train")
    tiny_sd15_pipeline().save_pretrained(root / "sd15")
    data = root / "data"
    data.mkdir()
    for i, (a, b, rgb_a, rgb_b) in enumerate(COLOUR_PAIRS):
        img = np.full((40, 40, 3), 255, np.uint8)
        img[8:24, 2:18] = rgb_a
        img[16:32, 22:38] = rgb_b
        Image.fromarray(img).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {a} square left of a {b} circle\n")
    return root


def _args(root, out, steps: int, *extra: str) -> list[str]:
    return ["train", "--model", str(root / "sd15"), "--data", str(root / "data"), "--output_dir", str(out),
            "--resolution", "32", "--batch_size", "3", "--max_steps", str(steps), "--num_workers", "0",
            "--checkpoint_every", "2", "--log_every", "1", "--validation.every", "0", "--tokens.init", "normal",
            "--loss.denoise_weight", "1.0", "--lr", "0.05", *extra]


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_calibrated_run_saves_its_estimated_tau_table(toy_files, tmp_path, caplog):
    """tau_schedule calibrated without a table: the estimate is logged, used and saved in config.yaml."""
    from softrepa.cli import main
    from softrepa.train import Trainer

    out = tmp_path / "run"
    cal = ["--loss.tau_schedule", "calibrated", "--loss.tau_bins", "2", "--loss.calibration_batches", "2"]
    with caplog.at_level(logging.INFO, logger="softrepa.train"):
        assert main(_args(toy_files, out, 1, *cal)) == 0
    assert "calibrated tau per timestep bin" in caplog.text
    table = yaml.safe_load((out / "config.yaml").read_text())["loss"]["tau_table"]
    assert isinstance(table, list) and len(table) == 2 and all(v > 0 for v in table)
    assert yaml.safe_load((out / "checkpoints" / "step_0000001" / "config.yaml").read_text())["loss"]["tau_table"] == table
    assert math.isfinite(_rows(out)[0]["loss"])
    # the saved table is the calibration of this config (deterministic), and it is what the loss uses
    trainer = Trainer(load_config(None, parse_overrides(_args(toy_files, out, 1, *cal)[1:])))
    assert trainer.loss_kwargs is None  # not ready until calibrated
    assert trainer.calibrate() == table
    assert isinstance(trainer.loss_kwargs["tau"], binned_tau) and trainer.loss_kwargs["tau"].table == table


def test_resumed_calibrated_trainer_keeps_the_saved_table(toy_files, tmp_path):
    """Trainer.train(resume=True) with a table-less calibrated config reuses the run's saved table."""
    from softrepa.cli import main
    from softrepa.train import Trainer

    out = tmp_path / "run"
    cal = ["--loss.tau_schedule", "calibrated", "--loss.tau_bins", "2", "--loss.calibration_batches", "2"]
    assert main(_args(toy_files, out, 1, *cal, "--checkpoint_every", "1")) == 0
    table = yaml.safe_load((out / "config.yaml").read_text())["loss"]["tau_table"]
    cfg = load_config(None, parse_overrides(_args(toy_files, out, 2, *cal, "--checkpoint_every", "1")[1:]))
    assert cfg.loss.tau_table is None
    trainer = Trainer(cfg)
    trainer.calibrate = lambda: pytest.fail("a resumed run must not recalibrate")
    trainer.train(resume=True)
    assert trainer.loss_kwargs["tau"].table == table
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"]["tau_table"] == table
    assert [r["step"] for r in _rows(out)] == [1, 2]


def test_resume_with_the_same_config_file_keeps_the_calibrated_table(toy_files, tmp_path):
    """A calibrated run started from a --config file resumes from the same file (table kept)."""
    from softrepa.cli import main

    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"loss": {"tau_schedule": "calibrated", "tau_bins": 2,
                                               "calibration_batches": 2, "denoise_weight": 1.0}}))
    assert main(_args(toy_files, out, 1, "--config", str(recipe))) == 0
    table = yaml.safe_load((out / "config.yaml").read_text())["loss"]["tau_table"]
    assert main(_args(toy_files, out, 2, "--config", str(recipe), "--resume")) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"]["tau_table"] == table
    assert [r["step"] for r in _rows(out)] == [1, 2]


def test_hard_negatives_in_training_log_hard_accuracy(toy_files, tmp_path):
    """negatives.per_image 1 with two-colour captions: every metrics row has hard_accuracy in [0, 1]."""
    from softrepa.cli import main

    out = tmp_path / "run"
    assert main(_args(toy_files, out, 2, "--negatives.per_image", "1", "--loss.tau", "2.0", "--pair_chunk", "5")) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["hard_accuracy"] <= 1.0 and math.isfinite(r["loss"])
    assert yaml.safe_load((out / "config.yaml").read_text())["negatives"]["per_image"] == 1
    plain = tmp_path / "plain"
    assert main(_args(toy_files, plain, 1, "--loss.tau", "2.0")) == 0
    assert "hard_accuracy" not in _rows(plain)[0]
