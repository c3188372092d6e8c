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

import os
import signal
import sys
import threading


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


# --------------------------------------------------------------------------- Ctrl-C while importing
# The console script imports `softrepa` (and with it torch, seconds) before any softrepa code can catch
# anything, so a Ctrl-C in those seconds printed a long import traceback (issue 26). `guard_imports`
# (called first in `softrepa/__init__.py`) installs, for the command line only, a SIGINT handler that
# ends the process with the CLI's own line and exit code 130; once `softrepa.cli.main` runs
# (`interrupt_state["running"]`), the handler raises `KeyboardInterrupt` as the default one does and
# the CLI's policy takes over. A program that imports softrepa as a library keeps Python's handler.

#: set by `softrepa.cli.main`: from then on Ctrl-C is a KeyboardInterrupt the CLI reports
interrupt_state = {"running": False}


def _is_command_line() -> bool:
    # `softrepa ...` (console script) or `python -m softrepa` (argv[0] is "-m" while the package imports)
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("softrepa", "-m")


def _handler(signum, frame):  # noqa: ANN001 - the signal module's signature
    if interrupt_state["running"]:
        raise KeyboardInterrupt
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")  # the CLI's own wording
    sys.stderr.write(f"softrepa {command}: interrupted\n" if command else "softrepa: interrupted\n")
    sys.stderr.flush()
    os._exit(130)  # nothing has been written yet: no cleanup to run


def guard_imports() -> None:
    """Install the quiet handler when this process is the softrepa command line (main thread only)."""
    if (_is_command_line() and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _handler)


__all__ = ["ConfigError", "DatasetError", "LatentCacheError", "MetricError", "MissingDependencyError",
           "RunFolderError", "SoftTokensError", "SoftrepaError", "StorageError", "TrainingDiverged", "UsageError",
           "WeightsError"]
