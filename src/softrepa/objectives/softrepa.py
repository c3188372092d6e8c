"""SoftREPA (Lee et al. 2025): one token set trained with the contrastive denoising-score loss.

Every image of the step is evaluated under every prompt of the (rank-pooled) batch with the same
tokens; the loss is a cross-entropy over each image's row of logits `scale * exp(-E / tau)` (the
exact definition, masks, hard negatives, the symmetric variant and the denoising term are in
`softrepa.loss`, the math library this objective calls: `softrepa_loss`).

Settings come from the config's `loss:` section (`softrepa.config.loss_kwargs`): tau or a tau(t)
schedule, scale, form, symmetric, denoise_weight, contrastive_weight. `loss.contrastive_weight: 0`
with a denoise weight is the old spelling of the positive-only control (`objective:
positive_only`) and still trains exactly that.
"""

from __future__ import annotations

from typing import Any

from ..loss import LossOutput, softrepa_loss
from .base import Needs, Objective, PairTerms, register_objective


class SoftREPA(Objective):
    """The paper's objective: `softrepa_loss` of the error matrix (plus hard negatives, if any).

    Args:
        **loss_kwargs: keyword arguments of `softrepa.loss.softrepa_loss` (tau, scale, form,
            symmetric, denoise_weight, contrastive_weight); a bad value is a ConfigError when
            the loss is computed.

    Example:
        >>> objective = SoftREPA(tau=0.07, scale=4.0)
        >>> out = objective.loss(PairTerms(t=500.0, captions=caps, errors=E))   # E: (B, B)
    """

    name = "softrepa"
    token_sets = ("tokens",)
    needs = Needs(errors=True)

    def __init__(self, **loss_kwargs: Any):
        self.loss_kwargs = dict(loss_kwargs)

    def loss(self, terms: PairTerms) -> LossOutput:
        return softrepa_loss(terms.errors, terms.t, captions=terms.captions, negatives=terms.negatives,
                             negatives_valid=terms.negatives_valid, **self.loss_kwargs)

    def __repr__(self) -> str:
        return f"SoftREPA({', '.join(f'{k}={v!r}' for k, v in self.loss_kwargs.items())})"


register_objective(SoftREPA)
