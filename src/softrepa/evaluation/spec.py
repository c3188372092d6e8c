"""What a metric is: one `MetricSpec` (name, kind, loader, note, direction, config) per metric.

Every fact `softrepa evaluate` / `softrepa compare` need about a metric lives in its spec, declared
next to its loader (the end of clip_models.py declares clip, pickscore and hps) and registered with
`register_metric` (`registry.py`). The evaluator dispatches on `MetricSpec.kind`, never on a name.

Kinds (the scorer a loader returns has the method of its kind):

* `PER_PROMPT`: `score(images, prompts) -> (B,)` per-image scores against the prompt, batched
  (imagereward, pickscore, clip, hps).
* `PER_PAIR`: `distance(images, paired_images) -> (B,)` per image against its pair (the edit's
  source, the metadata reference_image, the COCO image of its prompt or the same-named
  `--reference` image), batched (lpips).
* `PER_SET`: `features(images) -> (B, D)`, batched, and `statistic(features, reference) ->
  (value, info)`: one value for the whole set against `--reference` (a folder whose images are
  featurised the same way, or a statistics file with a suffix in `scorer.statistics_suffixes`,
  passed as a path); `scorer.reference_help` says what `--reference` must be (fid).
* `REPORT`: `report(images, prompts, reference_images) -> (values (B,), info)`: all images and
  prompts in one call, per-image values plus a run-level report (`reference_images`: the
  `--reference` folder's images, or None). The miniature's analytic judge (`world`) is one:
  per-image 0/1 outcomes plus accuracies per category and a set-level quality proxy.

Per-image values (every kind but `PER_SET`) are summarised as mean, std and a 95% CI: the Student
t interval, or for `binary` metrics (0/1 outcomes) the Wilson score interval. A scorer may have
`info() -> dict`, recorded next to its values in results.json (e.g. its preprocessing).

Config. `MetricSpec.config` is a frozen dataclass deriving from `MetricConfig`: one field per
metrics.yaml key with its typed default. `MetricConfig.from_mapping` rejects unknown keys with a
one-line error naming the metric, the key and the known keys. Fields declared with `optional()`
are keys a loader reads when they are set (e.g. `image_mean`); results.json records the section
as given (the default keys plus the optional keys that were set), so that record is the same
dict metrics.yaml describes. Values are checked by the loader, so a bad value fails only its
metric (recorded under "errors"), as a missing weights file does.

Registry. Built-in metrics register themselves when their module is imported (`softrepa.evaluation`
imports them all). Metrics of other packages (the miniature's `world`, or a third-party
package's) are declared as entry points of the group `softrepa.metrics`, each naming a
`MetricSpec` object:

    [project.entry-points."softrepa.metrics"]
    world = "softrepa.toy.metrics:WORLD"

They are loaded the first time the registry is listed or asked for a name it does not hold, so
importing `softrepa.evaluation` imports none of them. An entry point that fails to load is
logged and skipped: the other metrics stay usable.
"""

from __future__ import annotations

import difflib
import enum
import logging
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Iterator

from ..errors import ConfigError, UsageError


class MetricKind(enum.Enum):
    """How a metric's scorer is called (see the module docstring)."""

    PER_PROMPT = "per_prompt"
    PER_PAIR = "per_pair"
    PER_SET = "per_set"
    REPORT = "report"


def optional(default: Any = None) -> Any:
    """A config field recorded in results.json only when it was set (the loader uses `default` otherwise)."""
    return field(default=default, metadata={"optional": True})


@dataclass(frozen=True)
class MetricConfig(Mapping):
    """Base of the per-metric config dataclasses; reads like the metrics.yaml section it came from.

    Subclasses are frozen dataclasses whose fields are the section's keys with typed defaults.
    As a `Mapping` an instance holds the keys of its record (every non-optional field and the
    optional fields that were set), so `{**cfg["clip"], "w": 2.5}` and `cfg["hps"]["version"]`
    work as on the plain dict; typed code reads `cfg["hps"].version`.
    """

    #: Optional keys in the order they were given (set by `from_mapping`).
    _given: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_mapping(cls, data: Mapping | None = None, *, metric: str, where: str = "") -> "MetricConfig":
        """Validate a metrics.yaml section into this config (missing keys take their defaults).

        Args:
            data: the section (None: all defaults).
            metric: the metric name, for messages.
            where: what the section came from (a file name, "overrides"), for messages.
        Raises:
            ConfigError: a key that is not a field (the message names the metric, the key and
                the known keys), or a section that is not a mapping.
        """
        data = {} if data is None else data
        prefix = f"{where}: " if where else ""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix}metrics config section {metric!r} must be a mapping of keys, "
                              f"got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{prefix}metrics config section {metric!r}: unknown key"
                              f"{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{hint}; "
                              f"known keys: {', '.join(known)}")
        obj = cls(**data)
        object.__setattr__(obj, "_given", tuple(k for k in data if _is_optional(cls, k)))
        return obj

    @classmethod
    def coerce(cls, data: "MetricConfig | Mapping | None", *, metric: str) -> "MetricConfig":
        """`data` itself when it already is this config, else `from_mapping(data)` (loaders take either)."""
        return data if isinstance(data, cls) else cls.from_mapping(data, metric=metric)

    def _record_keys(self) -> list[str]:
        keys, optional_names = [], []
        for f in fields(self):
            (optional_names if f.metadata.get("optional") else keys).append(f.name)
        given = [k for k in self._given if k in optional_names]
        changed = [f.name for f in fields(self) if f.name in optional_names and f.name not in given
                   and getattr(self, f.name) != _default(f)]
        return keys + given + changed

    def as_dict(self) -> dict[str, Any]:
        """The section as results.json records it: default keys in order, then the optional keys set."""
        return {k: getattr(self, k) for k in self._record_keys()}

    def __getitem__(self, key: str) -> Any:
        if key not in self._record_keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._record_keys())

    def __len__(self) -> int:
        return len(self._record_keys())


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _is_optional(cls, name: str) -> bool:
    return any(f.name == name and f.metadata.get("optional") for f in fields(cls))


@dataclass(frozen=True)
class SummaryRow:
    """A set statistic stored inside another metric's results, shown as a summary row of its own.

    Args:
        name: the row's name (e.g. "world_quality_proxy").
        key: the key in the metric's results holding the value (e.g. "quality_proxy").
        note: the row's note in results.md.
        higher_is_better: direction of "better" (compare's arrows).
    """

    name: str
    key: str
    note: str
    higher_is_better: bool


@dataclass(frozen=True)
class MetricSpec:
    """Everything the evaluator knows about one metric.

    Args:
        name: the name in `--metrics`, metrics.yaml and results.json.
        kind: how the scorer is called (`MetricKind`).
        loader: `loader(cfg, *, device, dtype, offline) -> scorer`; `cfg` is an instance of
            `config` (loaders also accept a plain mapping and coerce it).
        note: the text results.md shows next to the metric.
        higher_is_better: direction of "better" (compare's arrows).
        config: the metrics.yaml section's dataclass (a `MetricConfig` subclass).
        binary: per-image values are 0/1 outcomes: the CI is the Wilson score interval.
        rows: set statistics stored in this metric's results, shown as rows of their own.
        markdown: optional `markdown(metric_results) -> lines` appended to results.md after the
            table (e.g. the world metric's accuracy per category); [] when nothing applies.
    """

    name: str
    kind: MetricKind
    loader: Callable[..., Any]
    note: str
    higher_is_better: bool
    config: type[MetricConfig]
    binary: bool = False
    rows: tuple[SummaryRow, ...] = ()
    markdown: Callable[[dict], list[str]] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"metric name must be a non-empty word (letters, digits, _), got {self.name!r}")
        if not isinstance(self.kind, MetricKind):
            raise TypeError(f"metric {self.name!r}: kind must be a MetricKind, got {self.kind!r}")
        if not callable(self.loader):
            raise TypeError(f"metric {self.name!r}: loader must be callable")
        if not (isinstance(self.config, type) and issubclass(self.config, MetricConfig) and is_dataclass(self.config)):
            raise TypeError(f"metric {self.name!r}: config must be a MetricConfig dataclass, got {self.config!r}")
        if self.binary and self.kind is MetricKind.PER_SET:
            raise ValueError(f"metric {self.name!r}: a PER_SET metric has no per-image values to be binary")


# ------------------------------------------------------------------------------------ registry

log = logging.getLogger(__name__)
#: Entry point group of metrics from other packages.
ENTRY_POINT_GROUP = "softrepa.metrics"
_REGISTRY: dict[str, MetricSpec] = {}
_entry_points_loaded = False


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add a metric to the registry (registering the same spec object again is a no-op).

    Args:
        spec: the metric's `MetricSpec`.
    Returns:
        `spec`, so a module can write `CLIP = register_metric(MetricSpec(...))`.
    Raises:
        ValueError: another spec is registered under the same name.
    """
    if not isinstance(spec, MetricSpec):
        raise TypeError(f"register_metric needs a MetricSpec, got {type(spec).__name__}")
    held = _REGISTRY.get(spec.name)
    if held is not None and held is not spec:
        raise ValueError(f"metric {spec.name!r} is already registered (loader "
                         f"{getattr(held.loader, '__module__', '?')}.{getattr(held.loader, '__qualname__', '?')})")
    _REGISTRY[spec.name] = spec
    return spec


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            spec = ep.load()
            if not isinstance(spec, MetricSpec):
                raise TypeError(f"{ep.value} is a {type(spec).__name__}, not a MetricSpec")
            if spec.name != ep.name:
                raise ValueError(f"{ep.value} is named {spec.name!r}, not {ep.name!r}")
            register_metric(spec)
        except Exception as e:  # noqa: BLE001 - one broken plug-in must not hide the other metrics
            log.warning("metric entry point %s = %s not loaded: %s: %s", ep.name, ep.value, type(e).__name__, e)


def metric_names() -> tuple[str, ...]:
    """Every registered metric: the built-ins in the paper's table order, then the entry points'."""
    _load_entry_points()
    return tuple(_REGISTRY)


def get_metric(name: str) -> MetricSpec:
    """The spec of metric `name`.

    Raises:
        UsageError: no such metric (the message lists the known ones).
    """
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise UsageError(f"unknown metric {name!r}; known: {list(metric_names())}")
    return _REGISTRY[name]


def higher_is_better(name: str) -> bool | None:
    """Direction of "better" for a metric or a summary row (e.g. world_quality_proxy); None if unknown."""
    for spec in (_REGISTRY[n] for n in metric_names()):
        if spec.name == name:
            return spec.higher_is_better
        for row in spec.rows:
            if row.name == name:
                return row.higher_is_better
    return None


__all__ = ["ENTRY_POINT_GROUP", "MetricConfig", "MetricKind", "MetricSpec", "SummaryRow", "get_metric",
           "higher_is_better", "metric_names", "optional", "register_metric"]
