"""Evaluation metrics of the SoftREPA paper (Table 4) and the miniature's world metrics.

One module per metric family; `load_metric(name, cfg)` builds a scorer from its `metrics.yaml`
section. Scorers are small objects with one batched method:

* per-image, prompt-conditioned (`score(images, prompts) -> (B,)`): imagereward, pickscore, clip, hps;
* set-level features (`features(images) -> (B, D)`): fid;
* pairwise (`distance(images_a, images_b) -> (B,)`): lpips.

`world` (the miniature's analytic judge) needs no weights and lives in `softrepa.evaluate`.
Weights are never downloaded at test time and never substituted: see `common.resolve_file`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .common import MetricError, WeightsError, hub_offline

#: Every metric `softrepa evaluate` knows, in the paper's table order (+ the miniature's).
METRIC_NAMES = ("imagereward", "pickscore", "clip", "hps", "fid", "lpips", "world")
#: The paper's six (Table 4), the default of `softrepa evaluate`.
PAPER_METRICS = ("imagereward", "pickscore", "clip", "hps", "fid", "lpips")

#: Defaults = the paper's models (configs/metrics.yaml documents each entry and its URL).
DEFAULT_CONFIG: dict[str, Any] = {
    "offline": "auto",
    "imagereward": {"weights": "THUDM/ImageReward", "filename": "ImageReward.pt",
                    "med_config": "THUDM/ImageReward", "tokenizer": "google-bert/bert-base-uncased"},
    "pickscore": {"model": "yuvalkirstain/PickScore_v1", "tokenizer": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                  "preprocess": "center_crop_floor", "text_cleaning": "none"},
    "clip": {"model": "openai/clip-vit-large-patch14", "w": 1.0, "clamp_zero": False, "preprocess": "center_crop",
             "text_cleaning": "official"},
    "hps": {"weights": "xswu/HPSv2", "version": "v2.1", "filename": None, "architecture": "ViT-H-14",
            "tokenizer": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "preprocess": "letterbox",
            "text_cleaning": "official"},
    "fid": {"weights": None, "filename": "pt_inception-2015-12-05-6726825d.pth"},
    "lpips": {"net": "vgg", "backbone_weights": None, "lin_weights": "lpips-package", "resize": 299,
              "input_range": "minus1_1"},
    "world": {},
}

_LOADERS = {"imagereward": ("imagereward", "load_imagereward"), "pickscore": ("clip_models", "load_pickscore"),
            "clip": ("clip_models", "load_clip_score"), "hps": ("clip_models", "load_hps"),
            "fid": ("inception", "load_fid"), "lpips": ("lpips", "load_lpips")}


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """The metrics config: `DEFAULT_CONFIG`, updated per section by a YAML file and overrides.

    Args:
        path: a metrics.yaml (sections imagereward, pickscore, clip, hps, fid, lpips, world and the
            top-level keys offline / device / dtype), or "metrics" for the packaged defaults.
        overrides: same layout, applied last (used by tests and the Python API).
    """
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    layers = []
    if path is not None:
        import yaml

        from ..config import resolve_recipe

        p = resolve_recipe(path)  # a file, or the packaged recipe name "metrics" (configs/metrics.yaml)
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of metric sections")
        layers.append(data)
    layers.append(overrides or {})
    for layer in layers:
        for k, v in layer.items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
    unknown = set(cfg) - set(DEFAULT_CONFIG) - {"device", "dtype"}
    if unknown:
        raise ValueError(f"unknown metrics config keys {sorted(unknown)}; known: {list(DEFAULT_CONFIG)}")
    return cfg


def load_metric(name: str, config: dict, *, device="cpu", dtype=None):
    """Build the scorer of metric `name` from the full metrics config.

    Args:
        name: one of `METRIC_NAMES` except "world".
        config: output of `load_config`.
        device, dtype: where / how the model runs (dtype default float32).
    Raises:
        WeightsError: weights missing / unusable (message names the file or id and its URL).
    """
    import importlib

    import torch

    if name not in _LOADERS:
        raise ValueError(f"unknown metric {name!r}; known: {list(METRIC_NAMES)}")
    mod, fn = _LOADERS[name]
    loader = getattr(importlib.import_module(f"{__name__}.{mod}"), fn)
    return loader(config.get(name) or {}, device=device, dtype=dtype or torch.float32, offline=hub_offline(config))


__all__ = ["DEFAULT_CONFIG", "METRIC_NAMES", "MetricError", "PAPER_METRICS", "WeightsError", "load_config",
           "load_metric"]
