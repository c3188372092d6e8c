"""Hard-negative captions: an image's own caption with one attribute binding or relation changed.

SoftREPA's negatives are the other captions of the batch. On a model that already ranks its own
caption first for almost every image of a random batch (the bundled miniature: ~95%, see
`softrepa diagnose`), those negatives are easy: their logits are ~0 and they carry almost no
gradient. The captions a model confuses are near misses — "a red circle left of a blue square"
against "a blue circle left of a red square" — which is exactly where generation fails
(attribute leakage, swapped relations). Captions of that kind are the standard hard negatives of
compositional image-text learning (swap two attribute words, flip a spatial relation); here each
image is also scored under K of them, which adds K columns to its row of the loss and B*K pairs
to the step (not B*K*B: a negative is only ever a negative of the image it was made from).

Rules (deterministic; words match whole, case-insensitively; the result keeps the caption's
other characters):

* swap: for each word group (e.g. colour words), when the caption names two *different* words of
  the group, they trade places ("red circle ... blue square" -> "blue circle ... red square");
* flip: the first word of the caption found in a pair of opposites is replaced by the other one
  ("left of" -> "right of", "above" -> "below").

Example:
    >>> neg = CaptionNegatives(swap=[["red", "blue"], ["circle", "square"]], flip=[["left", "right"]])
    >>> neg("a red circle to the left of a blue square")
    ['a blue circle to the left of a red square', 'a red square to the left of a blue circle', 'a red circle to the right of a blue square']
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import ConfigError

#: Basic colour terms: attribute-binding swaps of everyday captions (COCO: "a red bus next to a white car").
COLOUR_WORDS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "pink", "brown",
                "grey", "gray"]
#: Spatial opposites: relation / position flips.
SPATIAL_OPPOSITES = [["left", "right"], ["above", "below"], ["over", "under"], ["top", "bottom"],
                     ["upper", "lower"], ["front", "behind"], ["beneath", "above"], ["higher", "lower"]]


@dataclass
class NegativesConfig:
    """Hard-negative captions per image (off by default: the paper uses in-batch negatives only).

    Args:
        per_image: K, hard negatives scored against each image per step (0: off).
        swap: word groups whose members trade places when a caption names two of them.
        flip: pairs of opposite words; the first one found in a caption is replaced.
    """

    per_image: int = 0
    swap: list[list[str]] = field(default_factory=lambda: [list(COLOUR_WORDS)])
    flip: list[list[str]] = field(default_factory=lambda: [list(p) for p in SPATIAL_OPPOSITES])

    def __post_init__(self) -> None:
        if self.per_image < 0:
            raise ConfigError(f"negatives.per_image must be >= 0, got {self.per_image}")
        for k, group in enumerate(self.swap):
            if not isinstance(group, list) or len(group) < 2 or not all(isinstance(w, str) and w.strip() for w in group):
                raise ConfigError(f"negatives.swap[{k}] must be a list of at least two words, got {group!r}")
        for k, pair in enumerate(self.flip):
            if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(w, str) and w.strip() for w in pair):
                raise ConfigError(f"negatives.flip[{k}] must be a pair of words [a, b], got {pair!r}")


class CaptionNegatives:
    """Makes hard-negative captions from a caption (rules in the module docstring).

    Args:
        swap: word groups for attribute swaps.
        flip: pairs of opposite words.
        keep: optional predicate; negatives for which it returns False are dropped (e.g. the
            miniature keeps held-out compositions out of training, even as negatives).
    """

    def __init__(self, swap: Sequence[Sequence[str]] = (), flip: Sequence[Sequence[str]] = (),
                 keep: Callable[[str], bool] | None = None):
        self.swap = [[w.lower() for w in g] for g in swap]
        self.flip = [(a.lower(), b.lower()) for a, b in flip]
        self.keep = keep
        self._swap_re = [re.compile(r"\b(" + "|".join(map(re.escape, g)) + r")\b", re.IGNORECASE) for g in self.swap]
        words = {w for pair in self.flip for w in pair}
        self._flip_re = re.compile(r"\b(" + "|".join(map(re.escape, sorted(words, key=len, reverse=True))) + r")\b",
                                   re.IGNORECASE) if words else None

    @classmethod
    def from_config(cls, cfg: NegativesConfig, keep: Callable[[str], bool] | None = None) -> "CaptionNegatives":
        return cls(cfg.swap, cfg.flip, keep=keep)

    def __call__(self, caption: str) -> list[str]:
        """All distinct hard negatives of `caption` (swaps in group order, then the flip)."""
        out: list[str] = []
        for pattern in self._swap_re:
            hits = list(pattern.finditer(caption))
            if not hits:
                continue
            a = hits[0]
            # the first later mention of a *different* word of the group ("a red cube, a red
            # ball and a blue cone": red <-> blue)
            b = next((h for h in hits[1:] if h.group(0).lower() != a.group(0).lower()), None)
            if b is not None:
                out.append(caption[:a.start()] + b.group(0) + caption[a.end():b.start()] + a.group(0) + caption[b.end():])
        if self._flip_re is not None:
            hit = self._flip_re.search(caption)
            if hit:
                word = hit.group(0).lower()
                other = next(b if a == word else a for a, b in self.flip if word in (a, b))
                out.append(caption[:hit.start()] + other + caption[hit.end():])
        seen, result = {_norm(caption)}, []
        for n in out:
            key = _norm(n)
            if key in seen or (self.keep is not None and not self.keep(n)):
                continue
            seen.add(key)
            result.append(n)
        return result

    def for_batch(self, captions: Sequence[str], k: int, rng: random.Random
                  ) -> tuple[list[str], list[int], list[int]]:
        """Up to k negatives per caption (a seeded random choice when there are more).

        Returns:
            (negative captions, image index of each, slot 0..k-1 of each)
        """
        texts, rows, slots = [], [], []
        for i, caption in enumerate(captions):
            negs = self(caption)
            if len(negs) > k:
                negs = rng.sample(negs, k)
            for slot, n in enumerate(negs):
                texts.append(n)
                rows.append(i)
                slots.append(slot)
        return texts, rows, slots


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


__all__ = ["COLOUR_WORDS", "SPATIAL_OPPOSITES", "CaptionNegatives", "NegativesConfig"]
