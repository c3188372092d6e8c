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
    H (B, K), optional: errors of image i under K hard-negative captions of its own (e.g. its
        caption with two colour words swapped); they become K extra columns of row i only,
        with logits from the same formula and -inf where `negatives_valid[i, k]` is False.
    i2t_i = CE([logits[i, :], hard_logits[i, :]], i)   image i classifies the prompts (rows)
    t2i_j = CE(logits[:, j], j)      prompt j classifies the images (columns; batch images only)
    contrastive_i = i2t_i                          (symmetric=False; the paper's loss)
                  = 0.5 * (i2t_i + t2i_i)          (symmetric=True)
    loss_i = contrastive_weight * contrastive_i + denoise_weight * E[i, i]
        (contrastive_weight = 1: the paper; 0: the "positive-only" control, whose loss is the
        denoising term alone, the contrastive term left out of the graph entirely)
    loss = mean_i loss_i ("mean", default) | sum_i loss_i ("sum") | (loss_i)_i ("none")

`i2t`, `t2i` and `denoise` in `LossOutput` are reduced the same way as `loss` (so with
"mean", `denoise = mean_i E[i, i]`).

Why "exp": the exponential bounds each logit to (0, scale], which the paper found stable where
the raw negative error was not; it also makes the softmax sensitive mostly to small errors.

This is the math library of the objectives (`softrepa.objectives.softrepa` calls `softrepa_loss`).
Errors: a bad setting (tau, form, reduction, weights) is a `ConfigError`; arrays of inconsistent
shapes are the calling code's bug and stay a plain `ValueError`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from .errors import ConfigError

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
            raise ConfigError(f"tau must be > 0, got {value}")
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
            raise ConfigError(f"need tau_min, tau_max, t_max > 0, got {tau_min}, {tau_max}, {t_max}")
        self.tau_min, self.tau_max, self.t_max = float(tau_min), float(tau_max), float(t_max)

    def __call__(self, t: torch.Tensor | float) -> torch.Tensor:
        if t is None:
            raise ConfigError("linear_tau needs the timestep t (a tau schedule over t needs the loss's t)")
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, self.t_max)
        return self.tau_min + (self.tau_max - self.tau_min) * t / self.t_max

    def __repr__(self) -> str:
        return f"linear_tau({self.tau_min}, {self.tau_max}, t_max={self.t_max})"


class binned_tau:  # noqa: N801
    """tau(t) = table[k] for t in the k-th of len(table) equal bins of [0, t_max).

    The paper writes the temperature as tau(t); `calibrate_tau` (softrepa.diagnose) fills the
    table from the model's own errors so that every timestep's logits sit in their sensitive
    range. A table of one repeated value is exactly `constant_tau(value)`.

    Args:
        table: one temperature per bin, each > 0.
        t_max: the end of the timestep scale (softrepa uses 0..1000).

    Example:
        >>> tau = binned_tau([0.5, 0.4]); float(tau(100.0)), float(tau(999.0))
        (0.5, 0.4)
    """

    def __init__(self, table: Sequence[float], t_max: float = T_MAX):
        table = [float(v) for v in table]
        if not table or not all(v > 0 for v in table) or not t_max > 0:
            raise ConfigError(f"binned_tau needs a non-empty table of values > 0 and t_max > 0, got {table}, {t_max}")
        self.table, self.t_max = table, float(t_max)

    def bin_of(self, t: torch.Tensor | float) -> torch.Tensor:
        """Bin index of t (clamped into the table)."""
        t = torch.as_tensor(t).to(torch.float64)  # keeps t's device
        k = torch.floor(t * len(self.table) / self.t_max).long()
        return k.clamp(0, len(self.table) - 1)

    def __call__(self, t: torch.Tensor | float) -> torch.Tensor:
        if t is None:
            raise ConfigError("binned_tau needs the timestep t (a tau schedule over t needs the loss's t)")
        k = self.bin_of(t)
        return torch.tensor(self.table, dtype=torch.float64, device=k.device)[k]

    def __repr__(self) -> str:
        return f"binned_tau({[round(v, 4) for v in self.table]})"


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
        raise ConfigError(
            f"tau(t) must be a scalar or one value per image (shape ({E.shape[0]},)), "
            f"got shape {tuple(value.shape)}"
        )
    if not bool((out > 0).all()):
        raise ConfigError(f"tau must be > 0, got {out}")
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
        raise ConfigError(f"form must be one of {FORMS}, got {form!r}")
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
        logits: (B, B) masked logits (-inf at masked pairs); (B, B + K) with hard negatives.
        accuracy: share of images whose lowest error is their own caption among the batch's
            prompts (0-d float, no grad).
        hard_accuracy: share of images whose own caption beats all of its hard negatives
            (None without hard negatives).
    """

    loss: torch.Tensor
    i2t: torch.Tensor
    t2i: torch.Tensor | None
    denoise: torch.Tensor
    logits: torch.Tensor
    accuracy: torch.Tensor
    hard_accuracy: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """The numbers a training step logs: loss, i2t, accuracy, denoise (and hard_accuracy)."""
        out = {"loss": float(self.loss), "i2t": float(self.i2t), "accuracy": float(self.accuracy),
               "denoise": float(self.denoise)}
        if self.hard_accuracy is not None:
            out["hard_accuracy"] = float(self.hard_accuracy)
        return out

    def detach(self) -> "LossOutput":
        """A copy whose tensors are detached from the graph (for logging)."""
        return LossOutput(
            loss=self.loss.detach(),
            i2t=self.i2t.detach(),
            t2i=None if self.t2i is None else self.t2i.detach(),
            denoise=self.denoise.detach(),
            logits=self.logits.detach(),
            accuracy=self.accuracy.detach(),
            hard_accuracy=None if self.hard_accuracy is None else self.hard_accuracy.detach(),
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
    contrastive_weight: float = 1.0,
    captions: Sequence[str] | None = None,
    mask: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
    negatives_valid: torch.Tensor | None = None,
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
        contrastive_weight: weight of the contrastive term (1: the paper; 0: positive-only).
        captions: the batch captions; identical captions are masked as non-negatives.
        mask: optional (B, B) bool of extra pairs that are not negatives (OR-ed with the caption
            mask; the diagonal is ignored).
        negatives: optional (B, K) errors of image i under its own K hard-negative captions.
        negatives_valid: (B, K) bool, False for padding slots (required with `negatives`).
        reduction: "mean" | "sum" | "none" over the B images.

    Returns:
        LossOutput (loss, i2t, t2i, denoise, logits, accuracy).
    """
    B = _check_square(E)
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    pair_mask = _combined_mask(B, captions, mask, E.device)  # (B, B) bool or None

    if contrastive_weight < 0:
        raise ConfigError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
    logits = contrastive_logits(E, t, tau=tau, scale=scale, form=form)  # (B, B)
    if pair_mask is not None:
        # masked_fill (not arithmetic) so masked entries get an exactly zero gradient
        logits = logits.masked_fill(pair_mask, float("-inf"))
    target = torch.arange(B, device=E.device)  # (B,)
    row_logits = logits
    hard_acc = None
    if negatives is not None:
        H, valid = _check_negatives(negatives, negatives_valid, B)  # (B, K), (B, K)
        # padding slots hold an arbitrary finite error; -inf logits take them out exactly
        hard = contrastive_logits(H.masked_fill(~valid, 0.0), t, tau=tau, scale=scale, form=form)
        hard = hard.masked_fill(~valid, float("-inf"))  # (B, K)
        row_logits = torch.cat([logits, hard], dim=1)  # (B, B + K)
        beaten = (H.detach() <= E.detach().diagonal()[:, None]) & valid  # (B, K)
        hard_acc = (~beaten.any(dim=1)).float().mean()

    i2t = F.cross_entropy(row_logits, target, reduction="none")  # (B,) rows: image -> prompts
    t2i = F.cross_entropy(logits.T, target, reduction="none") if symmetric else None  # (B,)
    contrastive = 0.5 * (i2t + t2i) if symmetric else i2t  # (B,)
    diag = E.diagonal()  # (B,)
    if contrastive_weight == 0:  # positive-only: the contrastive term is not in the graph at all
        per_item = denoise_weight * diag
    else:
        per_item = contrastive if contrastive_weight == 1 else contrastive_weight * contrastive
        per_item = per_item + denoise_weight * diag if denoise_weight else per_item  # (B,)

    return LossOutput(
        loss=_reduce(per_item, reduction),
        i2t=_reduce(i2t, reduction),
        t2i=None if t2i is None else _reduce(t2i, reduction),
        denoise=_reduce(diag, reduction),
        logits=row_logits,
        accuracy=retrieval_accuracy(E, pair_mask),
        hard_accuracy=hard_acc,
    )


def agsm_loss(pred: torch.Tensor, ema_pred: torch.Tensor, target: torch.Tensor, positive: torch.Tensor, *,
              tau: float = 0.1, gamma_pos: float = 1.0, gamma_neg: float = 1.0) -> torch.Tensor:
    """AGSM's alignment-guided score-matching loss (Lee, Hong, Kwon, Ye, ICML 2026) for B images x P captions.

    Per image b and candidate caption p, the EMA tokens' prediction gives a reward
    `r = -mean_S (target - ema_pred)^2`, Plackett-Luce weights `w = softmax_p(r / tau)` and a guidance
    `G = ema_pred - sum_p w ema_pred`; the positive pair regresses onto `target + gamma_pos G` (with the
    positive tokens), every negative pair onto `target - gamma_neg G` (with the negative tokens). The
    loss is the mean over positive pairs plus the mean over negative pairs (no negative term when
    gamma_neg == 0). Unlike the official code the softmax subtracts its maximum: the official
    `exp(r / tau) / sum exp(r / tau)` is 0 / 0 once every error of a row exceeds ~8.7 at tau 0.1 in fp32.

    Args:
        pred: (B, P, *S) predictions with the trained tokens (positive set on positive pairs, negative
            set on the others).
        ema_pred: (B, P, *S) predictions with the EMA tokens; a constant to the gradient.
        target: (B, 1, *S) or (B, P, *S) the denoising target (flow: eps - x0; epsilon models: eps).
        positive: (B, P) bool, one True per row (P > B when hard-negative captions are added).
        tau: Plackett-Luce temperature (official 0.1, a constant).
        gamma_pos, gamma_neg: guidance scales of the positive and negative targets (>= 0).
    Returns:
        0-dim loss.

    Example:
        >>> loss = agsm_loss(pred, ema_pred, target.unsqueeze(1), torch.eye(4, dtype=torch.bool))
    """
    pos, neg = agsm_loss_parts(pred, ema_pred, target, positive, tau=tau, gamma_pos=gamma_pos, gamma_neg=gamma_neg)
    return pos if neg is None else pos + neg


def agsm_loss_parts(pred: torch.Tensor, ema_pred: torch.Tensor, target: torch.Tensor, positive: torch.Tensor, *,
                    tau: float = 0.1, gamma_pos: float = 1.0, gamma_neg: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`agsm_loss`'s two terms: (mean over positive pairs, mean over negative pairs or None when there
    is no negative term: gamma_neg == 0 or P == 1); `agsm_loss` is their sum (same arguments)."""
    if not (tau > 0 and math.isfinite(tau)):
        raise ConfigError(f"agsm tau must be a finite number > 0, got {tau}")
    if not (gamma_pos >= 0 and gamma_neg >= 0 and math.isfinite(gamma_pos) and math.isfinite(gamma_neg)):
        raise ConfigError(f"agsm gamma_pos / gamma_neg must be finite and >= 0, got {gamma_pos} / {gamma_neg}")
    if pred.shape != ema_pred.shape or pred.ndim < 3:
        raise ValueError(f"pred and ema_pred must both be (B, P, *S), got {tuple(pred.shape)} and {tuple(ema_pred.shape)}")
    b, p = pred.shape[:2]
    if target.shape[0] != b or target.shape[1] not in (1, p) or target.shape[2:] != pred.shape[2:]:
        raise ValueError(f"target must be (B, 1, *S) or (B, P, *S) for pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    if positive.shape != (b, p) or positive.dtype != torch.bool or not bool((positive.sum(1) == 1).all()):
        raise ValueError(f"positive must be a (B, P) = ({b}, {p}) bool mask with one True per row")
    dims = tuple(range(2, pred.ndim))
    target = target.float()
    ema = ema_pred.detach().float()  # (B, P, *S): the reward and the guidance are constants
    reward = -((target - ema) ** 2).mean(dim=dims)  # (B, P)
    weight = torch.softmax(reward / tau, dim=1)  # (B, P); softmax subtracts the row maximum
    w = weight.view(b, p, *([1] * len(dims)))
    guidance = ema - (w * ema).sum(dim=1, keepdim=True)  # (B, P, *S): G = ema_pred - sum_p w ema_pred
    sign = torch.where(positive, gamma_pos, -gamma_neg).to(ema.dtype).view(b, p, *([1] * len(dims)))
    per_pair = ((pred.float() - (target + sign * guidance)) ** 2).mean(dim=dims)  # (B, P)
    pos = per_pair[positive].mean()
    neg = per_pair[~positive].mean() if gamma_neg > 0 and p > 1 else None
    return pos, neg


def _check_negatives(negatives: torch.Tensor, valid: torch.Tensor | None, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    if negatives.ndim != 2 or negatives.shape[0] != B:
        raise ValueError(f"negatives must be (B={B}, K) errors, got shape {tuple(negatives.shape)}")
    if valid is None:
        raise ValueError("negatives_valid (B, K) bool is required with negatives")
    valid = torch.as_tensor(valid, dtype=torch.bool, device=negatives.device)
    if valid.shape != negatives.shape:
        raise ValueError(f"negatives_valid must have shape {tuple(negatives.shape)}, got {tuple(valid.shape)}")
    return negatives, valid


def loss_grad_wrt_E(E: torch.Tensor, t: torch.Tensor | float | None = None, **kwargs) -> tuple[LossOutput, torch.Tensor]:
    """Like `loss_grads`, for a loss without hard negatives: returns (LossOutput, dL/dE)."""
    if kwargs.get("negatives") is not None:
        raise ValueError("loss_grad_wrt_E: use loss_grads for a loss with hard negatives")
    out, dE, _ = loss_grads(E, t, **kwargs)
    return out, dE


def loss_grads(E: torch.Tensor, t: torch.Tensor | float | None = None, **kwargs
               ) -> tuple[LossOutput, torch.Tensor, torch.Tensor | None]:
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
            `negatives` (B, K), when given, is detached the same way and gets its own gradient.

    Returns:
        (LossOutput with detached tensors, dL/dE of shape (B, B) in E's dtype, dL/dH of shape
        (B, K) for the hard negatives or None).
    """
    if kwargs.get("reduction", "mean") == "none":
        raise ConfigError("loss_grads needs a scalar loss (reduction 'mean' or 'sum')")
    leaf = E.detach().clone().requires_grad_(True)  # (B, B) leaf, independent of E's graph
    neg = kwargs.pop("negatives", None)
    neg_leaf = None if neg is None else neg.detach().clone().requires_grad_(True)  # (B, K)
    with torch.enable_grad():
        out = softrepa_loss(leaf, t, negatives=neg_leaf, **kwargs)
        leaves = [leaf] if neg_leaf is None else [leaf, neg_leaf]
        if not out.loss.requires_grad:  # e.g. positive-only with denoise_weight 0: no gradient at all
            grads = [torch.zeros_like(x) for x in leaves]
        else:
            grads = list(torch.autograd.grad(out.loss, leaves, allow_unused=True))
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return out.detach(), grads[0], (grads[1] if neg_leaf is not None else None)
