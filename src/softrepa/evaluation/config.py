"""The metrics config (metrics.yaml, `--metrics-config`, overrides) and `load_metric`.

A metrics config has one section per registered metric (its keys are the fields of the metric's
`MetricSpec.config` dataclass, with the paper's models as defaults; the packaged
recipes/metrics.yaml documents each entry and its URL) and the top-level keys:

* `offline`: true / false / "auto" (auto: honour HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), whether
  hub ids may only be read from the local Hugging Face cache (`common.hub_offline`);
* `device`, `dtype`: defaults of `softrepa evaluate --device / --dtype`.

`load_metrics_config` layers the defaults, a YAML file and overrides section by section (a
section given twice is merged key by key, later layers winning) and validates each layer: an
unknown top-level key or section key is a `ConfigError` naming the file (or "overrides"), the
section and the key. The result maps each metric name to its typed config and the top-level keys
to their values.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import hub_offline
from .spec import get_metric, metric_names

#: Top-level keys besides the metric sections, with their defaults (`device` / `dtype` have none).
TOP_LEVEL = {"offline": "auto"}
_UNLISTED = ("device", "dtype")  # accepted, not named in the "known" list (they have no default)


def _read_yaml(path: str | Path) -> tuple[str, dict]:
    from ..checks import load_yaml, read_text
    from ..config import resolve_recipe

    p = resolve_recipe(path)  # a file, or the packaged recipe name "metrics" (recipes/metrics.yaml)
    data = load_yaml(read_text(p, "metrics config", error=ConfigError), str(p)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of metric sections")
    return str(p), data


def load_metrics_config(path: str | Path | None = None, overrides: Mapping | None = None) -> dict[str, Any]:
    """The metrics config: the defaults, updated section by section by a YAML file and overrides.

    Args:
        path: a metrics.yaml (one section per metric, e.g. imagereward, pickscore, clip, hps,
            fid, lpips, world, and the top-level keys offline / device / dtype), or "metrics" for
            the packaged defaults.
        overrides: same layout, applied last (used by tests and the Python API); sections may be
            plain mappings or the typed configs of an earlier call.
    Returns:
        {"offline": ..., [device, dtype,] metric name: its `MetricConfig`, ...} for every
        registered metric.
    Raises:
        ConfigError: an unknown key (top level or in a section), or a file that is not a mapping.

    Example:
        >>> cfg = load_metrics_config(overrides={"offline": True, "clip": {"w": 2.5, "clamp_zero": True}})
        >>> cfg["clip"].w, cfg["clip"].model
        (2.5, 'openai/clip-vit-large-patch14')
    """
    names = metric_names()
    layers = []
    if path is not None:
        layers.append(_read_yaml(path))
    layers.append(("overrides", dict(overrides or {})))
    top: dict[str, Any] = dict(TOP_LEVEL)
    sections: dict[str, dict] = {n: {} for n in names}
    for where, layer in layers:
        for key, value in layer.items():
            if key not in sections:
                top[key] = value
                continue
            if value is None:  # an empty YAML section (`clip:`) = the defaults
                continue
            get_metric(key).config.from_mapping(value, metric=key, where=where)  # this layer's keys are known
            sections[key] = {**sections[key], **value}
    unknown = set(top) - set(TOP_LEVEL) - set(_UNLISTED)
    if unknown:
        raise ConfigError(f"unknown metrics config keys {sorted(unknown)}; known: {[*TOP_LEVEL, *names]}")
    return {**top, **{n: get_metric(n).config.from_mapping(sections[n], metric=n) for n in names}}


def load_metric(name: str, config: Mapping | None = None, *, device="cpu", dtype=None):
    """Build the scorer of metric `name` from the full metrics config.

    Args:
        name: a registered metric (`metric_names()`).
        config: output of `load_metrics_config` (or a mapping of the same layout; a section given
            as a plain mapping takes the metric's defaults for its missing keys); None: defaults.
        device, dtype: where / how the model runs (dtype default float32).
    Raises:
        WeightsError: weights missing / unusable (message names the file or id and its URL).
    """
    import torch

    spec = get_metric(name)
    config = config or {}
    section = spec.config.coerce(config.get(name), metric=name)
    return spec.loader(section, device=device, dtype=dtype or torch.float32, offline=hub_offline(config))


__all__ = ["TOP_LEVEL", "load_metric", "load_metrics_config"]
