"""AGSM (Lee, Hong, Kwon, Ye, ICML 2026), SoftREPA's successor: dual tokens trained by alignment-guided
score matching.

Two token sets: "positive" (psi+) evaluates every image with its own caption, "negative" (psi-)
every other pair; they share the time-indexed part (one parameter, `time_buckets` buckets) and
each has its own base tokens. The trainer keeps an EMA copy of both sets (decay `agsm.ema_decay`,
updated after every optimizer step, starting as an exact copy of the online tokens); the EMA
predictions, with the same set per pair, give the reward, the Plackett-Luce weights and the
guidance G (`softrepa.loss.agsm_loss`): the positive pair regresses onto target + gamma_pos G, the
negatives onto target - gamma_neg G. The run's `tokens.safetensors` holds both: the online psi+ as
its main set (sampling uses it on both classifier-free-guidance branches unless `--uncond-tokens
negative` puts psi- on the unconditional one) and psi- as its "negative" set.

Settings: the config's `agsm:` section (`softrepa.config.AGSMConfig`: tau 0.1, gamma_pos 1.0,
gamma_neg 0.1, ema_decay 0.9999). Hard-negative captions (`negatives.per_image`) are refused; on
several processes the pair terms are gathered across ranks (`softrepa.pairs.objective_backward`).
How this differs from the official code is in docs/training.md ("AGSM").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..loss import agsm_loss_parts, duplicate_caption_mask, retrieval_accuracy
from .base import Needs, Objective, PairTerms, register_objective

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass
class AGSMOutput:
    """One step of AGSM: the loss (positive + negative term), its parts, and the i2t retrieval
    accuracy of the online tokens' errors (`softrepa.loss.retrieval_accuracy`)."""

    loss: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor | None
    accuracy: torch.Tensor

    def detach(self) -> "AGSMOutput":
        return AGSMOutput(self.loss.detach(), self.positive.detach(),
                          None if self.negative is None else self.negative.detach(), self.accuracy.detach())

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss), "positive": float(self.positive),
                "negative": 0.0 if self.negative is None else float(self.negative), "accuracy": float(self.accuracy)}


class AGSM(Objective):
    """AGSM's loss over the step's B x P pairs (see the module docstring).

    Args:
        tau: Plackett-Luce temperature; gamma_pos, gamma_neg: guidance scales (`agsm_loss`).

    Example:
        >>> objective = AGSM(tau=0.1, gamma_pos=1.0, gamma_neg=0.1)
        >>> objective.pair_sets(torch.tensor([True, False]))   # psi+ for own captions, psi- otherwise
        tensor([0, 1])
    """

    name = "agsm"
    token_sets = ("positive", "negative")
    # errors: only for the logged accuracy (they come with the predictions; no gradient flows through them)
    needs = Needs(errors=True, predictions=True, reference=True)

    def __init__(self, tau: float = 0.1, gamma_pos: float = 1.0, gamma_neg: float = 0.1):
        self.tau, self.gamma_pos, self.gamma_neg = float(tau), float(gamma_pos), float(gamma_neg)

    @classmethod
    def check_config(cls, cfg: "TrainConfig") -> None:
        if cfg.negatives.per_image:
            raise ConfigError(f"negatives.per_image: objective agsm trains on the in-batch pairs only "
                              f"(hard-negative captions are not supported), got {cfg.negatives.per_image}")

    @classmethod
    def from_config(cls, cfg: "TrainConfig", loss_kwargs: dict[str, Any]) -> "AGSM":
        a = cfg.agsm
        return cls(tau=a.tau, gamma_pos=a.gamma_pos, gamma_neg=a.gamma_neg)

    @classmethod
    def reference_decay(cls, cfg: "TrainConfig") -> float | None:
        return cfg.agsm.ema_decay

    def pair_sets(self, own: torch.Tensor) -> torch.Tensor:
        return (~own).long()

    def loss(self, terms: PairTerms) -> AGSMOutput:
        pred = terms.predictions  # (B, P, C, h, w)
        B, P = pred.shape[:2]
        rows = torch.arange(B, device=pred.device)
        positive = torch.zeros(B, P, dtype=torch.bool, device=pred.device)
        positive[rows, terms.offset + rows] = True
        pos, neg = agsm_loss_parts(pred, terms.reference, terms.targets[:, None], positive,
                                   tau=self.tau, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg)
        loss = pos if neg is None else pos + neg
        # the project's i2t accuracy, as SoftREPA logs it (one process: E is (B, B), a tie counts as
        # wrong, a duplicate of the image's own caption is no competitor)
        accuracy = retrieval_accuracy(terms.errors, duplicate_caption_mask(terms.captions, pred.device))
        return AGSMOutput(loss, pos, neg, accuracy)

    def __repr__(self) -> str:
        return f"AGSM(tau={self.tau!r}, gamma_pos={self.gamma_pos!r}, gamma_neg={self.gamma_neg!r})"


register_objective(AGSM)
