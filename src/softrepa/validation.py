"""Validation during training: score the vanilla / tokens images, send grid and scores to the trackers.

`Trainer.validation_grid` generates the validation prompts without and with the tokens; this
module holds what it does with them, so the trainer stays a loop:

* `load_validation_metrics` builds the scorers named by `validation.metrics` through the
  evaluation registry (`softrepa.evaluation.load_metric`), once, before the model loads: an
  unknown name or missing weights stop the run in seconds, not at the first validation.
* `score_arms` averages each metric over each arm's images -> `validation/<metric>/vanilla`,
  `.../tokens` and `.../delta` (tokens minus vanilla).
* `log_images` hands the grid to every tracker that takes images (accelerate's `log_images`),
  in the shape that tracker expects; trackers without it are skipped with a debug line.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ConfigError, SoftrepaError

logger = logging.getLogger(__name__)

#: how many prompts an arm's images are scored in at once (scorers hold a batch in memory)
SCORE_BATCH = 16


def load_validation_metrics(names: Sequence[str], metrics_config: str | None = None, *,
                            device: Any = "cpu") -> dict[str, tuple[Any, Any]]:
    """The scorers of `validation.metrics`: {name: (MetricSpec, scorer)}.

    Args:
        names: registered metric names that score an image against its prompt (`world`, `clip`,
            `pickscore`, `imagereward`, `hps`, or a plugin's).
        metrics_config: a metrics.yaml with the weights (None: the packaged defaults).
        device: where the scorers run.
    Raises:
        ConfigError: an unknown metric, or one that needs reference images (fid, lpips);
        WeightsError: the weights are not available (the message names the file / id).

    Example:
        >>> scorers = load_validation_metrics(["world"])
        >>> score_arms(scorers, prompts, vanilla_images, tokens_images)["validation/world/delta"]
    """
    from .evaluation import load_metric, load_metrics_config
    from .evaluation.spec import MetricKind, get_metric, metric_names

    if not names:
        return {}
    config = load_metrics_config(metrics_config)
    out: dict[str, tuple[Any, Any]] = {}
    for name in names:
        if name not in metric_names():
            raise ConfigError(f"validation.metrics: unknown metric {name!r}; known: {', '.join(metric_names())}")
        spec = get_metric(name)
        if spec.kind not in (MetricKind.PER_PROMPT, MetricKind.REPORT):
            raise ConfigError(f"validation.metrics: {name!r} compares against reference images "
                              f"({spec.kind.value}); validation scores images against their prompts only")
        out[name] = (spec, load_metric(name, config, device=device))
    return out


def _score(spec: Any, scorer: Any, images: Sequence[Any], prompts: Sequence[str]) -> float:
    from .evaluation.spec import MetricKind

    if spec.kind is MetricKind.REPORT:  # the whole list at once: a report is over a set
        values, _ = scorer.report(list(images), list(prompts), None)
        return float(np.mean(values))
    values = [scorer.score(list(images[i:i + SCORE_BATCH]), list(prompts[i:i + SCORE_BATCH]))
              for i in range(0, len(images), SCORE_BATCH)]
    return float(np.mean(np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in values])))


def score_arms(scorers: Mapping[str, tuple[Any, Any]], prompts: Sequence[str], vanilla: Sequence[Any],
               tokens: Sequence[Any]) -> dict[str, float]:
    """Mean score of each metric on each arm, and the difference.

    Args:
        scorers: `load_validation_metrics`'s output.
        prompts: the prompt of each image (the same order in both arms).
        vanilla, tokens: PIL images without / with the tokens.
    Returns:
        {"validation/<metric>/vanilla": .., "validation/<metric>/tokens": .., "validation/<metric>/delta": ..};
        a metric that cannot score these prompts is left out with a warning (training goes on).
    """
    row: dict[str, float] = {}
    for name, (spec, scorer) in scorers.items():
        try:
            v, t = _score(spec, scorer, vanilla, prompts), _score(spec, scorer, tokens, prompts)
        except SoftrepaError as e:  # MetricError, e.g. a prompt the world judge cannot read: the run goes on
            logger.warning("validation metric %s not computed: %s", name, e)
            continue
        row.update({f"validation/{name}/vanilla": v, f"validation/{name}/tokens": t,
                    f"validation/{name}/delta": t - v})
    return row


def log_images(trackers: Sequence[Any], tag: str, image: Any, step: int) -> list[str]:
    """Send one image (the validation grid) to every tracker that takes images.

    accelerate's trackers disagree on the argument: TensorBoard's wants an array batch (NHWC here),
    Aim's one image per key, the others (wandb, clearml, swanlab) a list of images.

    Args:
        trackers: `Accelerator.trackers`.
        tag: the image's name in the trackers.
        image: a PIL image.
        step: the training step.
    Returns:
        The names of the trackers that got it.
    """
    done = []
    for tracker in trackers:
        name = getattr(tracker, "name", type(tracker).__name__)
        if not callable(getattr(tracker, "log_images", None)):
            logger.debug("tracker %s takes no images: validation grid not sent", name)
            continue
        if name == "tensorboard":
            tracker.log_images({tag: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")
        elif name == "aim":
            tracker.log_images({tag: image}, step=step)
        else:
            tracker.log_images({tag: [image]}, step=step)
        done.append(name)
    return done


#: pip package of each accelerate tracker, for the missing-package error
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet-ml", "aim": "aim",
                    "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}


def tracker_name(t: Any) -> str:
    """"tensorboard" for a name, a `LoggerType` or a tracker object."""
    if hasattr(t, "requires_logging_directory") and getattr(t, "name", None):
        return str(t.name)
    return str(getattr(t, "value", t))


def check_trackers(requested: str | Sequence[str] | None, got: Sequence[Any]) -> None:
    """Stop when a named tracker could not be set up (accelerate only warns, then logs nothing).

    Args:
        requested: `log_with` ("tensorboard", "tensorboard,wandb", a list, or "all").
        got: what accelerate set up (`Accelerator.log_with` or `.trackers`).
    Raises:
        ConfigError: naming the tracker and the package to install.
    """
    names = requested if isinstance(requested, (list, tuple)) else (requested or "").split(",")
    names = [n.strip() for n in names if n and n.strip() and n.strip() != "all"]
    have = {tracker_name(t) for t in got}
    missing = [n for n in names if n not in have]
    if missing:
        n = missing[0]
        pkg = TRACKER_PACKAGES.get(n, n)
        extra = " (or pip install 'softrepa[tensorboard]')" if n == "tensorboard" else ""
        raise ConfigError(
            f"log_with: {n!r} was requested but accelerate could not set up that tracker, most likely "
            f"because the {pkg} package is not installed: pip install {pkg}{extra}, "
            "or set log_with: null to log to metrics.jsonl only")


__all__ = ["SCORE_BATCH", "TRACKER_PACKAGES", "check_trackers", "load_validation_metrics", "log_images",
           "score_arms", "tracker_name"]
