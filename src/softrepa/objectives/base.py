"""What a training objective is: its token sets, which set each pair uses, what it reads, its loss.

The trainer and `softrepa.pairs` never branch on an objective's name; they ask the objective:

* `token_sets`: the names of the token sets it trains (SoftREPA: one set, "tokens"; AGSM: a
  "positive" and a "negative" set).
* `pair_sets(own)`: which of those sets each (image, prompt) pair is evaluated with (`own`: the
  image with its own caption).
* `needs`: what it reads from the evaluated pairs (`Needs`): the error matrix E (B x P, plus the
  hard negatives' errors H), the predictions themselves, and / or the predictions under a
  no-gradient copy of each pair's set (e.g. an EMA copy).
* `loss(terms)`: the loss of one step from those `PairTerms`, an `ObjectiveOutput`.

Exactness: the loss may depend on the tokens only through what `needs` asks for (E, H,
predictions). Then `softrepa.pairs.objective_backward` computes it in two passes in bounded
memory (every pair without a graph, dL/d(terms) on detached leaves, each chunk recomputed and
back-propagated with its share of that gradient) and the accumulated gradient is exactly the one
of a single backward through every pair (tests/test_objectives.py checks both built-ins).

A new objective is one module in `softrepa/objectives/` ending with one line,
`register_objective(MyObjective)`, plus one import line in `softrepa/objectives/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from ..errors import ConfigError

if TYPE_CHECKING:  # the config imports the registry (to validate `objective:`), not the other way
    from ..config import TrainConfig


@dataclass(frozen=True)
class Needs:
    """What an objective's loss reads from the evaluated pairs.

    Attributes:
        errors: E (rows x P) over every image x prompt pair and, with hard negatives, H (rows x K)
            (with gradient; `PairTerms.errors` / `.negatives`).
        predictions: every pair's prediction (B, P, C, h, w) and each image's target (B, C, h, w),
            float32, the predictions with gradient (`PairTerms.predictions` / `.targets`).
        reference: every pair's prediction under a no-gradient copy of the set it uses (the
            trainer's EMA copy of that set where it keeps one, else the set as it is now)
            (`PairTerms.reference`).
    """

    errors: bool = True
    predictions: bool = False
    reference: bool = False


@dataclass
class PairTerms:
    """One step's evaluated pairs, as an objective's `loss` reads them.

    Attributes:
        t: timesteps the loss reads, one per image row of `errors` (every rank's images).
        captions: the P captions (prompt j of the error matrix is captions[j]).
        offset: global index of this process's first image (prompt offset + i is image i's own).
        errors: (rows, P) E[i, j] = mean squared error of image i's prediction under prompt j.
        negatives: (rows, K) errors of each image under its own K hard-negative captions.
        negatives_valid: (rows, K) bool, False for padding slots.
        predictions: (B, P, C, h, w) this process's predictions, float32.
        targets: (B, C, h, w) each image's regression target, float32.
        reference: (B, P, C, h, w) the predictions under the no-gradient copies, float32.

    Fields an objective's `needs` does not ask for are None.
    """

    t: torch.Tensor | float | None
    captions: list[str]
    offset: int = 0
    errors: torch.Tensor | None = None
    negatives: torch.Tensor | None = None
    negatives_valid: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    reference: torch.Tensor | None = None

    #: the fields through which the loss depends on the tokens (the two-pass backward's leaves)
    DIFFERENTIABLE: ClassVar[tuple[str, ...]] = ("errors", "negatives", "predictions")

    def with_leaves(self) -> tuple["PairTerms", dict[str, torch.Tensor]]:
        """A copy whose differentiable fields are detached leaves requiring grad, and those leaves."""
        leaves = {name: getattr(self, name).detach().clone().requires_grad_(True)
                  for name in self.DIFFERENTIABLE if getattr(self, name) is not None}
        return replace(self, **leaves), leaves


class ObjectiveOutput(Protocol):
    """What `Objective.loss` returns (`softrepa.loss.LossOutput` is one).

    `loss` is the scalar training loss (with a graph to the differentiable `PairTerms` fields when
    anything trains), `detach()` a copy without graph, `metrics()` the numbers logged per step.
    """

    loss: torch.Tensor

    def detach(self) -> "ObjectiveOutput": ...

    def metrics(self) -> dict[str, float]: ...


class Objective:
    """Base class of the training objectives (see the module docstring).

    Class attributes:
        name: registry key, the config's `objective:` value.
        token_sets: names of the token sets it trains; the first is the one every pair uses
            unless `pair_sets` says otherwise.
        needs: what `loss` reads (`Needs`).
    """

    name: ClassVar[str] = ""
    token_sets: ClassVar[tuple[str, ...]] = ("tokens",)
    needs: ClassVar[Needs] = Needs()

    @classmethod
    def check_config(cls, cfg: "TrainConfig") -> None:
        """Refuse settings this objective cannot honour (`ConfigError` naming the key); called when
        the config is built, so a bad combination fails before anything loads."""

    @classmethod
    def from_config(cls, cfg: "TrainConfig", loss_kwargs: dict[str, Any]) -> "Objective":
        """The objective of a run: `loss_kwargs` are `softrepa.config.loss_kwargs(cfg.loss)`, with a
        calibrated tau table already resolved."""
        return cls(**loss_kwargs)

    @classmethod
    def reference_decay(cls, cfg: "TrainConfig") -> float | None:
        """Decay of the EMA copy the trainer keeps of each token set for `needs.reference`
        (updated after every optimizer step, starting as an exact copy of the set); None: no EMA,
        the reference of a set is the set itself, evaluated without gradient."""
        return None

    def pair_sets(self, own: torch.Tensor) -> torch.Tensor | None:
        """Index into `token_sets` of the set each pair is evaluated with.

        Args:
            own: (K,) bool, True where the pair is an image with its own caption (the diagonal),
                False for another image's caption or a hard negative.
        Returns:
            (K,) long, or None: every pair uses `token_sets[0]`.
        """
        return None

    def loss(self, terms: PairTerms) -> ObjectiveOutput:
        """The step's loss from the evaluated pairs (only the fields `needs` asks for are set)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ------------------------------------------------------------------------------------ registry
_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Add an objective class to the registry (one line at the end of its module); returns it.

    Raises:
        ValueError: no name, or another class is registered under that name (a programming error).
    """
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise TypeError(f"register_objective needs an Objective subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if not cls.token_sets or len(set(cls.token_sets)) != len(cls.token_sets):
        raise ValueError(f"{cls.__name__}: token_sets must be distinct names, got {cls.token_sets!r}")
    held = _OBJECTIVES.get(cls.name)
    if held is not None and held is not cls:
        raise ValueError(f"an objective named {cls.name!r} is already registered ({held.__module__}.{held.__name__})")
    _OBJECTIVES[cls.name] = cls
    return cls


def objective_names() -> tuple[str, ...]:
    """Registered objective names, in registration order."""
    return tuple(_OBJECTIVES)


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as `name`.

    Raises:
        ConfigError: no such objective (the message lists the known ones).
    """
    try:
        return _OBJECTIVES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"objective must be one of {list(objective_names())}, got {name!r}") from None


__all__ = ["Needs", "Objective", "ObjectiveOutput", "PairTerms", "get_objective", "objective_names",
           "register_objective"]
