"""The positive-only control: the same tokens, recipe and pairs, trained on the denoising term alone.

loss = w * mean_i E[i, i], the matching pairs' errors, with w = `loss.denoise_weight` (1 when it is
0, the default). The contrastive term is left out of the graph entirely, so the other pairs carry no
gradient (the two-pass backward skips them); they are still evaluated, so the logged i2t loss and
retrieval accuracy stay comparable with SoftREPA's. What the control isolates: whatever SoftREPA
gains over it comes from the negatives, not from training tokens at all.

The config spelling of the toy demo's control, `loss.contrastive_weight: 0, loss.denoise_weight: 1`
under `objective: softrepa`, trains exactly this loss (bit for bit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .softrepa import SoftREPA
from .base import register_objective

if TYPE_CHECKING:
    from ..config import TrainConfig


class PositiveOnly(SoftREPA):
    """SoftREPA's pairs and logging with contrastive weight 0 (see the module docstring).

    Args:
        **loss_kwargs: as for `SoftREPA`; contrastive_weight must be 0 or left out, and a
            denoise_weight of 0 means 1.
    """

    name = "positive_only"

    def __init__(self, **loss_kwargs: Any):
        if loss_kwargs.get("contrastive_weight", 0.0) not in (0.0, 1.0):
            raise ConfigError(f"objective positive_only trains no contrastive term; got "
                              f"loss.contrastive_weight {loss_kwargs['contrastive_weight']}")
        loss_kwargs["contrastive_weight"] = 0.0
        loss_kwargs["denoise_weight"] = loss_kwargs.get("denoise_weight") or 1.0
        super().__init__(**loss_kwargs)

    @classmethod
    def check_config(cls, cfg: "TrainConfig") -> None:
        if cfg.loss.contrastive_weight not in (0.0, 1.0):
            raise ConfigError(f"loss.contrastive_weight: objective positive_only trains no contrastive term "
                              f"(leave it at 1 or set 0), got {cfg.loss.contrastive_weight}")


register_objective(PositiveOnly)
