"""Keyed random streams: one independent generator per tuple of keys, never shared by arithmetic.

Every random draw of a training run comes from a generator keyed by a tuple: the run's seed, a
named stream (`Stream`) and that stream's own keys (the step, an image's index, a rank, an epoch):

    generator(seed, Stream.NOISE, step)                 # the batch's shared noise at `step`
    generator(seed, Stream.POSTERIOR, step, index)      # image `index`'s VAE posterior sample
    python_random(seed, Stream.NEGATIVES, step, rank)   # which hard negatives a rank draws

The key tuple is the entropy of a `numpy.random.SeedSequence` (each key as two 32-bit words of its
zig-zag code, after the number of keys), which hashes it into a 64-bit seed. Distinct tuples give
unrelated seeds: no two (step, stream, index) combinations can meet the way packed arithmetic lets
them (with `(seed * 1_000_003 + step) * 16 + stream` and per-image streams `1000 + index`, image 16
at step s and image 0 at step s + 1 drew the same posterior noise). The number of keys is part of
the entropy because SeedSequence pads short entropy with zeros: `[1, 2]` and `[1, 2, 0]` would
otherwise be the same stream.

A stream depends only on its keys, never on what was drawn before, so a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import enum
import operator
import random

import numpy as np
import torch

#: version of the stream derivation, recorded in checkpoints (1: the packed arithmetic before it)
STREAMS_VERSION = 2


class Stream(enum.IntEnum):
    """Named stream ids (the first key after the seed); the keys that follow are each stream's own."""

    EPOCH_ORDER = 1  # (epoch,): the permutation of the dataset in that epoch
    TIMESTEPS = 2  # (step,) shared by every rank, or (step, rank)
    NOISE = 3  # (step,) shared by every rank, or (step, rank)
    POSTERIOR = 4  # (step, image index): the VAE posterior sample of an image
    NEGATIVES = 5  # (step, rank): the choice among an image's hard-negative captions
    DIAGNOSE_ORDER = 6  # (batch seed,): `softrepa.diagnose`'s random batches
    DIAGNOSE_NOISE = 7  # (batch seed,): a diagnosed batch's shared noise
    DIAGNOSE_POSTERIOR = 8  # (batch seed, image): a diagnosed image's posterior sample
    DIAGNOSE_NEGATIVES = 9  # (batch seed,): a diagnosed batch's hard negatives


_MASK64 = (1 << 64) - 1


def _words(keys: tuple[int, ...]) -> np.ndarray:
    """The entropy words of a key tuple: its length, then each key's zig-zag code as (low, high) 32 bits."""
    out = [len(keys)]
    for key in keys:
        k = operator.index(key)  # ints and IntEnums only: a float key would round silently
        z = 2 * k if k >= 0 else -2 * k - 1  # zig-zag: negative seeds get codes of their own
        if z > _MASK64:
            raise ValueError(f"stream key {k} does not fit in 64 bits")
        out += [z & 0xFFFFFFFF, z >> 32]
    return np.asarray(out, dtype=np.uint32)


def stream_seed(*keys: int) -> int:
    """A 64-bit seed for the stream named by `keys` (e.g. `stream_seed(seed, Stream.NOISE, step)`)."""
    if not keys:
        raise ValueError("stream_seed needs at least one key")
    return int(np.random.SeedSequence(_words(tuple(keys))).generate_state(1, dtype=np.uint64)[0])


def generator(*keys: int, device: torch.device | str | None = None) -> torch.Generator:
    """A `torch.Generator` (on `device`, default CPU) seeded for the stream named by `keys`."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    return g.manual_seed(stream_seed(*keys))


def python_random(*keys: int) -> random.Random:
    """A `random.Random` seeded for the stream named by `keys` (for choices among Python objects)."""
    return random.Random(stream_seed(*keys))


__all__ = ["STREAMS_VERSION", "Stream", "generator", "python_random", "stream_seed"]
