"""The one error hierarchy of softrepa: every error the library raises on purpose is a `SoftrepaError`.

The policy, library and command line alike:

* An error a user can cause (a bad option or argument value, a file that cannot be read, tokens
  that do not fit the model, an output folder of another run, a missing optional dependency) is a
  `SoftrepaError` subclass whose message names the option / file / field. Each class also derives
  from the built-in it refines (`ValueError`, `RuntimeError`, `OSError`, `ImportError`), so code
  written against the built-ins keeps catching them.
* Anything else, a bare `ValueError` included, is a bug: nothing catches it wholesale.
* The command line (`softrepa.cli.main`) turns `SoftrepaError` and `OSError` (missing files,
  permissions, full disks) into one line `softrepa <cmd>: error: ...` on stderr and exit code 2
  (`--traceback` adds the traceback), Ctrl-C into exit code 130, and any other exception into its
  traceback, a line `softrepa <cmd>: internal error — please report it ...` and exit code 1.
  The web page (`softrepa ui`) shows the same errors as one-line messages.
"""

from __future__ import annotations


class SoftrepaError(Exception):
    """Base class of every error softrepa raises for a bad input, artefact or run state."""


class UsageError(SoftrepaError, ValueError):
    """An invalid value of a command-line option or a function argument (the message names it)."""


class SoftTokensError(SoftrepaError, ValueError):
    """A soft-token configuration or artefact that does not fit (the message names the field)."""


class ConfigError(SoftrepaError, ValueError):
    """A config (training recipe, metrics.yaml) or override that is invalid (the message names the key)."""


class DatasetError(SoftrepaError, ValueError):
    """A dataset, manifest or prompt file that cannot be read (the message names the file / row)."""


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


class MissingDependencyError(SoftrepaError, ImportError):
    """An optional dependency a feature needs is not installed (the message names the pip extra)."""


__all__ = ["ConfigError", "DatasetError", "LatentCacheError", "MetricError", "MissingDependencyError",
           "RunFolderError", "SoftTokensError", "SoftrepaError", "StorageError", "TrainingDiverged", "UsageError",
           "WeightsError"]
