"""Training objectives, one module each (see `softrepa.objectives.base` for what an objective is).

    >>> from softrepa.objectives import get_objective, objective_names
    >>> objective_names()
    ('softrepa', 'positive_only', 'agsm')
    >>> objective = get_objective("softrepa")(tau=0.07, scale=4.0)
"""

from .base import Needs, Objective, ObjectiveOutput, PairTerms, get_objective, objective_names, register_objective
from . import softrepa  # noqa: F401  (registers "softrepa")
from . import positive_only  # noqa: F401  (registers "positive_only")
from . import agsm  # noqa: F401  (registers "agsm")
from .agsm import AGSM
from .positive_only import PositiveOnly
from .softrepa import SoftREPA

__all__ = ["AGSM", "Needs", "Objective", "ObjectiveOutput", "PairTerms", "PositiveOnly", "SoftREPA", "get_objective",
           "objective_names", "register_objective"]
