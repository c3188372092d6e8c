"""softrepa.loss: exact equality with hand-written formulas, gradients, masking, chunked backprop."""

from __future__ import annotations

import math

import pytest
import torch

from softrepa.loss import (
    LossOutput,
    constant_tau,
    contrastive_logits,
    duplicate_caption_mask,
    linear_tau,
    loss_grad_wrt_E,
    retrieval_accuracy,
    softrepa_loss,
)


def _rand_E(B: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # errors of the size a flow model produces at tau=0.07: a few tenths, positive
    return (0.05 + 0.3 * torch.rand(B, B, generator=g)).to(dtype)


def _ref_loss(E, taus, scale, form, symmetric, w, mask=None):
    """Direct loops: logit(i, j), explicit logsumexp over the unmasked entries."""
    B = E.shape[0]
    E = E.tolist()

    def logit(i, j):
        return scale * math.exp(-E[i][j] / taus[i]) if form == "exp" else -E[i][j] / taus[i]

    def allowed(i, j):  # pair (image i, prompt j) takes part in the softmax
        return i == j or mask is None or not bool(mask[i][j])

    def lse(vals):
        m = max(vals)
        return m + math.log(sum(math.exp(v - m) for v in vals))

    i2t = [lse([logit(i, j) for j in range(B) if allowed(i, j)]) - logit(i, i) for i in range(B)]
    t2i = [lse([logit(i, j) for i in range(B) if allowed(i, j)]) - logit(j, j) for j in range(B)]
    per = []
    for i in range(B):
        c = 0.5 * (i2t[i] + t2i[i]) if symmetric else i2t[i]
        per.append(c + w * E[i][i])
    return sum(per) / B, sum(i2t) / B, sum(t2i) / B, sum(E[i][i] for i in range(B)) / B


@pytest.mark.parametrize("form", ["exp", "neg"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("w", [0.0, 10.0])
def test_loss_matches_hand_formula(form, symmetric, w):
    B = 6
    E = _rand_E(B, seed=B)
    out = softrepa_loss(E, tau=0.07, scale=4.0, form=form, symmetric=symmetric, denoise_weight=w)
    loss, i2t, t2i, den = _ref_loss(E, [0.07] * B, 4.0, form, symmetric, w)
    assert isinstance(out, LossOutput)
    assert out.loss.ndim == 0
    assert out.loss.item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
    assert out.i2t.item() == pytest.approx(i2t, rel=1e-12)
    assert out.denoise.item() == pytest.approx(den, rel=1e-12)
    if symmetric:
        assert out.t2i.item() == pytest.approx(t2i, rel=1e-12)
    else:
        assert out.t2i is None


def test_logits_forms_and_scale():
    E = _rand_E(4)
    assert torch.equal(contrastive_logits(E, tau=0.1, scale=4.0, form="exp"), 4.0 * torch.exp(-E / 0.1))
    assert torch.equal(contrastive_logits(E, tau=0.1, form="neg"), -E / 0.1)
    with pytest.raises(ValueError):
        contrastive_logits(E, form="cosine")
    with pytest.raises(ValueError):
        contrastive_logits(E, tau=0.0)


def test_callable_tau_per_row_and_shared():
    B = 5
    E = _rand_E(B, seed=1)
    sched = linear_tau(0.05, 0.2)
    t = torch.tensor([0.0, 250.0, 500.0, 750.0, 1000.0])
    taus = [0.05 + 0.15 * v / 1000 for v in t.tolist()]
    logits = contrastive_logits(E, t, tau=sched)
    expected = 4.0 * torch.exp(-E / torch.tensor(taus, dtype=E.dtype)[:, None])  # row-wise tau
    torch.testing.assert_close(logits, expected)
    out = softrepa_loss(E, t, tau=sched, symmetric=True, denoise_weight=1.0)
    assert out.loss.item() == pytest.approx(_ref_loss(E, taus, 4.0, "exp", True, 1.0)[0], rel=1e-12)
    # a shared scalar t gives the same as a float tau
    a = softrepa_loss(E, torch.tensor(400.0), tau=sched).loss
    b = softrepa_loss(E, tau=0.05 + 0.15 * 0.4).loss
    torch.testing.assert_close(a, b)
    # constant_tau is the float
    torch.testing.assert_close(softrepa_loss(E, t, tau=constant_tau(0.07)).loss, softrepa_loss(E).loss)
    with pytest.raises(ValueError):
        softrepa_loss(E, tau=sched)  # callable tau needs t
    with pytest.raises(ValueError):
        softrepa_loss(E, torch.zeros(3), tau=sched)  # wrong number of timesteps


def test_reductions():
    E = _rand_E(4, seed=3)
    none = softrepa_loss(E, reduction="none", denoise_weight=2.0, symmetric=True)
    assert none.loss.shape == (4,)
    torch.testing.assert_close(none.loss.mean(), softrepa_loss(E, denoise_weight=2.0, symmetric=True).loss)
    torch.testing.assert_close(
        none.loss.sum(), softrepa_loss(E, reduction="sum", denoise_weight=2.0, symmetric=True).loss
    )
    with pytest.raises(ValueError):
        softrepa_loss(E, reduction="max")
    with pytest.raises(ValueError):
        softrepa_loss(E[:, :3])


def test_duplicate_caption_mask():
    caps = ["A cat.", "a  cat.", "a dog", " A CAT. ", "bird"]
    m = duplicate_caption_mask(caps)
    assert m.dtype == torch.bool and m.shape == (5, 5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    for i, j in [(0, 1), (0, 3), (1, 3)]:
        expected[i, j] = expected[j, i] = True
    assert torch.equal(m, expected)
    assert not m.diagonal().any()


@pytest.mark.parametrize("symmetric", [False, True])
def test_masked_duplicate_equals_removing_it(symmetric):
    """Image 0 and image 2 share a caption: for image 0 the prompt 2 is no negative (and vice versa)."""
    B = 4
    E = _rand_E(B, seed=7)
    caps = ["a red car", "a tree", "A red  car", "the sea"]
    out = softrepa_loss(E, captions=caps, symmetric=symmetric, form="neg", tau=0.1)
    mask = duplicate_caption_mask(caps)
    assert out.logits[0, 2] == float("-inf") and out.logits[2, 0] == float("-inf")
    assert torch.isfinite(out.logits.diagonal()).all()  # diagonal kept
    ref = _ref_loss(E, [0.1] * B, 4.0, "neg", symmetric, 0.0, mask=mask.tolist())[0]
    assert out.loss.item() == pytest.approx(ref, rel=1e-12)

    # by hand: row 0's CE over prompts {0, 1, 3} only
    logits = -E / 0.1
    keep = [0, 1, 3]
    row0 = torch.logsumexp(logits[0, keep], 0) - logits[0, 0]
    torch.testing.assert_close(softrepa_loss(E, captions=caps, form="neg", tau=0.1, reduction="none").i2t[0], row0)
    # without the mask the duplicate acts as a negative and the loss is larger
    assert softrepa_loss(E, form="neg", tau=0.1).loss > softrepa_loss(E, captions=caps, form="neg", tau=0.1).loss


def test_explicit_mask_or_captions_and_diagonal_ignored():
    E = _rand_E(3, seed=2)
    m = torch.eye(3, dtype=torch.bool)  # a diagonal mask entry must be ignored
    torch.testing.assert_close(softrepa_loss(E, mask=m).loss, softrepa_loss(E).loss)
    m2 = torch.zeros(3, 3, dtype=torch.bool)
    m2[0, 1] = True
    out = softrepa_loss(E, mask=m2, captions=["x", "y", "x"])
    assert out.logits[0, 1] == -math.inf and out.logits[0, 2] == -math.inf and out.logits[2, 0] == -math.inf
    assert math.isfinite(out.logits[1, 0].item())


def test_accuracy_definition():
    E = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.9],  # own lowest -> correct
            [0.2, 0.2, 0.4, 0.8],  # tie with prompt 0 -> wrong
            [0.1, 0.9, 0.3, 0.1],  # prompt 0 lower, but 0 is a masked duplicate; prompt 3 lower -> wrong
            [0.5, 0.6, 0.7, 0.4],  # correct
        ]
    )
    assert retrieval_accuracy(E).item() == pytest.approx(0.5)
    assert softrepa_loss(E).accuracy.item() == pytest.approx(0.5)
    # caption 1 duplicates caption 0: row 1's tie is now with a masked duplicate -> correct
    caps = ["dup", "dup", "c", "d"]
    assert softrepa_loss(E, captions=caps).accuracy.item() == pytest.approx(0.75)
    caps = ["dup", "x", "dup", "d"]  # row 2: prompt 0 masked, prompt 3 still lower -> still wrong
    assert softrepa_loss(E, captions=caps).accuracy.item() == pytest.approx(0.5)
    assert not softrepa_loss(E.requires_grad_()).accuracy.requires_grad


@pytest.mark.parametrize("form", ["exp", "neg"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("per_row_t", [False, True])
def test_gradcheck(form, masked, per_row_t):
    B = 4
    E = _rand_E(B, seed=11).requires_grad_(True)
    caps = ["a", "b", "a", "c"] if masked else None
    if per_row_t:
        t, tau = torch.tensor([10.0, 300.0, 600.0, 990.0], dtype=torch.float64), linear_tau(0.07, 0.3)
    else:
        t, tau = None, 0.1

    def f(E):
        return softrepa_loss(E, t, tau=tau, form=form, symmetric=True, denoise_weight=0.5, captions=caps).loss

    assert torch.autograd.gradcheck(f, (E,), eps=1e-6, atol=1e-8)
    if masked:  # the duplicate pair gets no gradient through the logits
        (g,) = torch.autograd.grad(softrepa_loss(E, captions=caps, form=form).loss, E)
        assert g[0, 2] == 0 and g[2, 0] == 0


def test_loss_grad_wrt_E_matches_autograd():
    E = _rand_E(5, seed=4).requires_grad_(True)
    kw = dict(symmetric=True, denoise_weight=3.0, captions=["a", "b", "c", "a", "e"])
    out, dLdE = loss_grad_wrt_E(E, **kw)
    (g,) = torch.autograd.grad(softrepa_loss(E, **kw).loss, E)
    torch.testing.assert_close(dLdE, g)
    assert not out.loss.requires_grad
    assert out.loss.item() == pytest.approx(softrepa_loss(E, **kw).loss.item())
    with pytest.raises(ValueError):
        loss_grad_wrt_E(E, reduction="none")


class _Errors(torch.nn.Module):
    """A random differentiable stand-in for the B^2 model evaluations: E[i, j] = err(img_i, cap_j; params)."""

    def __init__(self, B: int, D: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.imgs = torch.randn(B, D, generator=g, dtype=torch.float64)
        self.caps = torch.randn(B, D, generator=g, dtype=torch.float64)
        self.W = torch.nn.Parameter(0.3 * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.s = torch.nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64) * 0.1)

    def forward(self, rows: slice | torch.Tensor, cols: slice | torch.Tensor) -> torch.Tensor:
        x = self.imgs[rows]  # (r, D)
        c = self.caps[cols]  # (c, D)
        pred = torch.tanh(x[:, None, :] @ self.W + c[None, :, :] + self.s)  # (r, c, D)
        return ((pred - x[:, None, :]) ** 2).mean(-1)  # (r, c)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("symmetric", [False, True])
def test_chunked_two_pass_backprop_equals_direct(chunk, symmetric):
    B = 7
    model = _Errors(B, seed=chunk)
    t = torch.full((B,), 500.0, dtype=torch.float64)
    kw = dict(tau=linear_tau(0.05, 0.5), symmetric=symmetric, denoise_weight=0.7, captions=["p"] * 2 + list("abcde"))

    # direct: one graph over all B^2 entries
    model.zero_grad()
    direct = softrepa_loss(model(slice(None), slice(None)), t, **kw)
    direct.loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]

    # two pass: E without grad, dL/dE, then recompute chunks of rows x cols with grad
    model.zero_grad()
    with torch.no_grad():
        E = model(slice(None), slice(None))
    out, dLdE = loss_grad_wrt_E(E, t, **kw)
    for r0 in range(0, B, chunk):
        for c0 in range(0, B, chunk):
            rows, cols = slice(r0, r0 + chunk), slice(c0, c0 + chunk)
            E_chunk = model(rows, cols)
            E_chunk.backward(dLdE[rows, cols])
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert out.loss.item() == pytest.approx(direct.loss.item(), rel=1e-14)
