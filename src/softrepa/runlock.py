"""One writer per output folder: an OS lock held for the whole run, naming its holder.

`RunLock(folder)` takes an exclusive lock on `folder/.softrepa.lock` through the maintained
`filelock` package (an OS `flock`), without waiting: a second process on the same folder fails at
once with a `RunFolderBusy` that names the holder's pid, host and start time, read from
`folder/.softrepa.owner.json`, which the holder writes after taking the lock.

Why an OS lock and not a "pid file": the kernel releases an `flock` when its process dies, however
it dies (SIGKILL, OOM, power loss of a local disk), so a killed run never leaves a lock that blocks
the next one. What a killed run does leave is its owner file; the next holder finds it, logs that
it takes over from that (gone) process, and rewrites it. A lock on a network filesystem is only as
good as that filesystem's `flock` (NFSv4 and Lustre honour it; some FUSE mounts do not).

Example:
    >>> with RunLock("runs/sd3"):
    ...     train()                      # a second `softrepa train --out runs/sd3` exits at once
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import RunFolderError

log = logging.getLogger(__name__)

LOCK_FILE = ".softrepa.lock"
OWNER_FILE = ".softrepa.owner.json"


class RunFolderBusy(RunFolderError):
    """Another process holds the output folder's lock."""


class RunLock:
    """Exclusive, non-blocking lock on an output folder for the lifetime of a run.

    Args:
        folder: the output folder (created when missing).
        what: what the folder is, for messages ("run folder", "output folder").
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run folder"):
        self.folder = Path(folder)
        self.what = what
        self._lock: FileLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> "RunLock":
        """Take the lock or fail at once.

        Raises:
            RunFolderBusy: another process holds it (the message names pid, host and start).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        # thread_local=False / is_singleton=False: two RunLocks in one process are two holders, so
        # that tests (and a library user opening one folder twice) see the same refusal
        lock = FileLock(str(self.folder / LOCK_FILE), timeout=0, thread_local=False, is_singleton=False)
        try:
            lock.acquire()
        except Timeout:
            owner = read_owner(self.folder)
            who = (f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('started')}"
                   f" ({owner.get('command', '?')})") if owner else "another process"
            raise RunFolderBusy(f"{self.folder}: this {self.what} is in use by {who}; wait for it to finish, "
                                f"or choose another folder (lock file {self.folder / LOCK_FILE})") from None
        previous = read_owner(self.folder)
        if previous and previous.get("pid") != os.getpid():
            # the lock was free, so that process is gone (or never released it on another host's crash)
            log.warning("%s: taking over from a run that ended without releasing the folder (pid %s on %s, "
                        "started %s)", self.folder, previous.get("pid"), previous.get("host"), previous.get("started"))
        self._lock = lock
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.datetime.now().isoformat(timespec="seconds"),
                 "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        tmp = self.folder / f".{OWNER_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(owner) + "\n")
        os.replace(tmp, self.folder / OWNER_FILE)
        return self

    def release(self) -> None:
        """Drop the owner record and the lock (idempotent)."""
        if self._lock is None:
            return
        try:
            (self.folder / OWNER_FILE).unlink(missing_ok=True)
        finally:
            self._lock.release(force=True)
            self._lock = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock must not outlive its object in a long-lived process
        try:
            self.release()
        except Exception:
            pass


def check_free(folder: str | os.PathLike, what: str = "run folder") -> None:
    """Fail at once when another process holds the folder's lock (take and drop it: a probe).

    Raises:
        RunFolderBusy: naming the holder.
    """
    if Path(folder).is_dir():
        RunLock(folder, what).acquire().release()


def read_owner(folder: str | os.PathLike) -> dict[str, Any]:
    """The owner record of a folder's lock ({} when none or unreadable)."""
    try:
        data = json.loads((Path(folder) / OWNER_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


__all__ = ["LOCK_FILE", "OWNER_FILE", "RunFolderBusy", "RunLock", "check_free", "read_owner"]
