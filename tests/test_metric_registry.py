"""The metric registry: one `MetricSpec` per metric, the entry point of the miniature's `world`, the typed
metrics config, dispatch on the kind, and transformers' CLIP image processor where it is bit-identical."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softrepa.errors import ConfigError
from softrepa.evaluation import (PAPER_METRICS, MetricConfig, MetricKind, MetricSpec, evaluate, get_metric,
                                 load_metric, load_metrics_config, metric_names, optional, register_metric)
from softrepa.evaluation import spec as spec_module
from softrepa.evaluation.clip_models import ClipConfig, clip_image_processor
from softrepa.evaluation.common import CLIP_MEAN, CLIP_STD, clip_pixels
from softrepa.evaluation.spec import ENTRY_POINT_GROUP, higher_is_better

EVALUATION = Path(__file__).resolve().parents[1] / "src" / "softrepa" / "evaluation"


# ------------------------------------------------------------------------------------- registry

def test_importing_evaluation_imports_no_toy_module_and_world_comes_through_the_entry_point():
    code = ("import sys, softrepa.evaluation as ev\n"
            "before = sorted(m for m in sys.modules if m.startswith('softrepa.toy'))\n"
            "names = ev.metric_names()\n"
            "spec = ev.get_metric('world')\n"
            "print(before, list(names), spec.kind.name, 'softrepa.toy.metrics' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    assert out == ("[] ['imagereward', 'pickscore', 'clip', 'hps', 'fid', 'lpips', 'world'] REPORT True"), out


def test_the_core_never_names_the_toy_package():
    """Not even inside a function: the only mention is the entry point example in spec.py's docstring."""
    for f in sorted(EVALUATION.glob("*.py")):
        text = f.read_text().replace('world = "softrepa.toy.metrics:WORLD"', "")
        assert "toy" not in text, f


def test_world_is_declared_as_an_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("world") == "softrepa.toy.metrics:WORLD"  # pyproject.toml; `pip install -e .` makes it live
    from softrepa.toy.metrics import WORLD

    assert get_metric("world") is WORLD and WORLD.binary and WORLD.kind is MetricKind.REPORT
    assert [r.name for r in WORLD.rows] == ["world_quality_proxy"]


def test_specs_hold_every_fact_of_the_old_tables():
    assert PAPER_METRICS == metric_names()[:6]
    directions = {n: higher_is_better(n) for n in (*metric_names(), "world_quality_proxy", "no_such")}
    assert directions == {"imagereward": True, "pickscore": True, "clip": True, "hps": True, "fid": False,
                          "lpips": False, "world": True, "world_quality_proxy": False, "no_such": None}
    kinds = {n: get_metric(n).kind for n in metric_names()}
    assert kinds == {"imagereward": MetricKind.PER_PROMPT, "pickscore": MetricKind.PER_PROMPT,
                     "clip": MetricKind.PER_PROMPT, "hps": MetricKind.PER_PROMPT, "fid": MetricKind.PER_SET,
                     "lpips": MetricKind.PER_PAIR, "world": MetricKind.REPORT}
    assert [n for n in metric_names() if get_metric(n).binary] == ["world"]
    assert all(get_metric(n).note for n in metric_names())


def test_register_refuses_a_second_spec_under_a_taken_name_and_lookups_list_the_known():
    clip = get_metric("clip")
    assert register_metric(clip) is clip  # the same object again: a no-op
    with pytest.raises(ValueError, match="'clip' is already registered"):
        register_metric(MetricSpec(name="clip", kind=MetricKind.PER_PROMPT, loader=clip.loader, note="x",
                                   higher_is_better=True, config=ClipConfig))
    with pytest.raises(ValueError, match=r"unknown metric 'clipscore'; known: \['imagereward', .*'world'\]"):
        get_metric("clipscore")
    with pytest.raises(TypeError, match="kind must be a MetricKind"):
        MetricSpec(name="x", kind="per_prompt", loader=clip.loader, note="x", higher_is_better=True, config=ClipConfig)
    with pytest.raises(TypeError, match="config must be a MetricConfig"):
        MetricSpec(name="x", kind=MetricKind.PER_PROMPT, loader=clip.loader, note="x", higher_is_better=True,
                   config=dict)


@dataclass(frozen=True)
class _LengthConfig(MetricConfig):
    scale: float = 1.0
    offset: float = optional(0.0)


class _LengthScorer:
    def __init__(self, cfg):
        self.cfg = cfg

    def score(self, images, prompts):
        return np.array([self.cfg.scale * len(p) + self.cfg.offset for p in prompts], np.float64)

    def info(self):
        return {"scale": self.cfg.scale}


def _load_length(cfg, *, device="cpu", dtype=None, offline=True):
    return _LengthScorer(_LengthConfig.coerce(cfg, metric="prompt_length"))


@pytest.fixture
def length_metric():
    """A third-party PER_PROMPT metric, registered for one test."""
    spec = register_metric(MetricSpec(name="prompt_length", kind=MetricKind.PER_PROMPT, loader=_load_length,
                                      note="prompt length (test)", higher_is_better=True, config=_LengthConfig))
    yield spec
    del spec_module._REGISTRY["prompt_length"]


def test_evaluate_dispatches_on_the_kind_of_a_registered_metric(tmp_path, length_metric):
    (tmp_path / "gen").mkdir()
    prompts = ["a", "bbb", "cc"]
    for i, p in enumerate(prompts):
        Image.new("RGB", (8, 8)).save(tmp_path / "gen" / f"{i}.png")
    (tmp_path / "gen" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file": f"{i}.png", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    res = evaluate(tmp_path / "gen", tmp_path / "out", metrics=["prompt_length"], progress=False, device="cpu",
                   config={"prompt_length": {"scale": 2.0, "offset": 1.0}})
    m = res["metrics"]["prompt_length"]
    assert m["mean"] == 5.0 and m["count"] == 3 and m["scale"] == 2.0 and m["note"] == "prompt length (test)"
    assert res["config"]["prompt_length"] == {"scale": 2.0, "offset": 1.0}
    assert "| prompt_length | 5.0000 |" in (tmp_path / "out" / "results.md").read_text()
    assert higher_is_better("prompt_length") is True


# --------------------------------------------------------------------------------------- config

def test_config_sections_are_typed_and_record_what_was_given():
    cfg = load_metrics_config(overrides={"clip": {"image_std": [0.3, 0.3, 0.3], "tokenizer": "tok", "w": 2.5}})
    clip = cfg["clip"]
    assert isinstance(clip, ClipConfig) and clip.w == 2.5 and clip.model == "openai/clip-vit-large-patch14"
    # the record (results.json "config") is the old merged dict: defaults in order, then the set optional keys
    assert list(clip.as_dict()) == ["model", "w", "clamp_zero", "preprocess", "text_cleaning", "image_std", "tokenizer"]
    assert {**clip, "w": 1.0}["w"] == 1.0 and clip.get("image_mean") is None and clip.image_mean == CLIP_MEAN
    assert load_metrics_config(overrides=cfg) == cfg  # a loaded config is valid overrides
    assert cfg["world"].as_dict() == {} and cfg["offline"] == "auto"


def test_a_misspelt_key_names_the_file_section_and_key(tmp_path):
    (tmp_path / "m.yaml").write_text("offline: true\nclip:\n  modle: x\n")
    with pytest.raises(ConfigError) as err:
        load_metrics_config(tmp_path / "m.yaml")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'm.yaml'}: metrics config section 'clip': unknown key 'modle'")
    assert "did you mean 'model'?" in msg and "known keys: model, w, clamp_zero" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"^overrides: metrics config section 'lpips': unknown keys 'a', 'b'"):
        load_metrics_config(overrides={"lpips": {"a": 1, "b": 2}})
    with pytest.raises(ConfigError, match="section 'fid' must be a mapping"):
        load_metrics_config(overrides={"fid": 3})
    with pytest.raises(ValueError, match=r"unknown metrics config keys \['clipscore'\]; known: \['offline', "):
        load_metrics_config(overrides={"clipscore": {}})
    assert load_metrics_config(overrides={"device": "cpu", "dtype": "float16"})["dtype"] == "float16"


def test_loaders_take_typed_configs_or_partial_mappings(tmp_path):
    from softrepa.evaluation.clip_models import hps_filename

    assert hps_filename(load_metrics_config()["hps"]) == hps_filename({}) == "HPS_v2.1_compressed.pt"
    scorer = load_metric("fid", {"fid": {"test_only_random_features": True}})
    assert scorer.info() == {"features": "TEST-ONLY random conv features (not FID)"}
    assert type(load_metric("world")).__name__ == "WorldJudge"


# ------------------------------------------------------------------------ CLIP image processor

def _random_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


SIZES = [(301, 157), (157, 301), (225, 223), (333, 500), (37, 99), (224, 224), (223, 224), (1023, 769), (640, 480),
         (224, 301), (5, 3), (700, 21)]


def test_clip_image_processor_equals_the_floored_center_crop_bit_for_bit():
    """PickScore's preprocess ("center_crop_floor") is transformers' processor (its PIL backend; no torchvision)."""
    proc = clip_image_processor(224, CLIP_MEAN, CLIP_STD)
    images = [_random_image(w, h, i) for i, (w, h) in enumerate(SIZES)]
    ours = proc(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    assert ours.dtype == torch.float32
    assert torch.equal(ours, clip_pixels(images, 224, crop_offset="floor"))
    # every uint8 value in every channel: the rescale / normalise arithmetic is the same too
    every = Image.fromarray((np.arange(224 * 224 * 3) % 256).astype(np.uint8).reshape(224, 224, 3))
    assert torch.equal(proc(images=[every], return_tensors="pt")["pixel_values"], clip_pixels([every], 224))
    # other normalisation constants go through as well
    odd = clip_image_processor(32, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    assert torch.equal(odd(images=images[:3], return_tensors="pt", input_data_format="channels_last")["pixel_values"],
                       clip_pixels(images[:3], 32, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), crop_offset="floor"))


def test_torchvision_center_crop_is_not_the_processor():
    """Why clip / imagereward keep the hand-written path: torchvision rounds the crop offset, the processor floors it."""
    im = _random_image(37, 99, 0)  # resized to 224 x 599: offset (599 - 224) / 2 = 187.5 -> 188 (round) vs 187
    proc = clip_image_processor(224)(images=[im], return_tensors="pt")["pixel_values"]
    assert not torch.equal(proc, clip_pixels([im], 224, crop_offset="round"))
    assert torch.equal(proc, clip_pixels([im], 224, crop_offset="floor"))


def test_pickscore_scorer_uses_the_processor_and_clip_does_not(monkeypatch):
    from transformers import CLIPConfig, CLIPModel

    from softrepa.evaluation.clip_models import CLIPScorer
    from softrepa.tiny import make_clip_tokenizer

    tok = make_clip_tokenizer(model_max_length=77)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=8))
    images = [_random_image(w, h, i) for i, (w, h) in enumerate(SIZES[:6])]
    pick = CLIPScorer(model, tok, name="pickscore", preprocess="center_crop_floor")
    assert torch.equal(pick.pixels(images), clip_pixels(images, 32, crop_offset="floor"))
    assert pick._processor is not None
    clip = CLIPScorer(model, tok, name="clip", preprocess="center_crop")
    assert torch.equal(clip.pixels(images), clip_pixels(images, 32, crop_offset="round")) and clip._processor is None
