"""Ctrl-C while the command line is still importing torch / diffusers (seconds) ends quietly.

The console script imports `softrepa` (and with it torch) before any softrepa code can catch
anything, so a Ctrl-C in those seconds printed a long import traceback. `guard_imports` (called at
the top of `softrepa/__init__.py`) installs, for the command line only, a SIGINT handler that ends
the process with the CLI's own line and exit code 130; once `softrepa.cli.main` runs, the handler
raises `KeyboardInterrupt` as the default one does, and the CLI's error policy takes over.
A program that imports softrepa as a library keeps Python's own handler.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

#: set by `softrepa.cli.main`: from then on Ctrl-C is a KeyboardInterrupt the CLI reports
state = {"running": False}


def _is_command_line() -> bool:
    # `softrepa ...` (console script) or `python -m softrepa` (argv[0] is "-m" while the package imports)
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("softrepa", "-m")


def _handler(signum, frame):  # noqa: ANN001 - the signal module's signature
    if state["running"]:
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
