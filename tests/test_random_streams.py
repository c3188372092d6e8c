"""Keyed random streams (`softrepa.streams`): no two of a run's streams share their draws.

The check: build every generator a run of a few hundred steps draws from (per step: timesteps and
noise shared and per rank, hard negatives per rank, the posterior sample of every image index;
per epoch: the data order), draw the first 4 normals of each and require them all distinct. The
same check on the packed arithmetic the trainer used before (`(seed * 1_000_003 + step) * 16 +
stream`, posterior streams `1000 + index`) finds the collisions it had, so the check can fail.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from softrepa.streams import STREAMS_VERSION, Stream, generator, python_random, stream_seed

SEEDS = (0, 1, 7)
STEPS = 200
RANKS = 4
IMAGES = 64  # dataset indices whose posterior sample a step may draw
EPOCHS = 20


def run_keys(seed: int) -> list[tuple]:
    """Every (stream, keys...) a run of STEPS steps on RANKS ranks over IMAGES images draws from."""
    keys: list[tuple] = []
    for step in range(STEPS):
        keys += [("timesteps", step), ("noise", step)]
        keys += [(name, step, rank) for rank in range(RANKS) for name in ("timesteps", "noise", "negatives")]
        keys += [("posterior", step, index) for index in range(IMAGES)]
    keys += [("epoch_order", epoch) for epoch in range(EPOCHS)]
    return keys


NEW = {"timesteps": Stream.TIMESTEPS, "noise": Stream.NOISE, "negatives": Stream.NEGATIVES,
       "posterior": Stream.POSTERIOR, "epoch_order": Stream.EPOCH_ORDER}


def new_seed(seed: int, key: tuple) -> int:
    return stream_seed(seed, NEW[key[0]], *key[1:])


def old_seed(seed: int, key: tuple) -> int:
    """The trainer's seeds before `softrepa.streams` (train.py's `_step_generator`, `StepBatches._perm`,
    the negatives' `random.Random`): shared streams 0, per-rank 1 + rank, negatives 2 + rank, posterior
    1000 + index, all packed as (seed * 1_000_003 + step) * 16 + stream."""
    name, *rest = key
    if name == "epoch_order":
        return seed * 1_000_003 + rest[0]
    step = rest[0]
    stream = {"timesteps": 0, "noise": 0, "posterior": 1000}.get(name, 0)
    if name in ("timesteps", "noise") and len(rest) == 2:
        stream = 1 + rest[1]
    elif name == "negatives":
        stream = 2 + rest[1]
    elif name == "posterior":
        stream = 1000 + rest[1]
    return (seed * 1_000_003 + step) * 16 + stream


def colliding_streams(seed_of) -> list[tuple]:
    """Pairs of distinct streams (of every seed in SEEDS) whose first 4 normals are the same.

    Streams the old trainer *meant* to share (timesteps and noise came from one generator, drawn one
    after the other) are one stream here: keys mapping to the same seed by design are not counted,
    so only accidental meetings are.
    """
    first: dict[tuple, tuple] = {}
    seen_seed: dict[tuple, tuple] = {}
    hits = []
    for seed in SEEDS:
        for key in run_keys(seed):
            s = seed_of(seed, key)
            s = (key[0] == "negatives", s)  # negatives draw from random.Random, the others from torch
            if s in seen_seed:
                other = seen_seed[s]
                if not _shared_by_design(other, (seed, key)):
                    hits.append((other, (seed, key)))
                continue
            seen_seed[s] = (seed, key)
            draws = _first_draws(key[0], s)
            if draws in first:
                hits.append((first[draws], (seed, key)))
            first[draws] = (seed, key)
    return hits


def _first_draws(name: str, seed: tuple[bool, int]) -> tuple:
    """The first 4 draws of a stream as the trainer makes them (negatives: Python's random.Random)."""
    if seed[0]:
        rng = random.Random(seed[1])
        return ("python", *(rng.gauss(0.0, 1.0) for _ in range(4)))
    return ("torch", *torch.randn(4, generator=torch.Generator().manual_seed(seed[1])).tolist())


def _shared_by_design(a: tuple, b: tuple) -> bool:
    (sa, ka), (sb, kb) = a, b
    same_gen = {"timesteps", "noise"}
    return sa == sb and ka[0] in same_gen and kb[0] in same_gen and ka[1:] == kb[1:]


def test_the_check_catches_the_old_arithmetic():
    """Old formula: image 16 at step s and image 0 at step s + 1 drew the same posterior noise, and
    per-step stream 8 + k met image k's at step s - 62 (stream 1000 = 62 * 16 + 8)."""
    hits = colliding_streams(old_seed)
    assert hits
    pairs = {(a[1], b[1]) for a, b in hits}
    assert (("posterior", 0, 16), ("posterior", 1, 0)) in pairs
    assert old_seed(0, ("posterior", 0, 16)) == old_seed(0, ("posterior", 1, 0))


def test_no_two_streams_of_a_run_share_their_first_draws():
    assert colliding_streams(new_seed) == []


def test_streams_depend_on_every_key_and_only_on_the_keys():
    a = torch.randn(4, generator=generator(0, Stream.NOISE, 3))
    assert torch.equal(a, torch.randn(4, generator=generator(0, Stream.NOISE, 3)))  # reproducible
    for other in [(1, Stream.NOISE, 3), (0, Stream.TIMESTEPS, 3), (0, Stream.NOISE, 4), (0, Stream.NOISE, 3, 0),
                  (0, Stream.NOISE)]:
        assert not torch.equal(a, torch.randn(4, generator=generator(*other))), other


def test_the_number_of_keys_is_part_of_the_stream():
    """SeedSequence pads short entropy with zeros ([1, 2] == [1, 2, 0]); the key count keeps them apart."""
    assert np.array_equal(np.random.SeedSequence([1, 2]).generate_state(2),
                          np.random.SeedSequence([1, 2, 0]).generate_state(2))
    assert stream_seed(1, 2) != stream_seed(1, 2, 0)
    assert stream_seed(0, 1, 2) != stream_seed(0, 1 << 32, 0)  # 64-bit keys do not spill into the next key


def test_negative_and_large_keys_have_streams_of_their_own():
    assert len({stream_seed(k, Stream.NOISE, 0) for k in (-1, 0, 1, -(1 << 63), (1 << 63) - 1)}) == 5
    with pytest.raises(ValueError, match="64 bits"):
        stream_seed(1 << 64, 0)
    with pytest.raises(TypeError):
        stream_seed(0.5, 1)  # a float key would round silently


def test_python_random_and_the_seed_fit_their_generators():
    assert python_random(0, Stream.NEGATIVES, 5, 1).random() == random.Random(stream_seed(0, Stream.NEGATIVES, 5, 1)).random()
    assert 0 <= stream_seed(3, Stream.POSTERIOR, 9, 9) < 1 << 64
    assert STREAMS_VERSION >= 2


def test_diagnosis_batches_never_share_draws():
    """`softrepa diagnose` names a batch (seed, bin, batch) and a calibration batch (seed, batch): over
    3 bins x 64 batches and 64 calibration batches, no two of their noise / order / posterior streams
    meet (the arithmetic names before, seed * 7919 + 31 * bin + batch, met at bin + 1, batch - 31)."""
    from softrepa.diagnose import _keys

    names = [(0, k, b) for k in range(3) for b in range(64)] + [(0, b) for b in range(64)]
    seen = {}
    for name in names:
        for stream in (Stream.DIAGNOSE_ORDER, Stream.DIAGNOSE_NOISE, Stream.DIAGNOSE_NEGATIVES):
            seen.setdefault(stream_seed(*_keys(name, stream)), []).append((name, stream))
        for image in range(4):
            seen.setdefault(stream_seed(*_keys(name, Stream.DIAGNOSE_POSTERIOR), image), []).append((name, image))
    assert all(len(v) == 1 for v in seen.values())
    old = [7919 * 0 + 31 * k + b for k in range(3) for b in range(64)]
    assert len(set(old)) < len(old)  # the check above would have caught the old names
