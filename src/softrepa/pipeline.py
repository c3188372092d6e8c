"""Loading a diffusers pipeline by hub id, local folder or `@assets/<name>` (the bundled miniatures).

Classic pipelines (`model_index.json`) load through `DiffusionPipeline.from_pretrained`. Models that
diffusers ships only as a *modular* pipeline (FLUX.3: `Flux3ModularPipeline`, no classic class) load
through `ModularPipeline.from_pretrained` and `load_components`: a local folder with a
`modular_model_index.json` (and no loadable classic index), or a hub id the classic loader refuses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

ASSETS_PREFIX = "@assets/"
#: the files that make a folder a diffusers pipeline (classic, modular)
INDEX_FILES = ("model_index.json", "modular_model_index.json")
#: blocks of a modular pipeline that rewrite the prompt with a language model before it is encoded
#: (FLUX.3's `prompt_upsampler`). softrepa removes them from the pipelines it loads: the tokens are
#: trained on the captions as written, and prompt following is judged against the prompt as written;
#: an LLM's expansion would condition the image on other text (and load a second multi-GB model).
PROMPT_REWRITERS = ("prompt_upsampler",)


def resolve_model_path(model: str) -> str:
    """`@assets/toy_sd3` -> the bundled miniature inside the installed package; others unchanged.

    The packaged recipes name the miniatures this way so that they work from any directory and
    from a non-editable install.
    """
    if model.startswith(ASSETS_PREFIX):
        path = Path(__file__).resolve().parent / "assets" / model[len(ASSETS_PREFIX):]
        if not any((path / index).is_file() for index in INDEX_FILES):
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
    if model.startswith("~"):
        model = os.path.expanduser(model)  # a quoted ~/folder, as `check_model` reads it
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
    modular_only = os.path.isfile(os.path.join(model, INDEX_FILES[1])) and not os.path.isfile(index)
    try:
        pipe = (load_modular(model, dtype, variant) if modular_only
                else DiffusionPipeline.from_pretrained(model, **kw))
    except (OSError, ValueError, AttributeError) as e:
        where = "local folder" if os.path.isdir(model) else "hub id (offline machines need a local folder)"
        # a model diffusers ships only as a modular pipeline (FLUX.3): a modular index and no classic
        # pipeline class to load; any other failure keeps its own error
        if modular_only or not has_modular_index(model) or classic_class_exists(model):
            raise FileNotFoundError(f"--model {model}: cannot load a diffusers pipeline from this {where}: {e}") from e
        pipe = load_modular(model, dtype, variant)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _index(model: str, name: str) -> dict | None:
    """The JSON index file `name` of a local folder or a hub repo (through huggingface_hub: its cache when
    offline), or None when there is none or it cannot be read."""
    path = os.path.join(model, name)
    if not os.path.isdir(model):
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(model, name)
        except Exception:  # noqa: BLE001  (not there, no network, no such repo: all "none")
            return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def has_modular_index(model: str) -> bool:
    """Whether a local folder or a hub repo has a `modular_model_index.json`."""
    return _index(model, INDEX_FILES[1]) is not None


def classic_class_exists(model: str) -> bool:
    """Whether the folder's / repo's `model_index.json` names a pipeline class this diffusers has (then a
    failed classic load is that pipeline's own error, not a model shipped only as a modular pipeline)."""
    import diffusers

    entries = _index(model, INDEX_FILES[0])
    return entries is not None and hasattr(diffusers, str(entries.get("_class_name", "")))


def load_modular(model: str, dtype: torch.dtype, variant: str | None = None) -> Any:
    """A modular pipeline (`ModularPipeline.from_pretrained`) with its components loaded in `dtype`,
    without the prompt-rewriting blocks of `PROMPT_REWRITERS` (and without loading their models).

    Raises:
        FileNotFoundError: a component the pipeline needs did not load (diffusers only logs that).

    Example:
        >>> pipe = load_modular("/models/flux3", torch.bfloat16)   # a Flux3ModularPipeline
        >>> image = pipe(prompt="a red cube", output="images")[0]
    """
    from diffusers import ModularPipeline

    # configs only: the pipeline class and its default blocks for this folder (`blocks` is a copy)
    blocks = ModularPipeline.from_pretrained(model).blocks
    for name in PROMPT_REWRITERS:
        blocks.sub_blocks.pop(name, None)
    pipe = blocks.init_pipeline(model)  # expects only the remaining blocks' components
    from diffusers.utils import deprecation_utils

    kw: dict[str, Any] = {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}
    if variant:
        kw["variant"] = variant
    pipe.load_components(**kw)
    missing = [name for name in pipe.pretrained_component_names if getattr(pipe, name, None) is None]
    if missing:
        raise FileNotFoundError(f"{model}: the modular pipeline's {', '.join(missing)} did not load (see the "
                                "diffusers warnings above)")
    return pipe


__all__ = ["ASSETS_PREFIX", "INDEX_FILES", "PROMPT_REWRITERS", "classic_class_exists", "has_modular_index", "load_modular", "load_pipeline", "resolve_model_path"]
