"""Caption noise of the miniature pretraining: wrong on purpose, never held out, off = old stream."""

from __future__ import annotations

import numpy as np
import torch

from softrepa.toy.pretrain_common import WorldImages, web_noise
from softrepa.toy.world import is_heldout, parse_prompt


def test_web_noise_changes_the_scene_and_never_names_a_heldout_composition():
    data = WorldImages(400, seed=0)
    rng = np.random.default_rng(0)
    pairs = [s for s in data.scenes if len(s.objects) == 2]
    changed = 0
    for scene in pairs:
        wrong = web_noise(scene, rng)
        assert not is_heldout(wrong)
        changed += wrong.spec != scene.spec
    assert changed >= 0.9 * len(pairs)  # only scenes whose both corruptions are held out stay clean


def test_noise_zero_keeps_the_caption_stream_and_noise_applies_to_pairs_only():
    clean, noisy = WorldImages(200, seed=0), WorldImages(200, seed=0, caption_noise=1.0)
    old = WorldImages(200, seed=0, caption_noise=0.0)
    idx = torch.arange(200)
    a = clean.captions(idx, np.random.default_rng(1))
    assert a == old.captions(idx, np.random.default_rng(1))  # noise 0: the bundle's caption stream
    b = noisy.captions(idx, np.random.default_rng(1))
    for scene, cap in zip(noisy.scenes, b):
        got = parse_prompt(cap)
        if len(scene.objects) == 1:
            assert got.spec == scene.spec  # one-object captions stay exact
    wrong = sum(parse_prompt(cap).spec != s.spec and len(s.objects) == 2 for s, cap in zip(noisy.scenes, b))
    assert wrong >= 0.8 * sum(len(s.objects) == 2 for s in noisy.scenes)
