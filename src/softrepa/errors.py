"""The one error hierarchy of softrepa: every error the library raises on purpose is a `SoftrepaError`.

The command line maps `SoftrepaError` (plus missing files and bad values from the standard library)
to one line on stderr and exit code 2; anything else is a bug and keeps its traceback. Each class
also derives from the built-in it refines (`ValueError`, `RuntimeError`), so code written against
the built-ins keeps catching them.
"""

from __future__ import annotations


class SoftrepaError(Exception):
    """Base class of every error softrepa raises for a bad input, artefact or run state."""


class SoftTokensError(SoftrepaError, ValueError):
    """A soft-token configuration or artefact that does not fit (the message names the field)."""


class ConfigError(SoftrepaError, ValueError):
    """A training config or override that is invalid (the message names the key)."""


class DatasetError(SoftrepaError, ValueError):
    """A dataset that cannot be read (the message names the file / row)."""


class LatentCacheError(SoftrepaError, ValueError):
    """A latent cache that does not match its dataset or model."""


class TrainingDiverged(SoftrepaError, RuntimeError):
    """The loss became NaN / inf; the last good checkpoint is kept."""


class RunFolderError(SoftrepaError, RuntimeError):
    """An output folder that holds another run, is in use, or is damaged (the message says which)."""


class StorageError(SoftrepaError, OSError):
    """A write that failed (disk full, I/O error); the message names the path, partial files are gone."""


class MetricError(SoftrepaError, RuntimeError):
    """A metric that cannot run (missing weights, bad inputs)."""


class WeightsError(MetricError):
    """A metric's weights are missing or do not match the expected architecture."""


__all__ = ["ConfigError", "DatasetError", "LatentCacheError", "MetricError", "RunFolderError", "SoftTokensError",
           "SoftrepaError", "StorageError", "TrainingDiverged", "WeightsError"]
