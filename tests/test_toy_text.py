"""The second-generation miniature's text pathway and its gates (softrepa.toy.pretrain_text / gates).

Word tokens must be single tokens of an ordinary CLIPTokenizer; an omission caption must never
say anything false about its scene; frozen text encoders must stay bit-identical while the
denoiser trains; pooled dropout must feed the empty prompt's pooled vector; and the gate values
shipped with the bundled miniature must be what the code measures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import softrepa
from softrepa.toy.pretrain_common import omit
from softrepa.toy.pretrain_text import WORD_MAX_LENGTH, WORLD_WORDS, make_word_tokenizer
from softrepa.toy.world import COLOURS, RELATION_PHRASES, SHAPES, WorldDataset, caption, parse_prompt

ASSETS = Path(softrepa.__file__).resolve().parent / "assets"


def test_every_world_word_is_one_token_and_other_words_fall_back_to_characters():
    tok = make_word_tokenizer()
    for w in WORLD_WORDS:
        assert tok.tokenize(w) == [w + "</w>"], w
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]
    rng = np.random.default_rng(0)
    ds = WorldDataset(300, 0, "train")
    longest = 0
    for i in range(len(ds)):
        for text in (caption(ds.scene(i), rng), omit(ds.scene(i), rng)):
            pieces = tok.tokenize(text)
            assert len(pieces) == len(re.findall(r"[a-z]+|[,:]", text)), text  # one token per word
            longest = max(longest, len(pieces))
    assert longest + 2 <= WORD_MAX_LENGTH  # BOS + EOS fit: no caption is truncated
    ids = tok("a red circle", padding="max_length", max_length=WORD_MAX_LENGTH).input_ids
    assert len(ids) == WORD_MAX_LENGTH and ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id


def _mentions(text: str) -> tuple[list[tuple[str | None, str | None]], str | None]:
    """(colour, shape) per mentioned object in order, and the relation named (None if none)."""
    rel = None
    for name, phrases in RELATION_PHRASES.items():
        for ph in sorted(phrases, key=len, reverse=True):
            if f" {ph} " in f" {text} " and rel is None:
                rel, text = name, text.replace(ph, "|", 1)
    parts = text.split("|") if rel else text.split(" and ")
    objs = []
    for part in parts:
        words = part.split()
        colour = next((w for w in words if w in COLOURS), None)
        shape = next((w for w in words if w in SHAPES), None)
        if colour or shape:
            objs.append((colour, shape))
    return objs, rel


def test_an_omission_caption_leaves_something_out_and_never_says_anything_false():
    rng = np.random.default_rng(1)
    ds = WorldDataset(400, 3, "train", p_two=1.0)
    kinds = set()
    for i in range(len(ds)):
        scene = ds.scene(i)
        text = omit(scene, rng)
        objs, rel = _mentions(text)
        a, b = scene.objects
        assert len(objs) == 2, text
        if rel is None:  # "X and Y", either order
            assert " and " in text
            order = [a, b] if (objs[0][0] in (None, a.colour) and objs[0][1] in (None, a.shape)) else [b, a]
            kinds.add("relation")
        else:
            assert rel == scene.relation, text
            order = [a, b]
        for (c, s), o in zip(objs, order):
            assert c in (None, o.colour) and s in (None, o.shape), (text, scene.spec)
        missing = sum(v is None for o in objs for v in o) + (rel is None)
        assert missing == 1, text  # exactly one thing left out
        kinds.update(("colour" if c is None else "shape") for c, s in objs if c is None or s is None)
    assert kinds == {"colour", "shape", "relation"}


def test_omission_share_zero_keeps_the_caption_stream():
    from softrepa.toy.pretrain_common import WorldImages

    data = WorldImages(64, 0)
    idx = torch.arange(64)
    plain = data.captions(idx, np.random.default_rng(5), 0.1)
    assert data.captions(idx, np.random.default_rng(5), 0.1, omit_share=0.0) == plain
    omitted = data.captions(idx, np.random.default_rng(5), 0.1, omit_share=1.0)
    assert sum(o != "" for o in omitted) > 40
    for i, o in zip(idx.tolist(), omitted):  # every caption kept now says less than its scene
        if o:
            try:
                assert parse_prompt(o).spec != data.scenes[i].spec, o
            except ValueError:
                pass  # no longer readable as a full description: also less than the scene


def _tiny_parts(seed=0):
    from softrepa.toy.pretrain_sd3 import build_sd3_components

    return build_sd3_components(seed, width=32, layers=2, heads=2, text_width=32, text_layers=1, tokenizer="word")


def test_text_pretraining_trains_the_encoders_then_freezes_them():
    from softrepa.toy.pretrain_common import WorldImages
    from softrepa.toy.pretrain_text import pretrain_text_encoders

    parts = _tiny_parts()
    encs = [parts["text_encoder"], parts["text_encoder_2"]]
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in encs]
    log = pretrain_text_encoders(encs, parts["tokenizer"], WorldImages(32, 0), steps=3, batch_size=8)
    assert log["steps"] == 3 and np.isfinite(log["loss"])
    for e, b in zip(encs, before):
        assert any(not torch.equal(v, b[k]) for k, v in e.state_dict().items())
        assert not any(p.requires_grad for p in e.parameters()) and not e.training


def test_frozen_text_stays_bit_identical_and_pooled_drop_feeds_the_empty_prompt(monkeypatch):
    from softrepa.toy.pretrain_common import TokenCache, WorldImages
    from softrepa.toy.pretrain_sd3 import sd3_text_context, train_sd3

    parts = _tiny_parts(1)
    data = WorldImages(16, 0)
    latents = (torch.randn(16, 4, 8, 8), torch.full((16, 4, 8, 8), 0.1))
    text_before = {k: v.clone() for k, v in parts["text_encoder"].state_dict().items()}
    tr_before = {k: v.clone() for k, v in parts["transformer"].state_dict().items()}
    seen = []
    orig = type(parts["transformer"]).forward

    def spy(self, *args, **kw):
        seen.append(kw["pooled_projections"].detach().clone())
        return orig(self, *args, **kw)

    monkeypatch.setattr(type(parts["transformer"]), "forward", spy)
    train_sd3(parts, latents, data, 1.0, 0.0, steps=2, batch_size=4, freeze_text=True, pooled_drop=1.0,
              caption_omit=0.5)
    for k, v in parts["text_encoder"].state_dict().items():
        assert torch.equal(v, text_before[k])
    assert any(not torch.equal(v, tr_before[k]) for k, v in parts["transformer"].state_dict().items())
    with torch.no_grad():
        _, empty = sd3_text_context(parts["text_encoder"], parts["text_encoder_2"], TokenCache(parts["tokenizer"])([""]))
    for pooled in seen:  # every sample saw the empty prompt's pooled vector
        torch.testing.assert_close(pooled, empty.expand_as(pooled))


def test_bundled_sd3_miniature_is_the_word_level_one():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(ASSETS / "toy_sd3")
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        assert tok.tokenize("a red circle above a blue square") == [
            w + "</w>" for w in "a red circle above a blue square".split()]
        assert tok.model_max_length == WORD_MAX_LENGTH
    record = json.loads((ASSETS / "toy_sd3" / "pretrain.json").read_text())
    assert record["config"]["freeze_text"] and record["config"]["sd3"]["tokenizer"] == "word"


def test_shipped_leverage_gate_is_what_the_code_measures():
    """gates.json ships with the miniature and the demo prints it: it must be reproducible."""
    from softrepa.pipeline import load_pipeline
    from softrepa.toy.gates import token_leverage

    gates = json.loads((ASSETS / "toy_sd3" / "gates.json").read_text())
    pipe = load_pipeline(str(ASSETS / "toy_sd3"))
    lev = token_leverage(pipe, max_sequence_length=8)
    assert lev["per_draw"] == pytest.approx(gates["leverage"]["per_draw"], rel=1e-4, abs=1e-6)
    assert lev["leverage"] == max(lev["per_draw"])


def test_operating_point_rule_and_headroom_gate():
    from softrepa.toy.gates import choose_cfg, headroom, sweep_table

    def res(acc, qp):
        return {"accuracy": acc, "quality_proxy": qp, "outcomes": [True] * int(10 * acc) + [False] * (10 - int(10 * acc))}

    sweep = {2.0: {"train_pairs": res(0.3, 0.5), "heldout_pairs": res(0.2, 0.7)},
             4.0: {"train_pairs": res(0.5, 0.4), "heldout_pairs": res(0.3, 0.4)},   # lowest mean quality proxy
             6.0: {"train_pairs": res(0.7, 0.45), "heldout_pairs": res(0.5, 0.6)}}
    assert choose_cfg(sweep) == 4.0
    assert headroom(sweep[4.0])["passed"]
    assert not headroom({"train_pairs": res(0.8, 0), "heldout_pairs": res(0.5, 0)})["passed"]   # too easy
    assert not headroom({"train_pairs": res(0.4, 0), "heldout_pairs": res(0.5, 0)})["passed"]   # held-out above
    assert "| 4 (chosen) | 50.0% | 30.0% | 40.0% |" in sweep_table(sweep, 4.0)


def test_reusing_a_vae_needs_a_pipeline_folder(tmp_path):
    from softrepa.toy.pretrain import load_vae

    with pytest.raises(FileNotFoundError, match="vae/config.json"):
        load_vae(tmp_path)
    assert load_vae(ASSETS / "toy_sd15").config.latent_channels == 4


def test_snapshots_do_not_change_the_final_model(tmp_path):
    """The bundle's pretraining run also saved snapshots: the final weights must not depend on it."""
    from softrepa.toy.pretrain_common import WorldImages
    from softrepa.toy.pretrain_sd3 import assemble_sd3, train_sd3
    from softrepa.toy.pretrain import load_vae

    data = WorldImages(16, 0)
    latents = (torch.randn(16, 4, 8, 8), torch.full((16, 4, 8, 8), 0.1))
    vae = load_vae(ASSETS / "toy_sd15")
    finals, saved = [], []
    for snap in ((), (1, 2)):
        parts = _tiny_parts(2)
        on_snapshot = lambda step: (saved.append(step), assemble_sd3(parts, vae).save_pretrained(tmp_path / f"s{step}"))  # noqa: E731
        train_sd3(parts, latents, data, 1.0, 0.0, steps=3, batch_size=4, freeze_text=True, pooled_drop=0.5,
                  caption_omit=0.5, snapshot_steps=snap, on_snapshot=on_snapshot)
        finals.append({k: v.clone() for k, v in parts["transformer"].state_dict().items()})
    assert saved == [1, 2]
    for k, v in finals[0].items():
        assert torch.equal(v, finals[1][k]), k
