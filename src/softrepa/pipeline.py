"""Loading a diffusers pipeline by hub id, local folder or `@assets/<name>` (the bundled miniatures)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

ASSETS_PREFIX = "@assets/"


def resolve_model_path(model: str) -> str:
    """`@assets/toy_sd3` -> the bundled miniature inside the installed package; others unchanged.

    The packaged recipes name the miniatures this way so that they work from any directory and
    from a non-editable install.
    """
    if model.startswith(ASSETS_PREFIX):
        path = Path(__file__).resolve().parent / "assets" / model[len(ASSETS_PREFIX):]
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"--model {model}: no bundled pipeline at {path}")
        return str(path)
    return model


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  variant: str | None = None) -> Any:
    """`DiffusionPipeline.from_pretrained(hub id or local folder)` with a clear error when missing.

    Safety checkers are not loaded (they are irrelevant to training and scoring).
    """
    from diffusers import DiffusionPipeline  # here, not at import: the CLI's --help stays fast
    from diffusers.utils import deprecation_utils

    # newer diffusers call it `dtype` and warn about `torch_dtype`; older ones know only the latter
    kw: dict[str, Any] = {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}
    if variant:
        kw["variant"] = variant
    model = resolve_model_path(model)
    index = os.path.join(model, "model_index.json")
    # SD1.5-style pipelines would load (and apply) a safety checker; others only warn about the
    # keyword, so a local folder gets it only when its index has one. Hub ids always get it.
    no_checker = dict(safety_checker=None, requires_safety_checker=False)
    if os.path.isfile(index):
        with open(index) as f:
            entries = json.load(f)
        # Components saved as null (e.g. SD3 without T5) must be passed as None explicitly,
        # otherwise diffusers refuses to load the folder it wrote itself.
        for name, value in entries.items():
            if isinstance(value, list) and value and all(v is None for v in value):
                kw[name] = None
        if "safety_checker" in entries:
            kw.update(no_checker)
    else:
        kw.update(no_checker)
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **kw)
    except OSError as e:
        where = "local folder" if os.path.isdir(model) else "hub id (offline machines need a local folder)"
        raise FileNotFoundError(f"--model {model}: cannot load a diffusers pipeline from this {where}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


__all__ = ["ASSETS_PREFIX", "load_pipeline", "resolve_model_path"]
