"""Evaluation: the SoftREPA paper's metrics (Table 4), `evaluate` and `compare_runs`.

Re-exports only. Each metric is one `MetricSpec` (`spec.py`) declared next to its loader and
registered there: imagereward (`imagereward.py`), pickscore, clip, hps (`clip_models.py`), fid
(`inception.py`), lpips (`lpips.py`); importing this package imports those modules, so they are
registered. Metrics of other packages (the miniature's `world`) come through the
`softrepa.metrics` entry point group, loaded the first time the registry is listed or asked for
a name it does not hold. Weights are never downloaded at test time and never substituted: see
`common.resolve_file`. See docs/evaluation.md.
"""

# Importing these registers their metrics, in the paper's table order (imagereward first).
from . import imagereward  # noqa: F401
from . import clip_models, inception, lpips  # noqa: F401
from .common import MetricError, WeightsError
from .compare import compare_runs
from .config import load_metric, load_metrics_config
from .evaluate import PAPER_METRICS, evaluate
from .inputs import EvalItem, image_pairs, read_items
from .report import summarize, summary_lines, summary_rows, write_results
from .spec import MetricConfig, MetricKind, MetricSpec, SummaryRow, get_metric, metric_names, optional, register_metric

__all__ = ["EvalItem", "MetricConfig", "MetricError", "MetricKind", "MetricSpec", "PAPER_METRICS", "SummaryRow",
           "WeightsError", "compare_runs", "evaluate", "get_metric", "image_pairs", "load_metric",
           "load_metrics_config", "metric_names", "optional", "read_items", "register_metric", "summarize",
           "summary_lines", "summary_rows", "write_results"]
