"""Validation in training on the bundled miniature: the grid and the `world` scores reach the
tensorboard event files (read back) and metrics.jsonl; trackers beyond tensorboard / wandb pass the
config check, a missing tracker package names it; the run's tokens record their provenance."""

from __future__ import annotations

import importlib.util
import json

import pytest

from softrepa.cli import main
from softrepa.config import ConfigError, load_config
from softrepa.validation import check_trackers, load_validation_metrics, log_images


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    from softrepa.toy.world import export_image_folder

    return export_image_folder(tmp_path_factory.mktemp("world") / "data", 8, seed=0, split="train",
                               write_scenes=False)


def _args(data, out, *extra):
    return ["train", "--config", "toy_sd3", "--data", str(data), "--output_dir", str(out), "--batch_size", "4",
            "--max_steps", "2", "--checkpoint_every", "1", "--log_every", "1", "--num_workers", "0",
            "--loss.tau_schedule", "constant", "--loss.tau", "0.07", "--negatives.per_image", "0",
            "--validation.every", "2", "--validation.steps", "2", "--validation.seeds", "0,1",
            "--validation.prompts", "a red circle above a blue square,a green triangle on the left", *extra]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="needs tensorboard (pip install 'softrepa[tensorboard]')")
def test_validation_images_and_metrics_reach_tensorboard_and_metrics_jsonl(world_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import softrepa
    from softrepa.artifact import provenance_of

    out = tmp_path / "run"
    assert main(_args(world_data, out, "--log_with", "tensorboard", "--validation.metrics", "world")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("validation")]
    assert len(val) == 1 and val[0]["step"] == 2
    for arm in ("vanilla", "tokens", "delta"):
        assert isinstance(val[0][f"validation/world/{arm}"], float)
    assert 0.0 <= val[0]["validation/world/tokens"] <= 1.0
    events = list(out.rglob("events.out.tfevents*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    assert "validation/grid" in tags["images"]
    image = acc.Images("validation/grid")[0]
    assert image.step == 2 and image.width > 2 * 32 and image.height >= 2 * 32
    for arm in ("vanilla", "tokens", "delta"):
        ev = acc.Scalars(f"validation/world/{arm}")
        assert [e.step for e in ev] == [2]
        assert ev[0].value == pytest.approx(val[0][f"validation/world/{arm}"], abs=1e-6)
    assert "loss" in tags["scalars"]

    # provenance: the final tokens and every checkpoint record the base model and the config
    for f in (out / "tokens.safetensors", out / "checkpoints" / "step_0000002" / "tokens.safetensors"):
        prov = provenance_of(f)
        assert "toy_sd3" in prov["base_model"] and len(prov["denoiser_config_hash"]) == 12
        assert prov["train_config"]["max_steps"] == 2 and prov["train_config"]["validation"]["metrics"] == ["world"]
    assert softrepa.load_soft_tokens(out).layout.family == "sd3"


def test_validation_metrics_are_checked_before_the_model_loads(world_data, tmp_path, capsys):
    rc = main(_args(world_data, tmp_path / "a", "--validation.metrics", "nonsense", "--model", "nowhere/model"))
    assert rc == 2 and "validation.metrics: unknown metric 'nonsense'" in capsys.readouterr().err
    rc = main(_args(world_data, tmp_path / "b", "--validation.metrics", "fid", "--model", "nowhere/model"))
    assert rc == 2 and "'fid' compares against reference images" in capsys.readouterr().err
    assert set(load_validation_metrics(["world"])) == {"world"}


def test_every_accelerate_tracker_is_accepted_and_unknown_ones_are_named():
    for name in ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab",
                 "tensorboard,mlflow", "all"):
        assert load_config(None, {"log_with": name}).log_with == name
    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) \['tensorbord'\].*mlflow"):
        load_config(None, {"log_with": "tensorbord"})


def test_a_missing_tracker_package_is_named():
    with pytest.raises(ConfigError, match=r"'comet_ml'.*pip install comet-ml"):
        check_trackers("tensorboard,comet_ml", ["tensorboard"])
    check_trackers("all", [])  # "all": whatever is installed, nothing to miss
    check_trackers(None, [])


def test_images_go_to_each_tracker_in_its_own_shape():
    from PIL import Image

    got = {}

    class Fake:
        def __init__(self, name):
            self.name, self.requires_logging_directory = name, False

        def log_images(self, values, step=None, **kw):
            got[self.name] = (values, step, kw)

    class NoImages:
        name, requires_logging_directory = "mlflow", False

    im = Image.new("RGB", (8, 4))
    sent = log_images([Fake("tensorboard"), Fake("wandb"), Fake("aim"), NoImages()], "validation/grid", im, 7)
    assert sent == ["tensorboard", "wandb", "aim"]
    tb = got["tensorboard"]
    assert tb[0]["validation/grid"].shape == (1, 4, 8, 3) and tb[2] == {"dataformats": "NHWC"} and tb[1] == 7
    assert got["wandb"][0]["validation/grid"] == [im] and got["aim"][0]["validation/grid"] is im


def test_a_metric_that_cannot_read_a_prompt_is_skipped_with_a_warning(caplog):
    from PIL import Image

    from softrepa.validation import score_arms

    scorers = load_validation_metrics(["world"])
    im = [Image.new("RGB", (32, 32), (255, 255, 255))]
    with caplog.at_level("WARNING", logger="softrepa.validation"):
        assert score_arms(scorers, ["a green triangle"], im, im) == {}
    assert "validation metric world not computed" in caplog.text
    row = score_arms(scorers, ["a red circle on the left"], im, im)
    assert row["validation/world/delta"] == 0.0


def test_a_tracker_without_its_package_stops_before_the_model_loads(tmp_path):
    from softrepa.train import Trainer

    missing = next((n for n in ("dvclive", "swanlab", "aim", "clearml") if importlib.util.find_spec(n) is None), None)
    if missing is None:
        pytest.skip("every candidate tracker package is installed")
    cfg = load_config(None, {"log_with": missing, "output_dir": str(tmp_path / "run"), "model": "unused"})
    with pytest.raises(ConfigError, match=rf"log_with: '{missing}'.*pip install {missing}"):
        Trainer(cfg)


def test_a_per_prompt_metric_is_scored_in_batches_on_both_arms(monkeypatch):
    """The path clip / pickscore / imagereward / hps take (PER_PROMPT `score(images, prompts)`), with a
    stand-in metric: no weights needed. Its config section comes from `validation.metrics_config`."""
    from dataclasses import dataclass

    import numpy as np
    from PIL import Image

    import softrepa.validation as validation
    from softrepa.evaluation import MetricConfig, MetricKind, MetricSpec
    from softrepa.evaluation import spec as spec_module
    from softrepa.validation import score_arms

    @dataclass(frozen=True)
    class BrightConfig(MetricConfig):
        scale: float = 1.0

    calls = []

    class Bright:
        def __init__(self, cfg):
            self.scale = cfg.scale

        def score(self, images, prompts):
            calls.append(len(images))
            return np.array([self.scale * np.asarray(im).mean() / 255 for im in images])

    def load(cfg, *, device="cpu", dtype=None, offline=True):
        return Bright(BrightConfig.coerce(cfg, metric="bright"))

    monkeypatch.setitem(spec_module._REGISTRY, "bright", MetricSpec(
        name="bright", kind=MetricKind.PER_PROMPT, loader=load, note="mean brightness (test)",
        higher_is_better=True, config=BrightConfig))
    monkeypatch.setattr(validation, "SCORE_BATCH", 2)
    scorers = load_validation_metrics(["bright"], metrics_config=None)
    white, black = Image.new("RGB", (4, 4), (255, 255, 255)), Image.new("RGB", (4, 4))
    row = score_arms(scorers, ["p"] * 3, [black] * 3, [white, white, black])
    assert row == pytest.approx({"validation/bright/vanilla": 0.0, "validation/bright/tokens": 2 / 3,
                                 "validation/bright/delta": 2 / 3})
    assert calls == [2, 1, 2, 1]  # batches of SCORE_BATCH per arm


def test_metrics_config_reaches_the_validation_scorer(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from softrepa.evaluation import MetricConfig, MetricKind, MetricSpec
    from softrepa.evaluation import spec as spec_module

    @dataclass(frozen=True)
    class ScaleConfig(MetricConfig):
        scale: float = 1.0

    def load(cfg, *, device="cpu", dtype=None, offline=True):
        return ScaleConfig.coerce(cfg, metric="scaled")

    monkeypatch.setitem(spec_module._REGISTRY, "scaled", MetricSpec(
        name="scaled", kind=MetricKind.PER_PROMPT, loader=load, note="test", higher_is_better=True,
        config=ScaleConfig))
    (tmp_path / "metrics.yaml").write_text("scaled: {scale: 2.5}\n")
    scorers = load_validation_metrics(["scaled"], metrics_config=str(tmp_path / "metrics.yaml"))
    assert scorers["scaled"][1].scale == 2.5
