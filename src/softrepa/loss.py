"""SoftREPA's contrastive denoising-score loss, as a pure function of the error matrix.

The trainer evaluates, for a batch of B images and their B captions (one timestep t and one
noise draw shared by the batch, paper Eq. 9-14), every image under every caption:

    E[i, j] = mean || pred(x_i, t | y_j, s) - target_i ||^2        # (B images, B prompts)

i indexes images (rows), j prompts (columns); the diagonal holds the matching pairs. This
module turns E into the loss and knows nothing about models, so it is tested exactly against
hand-written formulas and reused unchanged by every backbone family.

Definitions (all exact; `CE(z, k) = logsumexp(z) - z[k]` over the unmasked entries of z):

    logits[i, j] = scale * exp(-E[i, j] / tau_i)   form="exp" (paper, authors: tau=0.07, scale=4)
                 = -E[i, j] / tau_i                form="neg" (plain InfoNCE on -error)
        tau_i = tau            for a float tau
              = tau(t)         for a callable tau and a scalar t (shared by the batch)
              = tau(t)[i]      for a callable tau and per-image t of shape (B,) (row-wise)
    logits[i, j] = -inf where mask[i, j] (j != i; e.g. caption_j == caption_i): such a prompt
        is not a negative for image i, nor image i a negative for prompt j. The diagonal is
        never masked.
    i2t_i = CE(logits[i, :], i)      image i classifies the prompts        (rows)
    t2i_j = CE(logits[:, j], j)      prompt j classifies the images        (columns)
    contrastive_i = i2t_i                          (symmetric=False; the paper's loss)
                  = 0.5 * (i2t_i + t2i_i)          (symmetric=True)
    loss_i = contrastive_i + denoise_weight * E[i, i]
    loss = mean_i loss_i ("mean", default) | sum_i loss_i ("sum") | (loss_i)_i ("none")

`i2t`, `t2i` and `denoise` in `LossOutput` are reduced the same way as `loss` (so with
"mean", `denoise = mean_i E[i, i]`).

Why "exp": the exponential bounds each logit to (0, scale], which the paper found stable where
the raw negative error was not; it also makes the softmax sensitive mostly to small errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

TauLike = Union[float, Callable[[torch.Tensor], "torch.Tensor | float"]]
FORMS = ("exp", "neg")
REDUCTIONS = ("mean", "sum", "none")
T_MAX = 1000.0  # training timestep scale used throughout softrepa (0..1000)


# --------------------------------------------------------------------------- tau schedules
class constant_tau:  # noqa: N801 - used like a function: tau = constant_tau(0.07)
    """tau(t) = value for every t (the authors' choice, value=0.07).

    Args:
        value: the temperature, > 0.
    """

    def __init__(self, value: float):
        if not value > 0:
            raise ValueError(f"tau must be > 0, got {value}")
        self.value = float(value)

    def __call__(self, t: torch.Tensor | float | None) -> torch.Tensor | float:
        if t is None:
            return self.value
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), self.value)

    def __repr__(self) -> str:
        return f"constant_tau({self.value})"


class linear_tau:  # noqa: N801
    """tau(t) = tau_min + (tau_max - tau_min) * t / t_max, with t clamped to [0, t_max].

    Noisier timesteps give larger, more spread errors; a temperature that grows with t keeps the
    logits' spread comparable across timesteps.

    Args:
        tau_min: temperature at t = 0 (clean), > 0.
        tau_max: temperature at t = t_max (pure noise), > 0.
        t_max: the end of the timestep scale (softrepa uses 0..1000).
    """

    def __init__(self, tau_min: float, tau_max: float, t_max: float = T_MAX):
        if not (tau_min > 0 and tau_max > 0 and t_max > 0):
            raise ValueError(f"need tau_min, tau_max, t_max > 0, got {tau_min}, {tau_max}, {t_max}")
        self.tau_min, self.tau_max, self.t_max = float(tau_min), float(tau_max), float(t_max)

    def __call__(self, t: torch.Tensor | float) -> torch.Tensor:
        if t is None:
            raise ValueError("linear_tau needs the timestep t")
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, self.t_max)
        return self.tau_min + (self.tau_max - self.tau_min) * t / self.t_max

    def __repr__(self) -> str:
        return f"linear_tau({self.tau_min}, {self.tau_max}, t_max={self.t_max})"


def _tau_column(E: torch.Tensor, t, tau: TauLike) -> torch.Tensor:
    """Resolve tau to a tensor broadcastable against E: () or (B, 1) (one tau per image row)."""
    if callable(tau):
        value = tau(t)
    else:
        value = tau
    value = torch.as_tensor(value, dtype=E.dtype, device=E.device)
    if value.ndim == 0:
        out = value  # ()
    elif value.ndim == 1 and value.shape[0] == E.shape[0]:
        out = value[:, None]  # (B, 1): image i uses the tau of its own timestep
    else:
        raise ValueError(
            f"tau(t) must be a scalar or one value per image (shape ({E.shape[0]},)), "
            f"got shape {tuple(value.shape)}"
        )
    if not bool((out > 0).all()):
        raise ValueError(f"tau must be > 0, got {out}")
    return out


def _check_square(E: torch.Tensor) -> int:
    if E.ndim != 2 or E.shape[0] != E.shape[1]:
        raise ValueError(f"E must be a square (B images, B prompts) matrix, got shape {tuple(E.shape)}")
    return E.shape[0]


# --------------------------------------------------------------------------- logits & mask
def contrastive_logits(
    E: torch.Tensor,
    t: torch.Tensor | float | None = None,
    tau: TauLike = 0.07,
    scale: float = 4.0,
    form: str = "exp",
) -> torch.Tensor:
    """Logits of the contrastive loss from the error matrix (no masking).

    Args:
        E: (B, N) errors, E[i, j] = error of image i under prompt j (rows: images).
        t: timestep(s) on the 0..1000 scale, a scalar or (B,) per image; only read by a callable
            `tau`.
        tau: temperature, a float or a callable `tau(t)` returning a scalar or (B,) values.
        scale: multiplier of the "exp" form (authors: 4); ignored by "neg".
        form: "exp" -> scale * exp(-E / tau); "neg" -> -E / tau.

    Returns:
        (B, N) logits, same dtype/device as E.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    tau_v = _tau_column(E, t, tau)  # () or (B, 1)
    z = -E / tau_v  # (B, N)
    return scale * torch.exp(z) if form == "exp" else z


def _normalise_caption(caption: str) -> str:
    return " ".join(caption.split()).casefold()


def duplicate_caption_mask(captions: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Pairs whose captions are identical (after whitespace/case normalisation), off the diagonal.

    Such a prompt must not act as a negative: it describes image i exactly as well as image i's
    own caption does (COCO has repeated captions such as "A man riding a wave on a surfboard.").

    Args:
        captions: the B captions of the batch, in image order.
        device: device of the returned mask.

    Returns:
        (B, B) bool, True where j != i and caption_j == caption_i.
    """
    norm = [_normalise_caption(c) for c in captions]
    ids: dict[str, int] = {}
    codes = torch.tensor([ids.setdefault(c, len(ids)) for c in norm], dtype=torch.long)  # (B,)
    same = codes[:, None] == codes[None, :]  # (B, B)
    same.fill_diagonal_(False)
    return same.to(device) if device is not None else same


# --------------------------------------------------------------------------- the loss
@dataclass
class LossOutput:
    """Result of `softrepa_loss`; all fields reduced like `loss` (see the module docstring).

    Attributes:
        loss: the training loss (scalar unless reduction="none", then (B,)).
        i2t: image -> text cross-entropy (rows).
        t2i: text -> image cross-entropy (columns), None unless symmetric.
        denoise: the diagonal errors E[i, i], reduced (mean by default).
        logits: (B, B) masked logits (-inf at masked pairs).
        accuracy: share of images whose lowest error is their own caption (0-d float, no grad).
    """

    loss: torch.Tensor
    i2t: torch.Tensor
    t2i: torch.Tensor | None
    denoise: torch.Tensor
    logits: torch.Tensor
    accuracy: torch.Tensor

    def detach(self) -> "LossOutput":
        """A copy whose tensors are detached from the graph (for logging)."""
        return LossOutput(
            loss=self.loss.detach(),
            i2t=self.i2t.detach(),
            t2i=None if self.t2i is None else self.t2i.detach(),
            denoise=self.denoise.detach(),
            logits=self.logits.detach(),
            accuracy=self.accuracy.detach(),
        )


def _combined_mask(B: int, captions, mask, device) -> torch.Tensor | None:
    out = None
    if captions is not None:
        if len(captions) != B:
            raise ValueError(f"got {len(captions)} captions for a {B}x{B} error matrix")
        out = duplicate_caption_mask(captions, device=device)
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
        if mask.shape != (B, B):
            raise ValueError(f"mask must have shape ({B}, {B}), got {tuple(mask.shape)}")
        out = mask if out is None else (out | mask)
    if out is not None:
        out = out.clone()
        out.fill_diagonal_(False)  # the positive pair is never masked
    return out


def retrieval_accuracy(E: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Share of images i whose own caption has strictly the lowest error in row E[i, :].

    A tie with another prompt counts as wrong; masked prompts (duplicates of i's caption) are
    not competitors, so losing or tying to them still counts as correct.

    Args:
        E: (B, B) errors.
        mask: optional (B, B) bool, True for pairs that are not negatives.

    Returns:
        0-d float tensor in [0, 1] (no grad).
    """
    B = _check_square(E)
    E = E.detach()
    own = E.diagonal()  # (B,)
    others = E.clone()  # (B, B)
    eye = torch.eye(B, dtype=torch.bool, device=E.device)
    excluded = eye if mask is None else (eye | mask.to(E.device))
    others = others.masked_fill(excluded, float("inf"))
    best_other = others.min(dim=1).values  # (B,), +inf when no competitor
    return (own < best_other).to(E.dtype if E.is_floating_point() else torch.float32).mean()


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


def softrepa_loss(
    E: torch.Tensor,
    t: torch.Tensor | float | None = None,
    *,
    tau: TauLike = 0.07,
    scale: float = 4.0,
    form: str = "exp",
    symmetric: bool = False,
    denoise_weight: float = 0.0,
    captions: Sequence[str] | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> LossOutput:
    """SoftREPA contrastive loss of an error matrix (exact definition in the module docstring).

    Args:
        E: (B, B) errors, E[i, j] = mean squared error of image i's prediction under caption j.
        t: timestep(s) on the 0..1000 scale (scalar, or (B,) per image); read by a callable tau.
        tau: temperature (authors: 0.07 fixed) or a callable tau(t), e.g. `linear_tau(...)`.
        scale: logit scale of the "exp" form (authors: 4).
        form: "exp" (paper) or "neg" (logits -E / tau).
        symmetric: average the image->text and text->image cross-entropies.
        denoise_weight: weight w of the denoising term w * E[i, i] (authors: 0 for SD3,
            10 for SD1.5 / SDXL).
        captions: the batch captions; identical captions are masked as non-negatives.
        mask: optional (B, B) bool of extra pairs that are not negatives (OR-ed with the caption
            mask; the diagonal is ignored).
        reduction: "mean" | "sum" | "none" over the B images.

    Returns:
        LossOutput (loss, i2t, t2i, denoise, logits, accuracy).
    """
    B = _check_square(E)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    pair_mask = _combined_mask(B, captions, mask, E.device)  # (B, B) bool or None

    logits = contrastive_logits(E, t, tau=tau, scale=scale, form=form)  # (B, B)
    if pair_mask is not None:
        # masked_fill (not arithmetic) so masked entries get an exactly zero gradient
        logits = logits.masked_fill(pair_mask, float("-inf"))
    target = torch.arange(B, device=E.device)  # (B,)

    i2t = F.cross_entropy(logits, target, reduction="none")  # (B,) rows: image -> prompts
    t2i = F.cross_entropy(logits.T, target, reduction="none") if symmetric else None  # (B,)
    contrastive = 0.5 * (i2t + t2i) if symmetric else i2t  # (B,)
    diag = E.diagonal()  # (B,)
    per_item = contrastive + denoise_weight * diag if denoise_weight else contrastive  # (B,)

    return LossOutput(
        loss=_reduce(per_item, reduction),
        i2t=_reduce(i2t, reduction),
        t2i=None if t2i is None else _reduce(t2i, reduction),
        denoise=_reduce(diag, reduction),
        logits=logits,
        accuracy=retrieval_accuracy(E, pair_mask),
    )


def loss_grad_wrt_E(E: torch.Tensor, t: torch.Tensor | float | None = None, **kwargs) -> tuple[LossOutput, torch.Tensor]:
    """The loss and its gradient dL/dE, computed on a detached leaf copy of E.

    This enables exact chunked backprop through the B^2 forward passes without holding all of
    their graphs at once:

        with torch.no_grad(): E = all_errors()                    # pass 1, (B, B), no graph
        out, dLdE = loss_grad_wrt_E(E, t, captions=caps)          # (B, B)
        for rows, cols in chunks:                                 # pass 2, same t and noise
            E_chunk = errors(rows, cols)                          # with grad
            E_chunk.backward(dLdE[rows][:, cols])                 # accumulates into the tokens

    Since L depends on the parameters only through E, the accumulated gradient equals that of
    one direct backward (chain rule), provided pass 2 recomputes E bit-for-bit (same t, noise,
    dropout off). A learnable tau receives no gradient here.

    Args:
        E: (B, B) errors (any requires_grad state; it is detached).
        t: timestep(s), as for `softrepa_loss`.
        **kwargs: keyword arguments of `softrepa_loss`; reduction must be "mean" or "sum".

    Returns:
        (LossOutput with detached tensors, dL/dE of shape (B, B) in E's dtype).
    """
    if kwargs.get("reduction", "mean") == "none":
        raise ValueError("loss_grad_wrt_E needs a scalar loss (reduction 'mean' or 'sum')")
    leaf = E.detach().clone().requires_grad_(True)  # (B, B) leaf, independent of E's graph
    with torch.enable_grad():
        out = softrepa_loss(leaf, t, **kwargs)
        (grad,) = torch.autograd.grad(out.loss, leaf)
    return out.detach(), grad
