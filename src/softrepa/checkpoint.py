"""Training checkpoints: tokens (safetensors) + optimiser/scheduler/RNG state, written atomically.

Layout of `<run>/checkpoints/`:

    step_000500/  tokens.safetensors  tokens.json  state.pt  config.yaml
                  [more token files: an objective with several sets or EMA copies, e.g. AGSM's
                   tokens_negative / ema_positive / ema_negative .safetensors (+ .json)]
    latest        (text: the name of the newest complete checkpoint)

A checkpoint folder is assembled under a temporary name and renamed into place, and `latest` is
replaced atomically afterwards, so a crash at any moment leaves the previous checkpoint intact
and `latest` always names a complete one; re-saving an existing step keeps that true (see
`save_checkpoint`). Hidden `.step_*` folders are leftovers of a crashed save and are removed by
the next one. `state.pt` holds only tensors, numbers and dicts and is read back with
`torch.load(weights_only=True)`; its size does not grow with the step (the per-step metrics
live in the run's `metrics.jsonl`).
"""

from __future__ import annotations

import errno
import io
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import save_config
from .errors import RunFolderError, SoftTokensError, StorageError
from .runfolder import atomic_write_bytes, write_error_message
from .artifact import load_soft_tokens, save_soft_tokens
from .tokens import SoftTokens


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.random.get_rng_state(), "numpy": _np_state(), "python": _py_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _np_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _py_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tokens: SoftTokens,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: Any,
    extra: dict[str, Any] | None = None,
    scaler: Any = None,
    keep: int = 3,
    extra_tokens: dict[str, SoftTokens] | None = None,
) -> Path:
    """Write checkpoint `step_<step>` atomically, point `latest` at it, prune old ones.

    Args:
        run_dir: the run folder.
        step: completed optimisation steps.
        tokens, optimizer, scheduler: training state.
        config: the resolved config (saved beside the tokens).
        extra: more weights_only-loadable state (numbers, tensors, dicts) of bounded size.
        scaler: fp16 GradScaler or None.
        keep: number of checkpoints to keep (the one written now always among them).
        extra_tokens: more token modules, {file name: tokens} (e.g. "tokens_negative.safetensors"),
            written beside `tokens.safetensors` (the run's main set).
    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    # a unique name: a leftover of a crashed save may be the folder `latest` names right now
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root / f".{name}.{tag}.tmp"
    try:
        tmp.mkdir()
        save_soft_tokens(tokens, tmp / "tokens.safetensors", extra_metadata={"step": str(step)})
        for fname, more in (extra_tokens or {}).items():
            save_soft_tokens(more, tmp / fname, extra_metadata={"step": str(step)})
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_state(), "extra": extra or {}}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        # serialised in memory and written by Python: a full disk is then an OSError naming the
        # file, where torch.save's own writer reports "unexpected pos ..."
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(tmp / "state.pt", buf.getvalue())
        save_config(config, tmp / "config.yaml")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial checkpoint folder stays behind
        if isinstance(e, OSError):
            kept = latest_checkpoint(run_dir)
            intact = f"the last complete checkpoint {kept} is intact" if kept else "no earlier checkpoint exists"
            reason = str(e) if isinstance(e, StorageError) else write_error_message(tmp, e)
            raise StorageError(f"checkpoint step {step} not written ({reason}); {intact}") from e
        raise
    if final.exists():
        # Re-saving a step (a run resumed from an older checkpoint reaches it again). A folder
        # cannot be renamed over a non-empty one, so the old one moves aside first, and `latest`
        # follows a complete folder at every moment: the new one under its temporary name, the
        # old one aside, then the new one in place. Deleting the old folder before the rename
        # would leave `latest` naming nothing if the process died in between.
        aside = root / f".{name}.{tag}.old"
        _point_latest(root, tmp.name)
        os.replace(final, aside)
        _point_latest(root, aside.name)
    os.replace(tmp, final)
    _point_latest(root, name)
    for left in root.glob(".step_*"):  # this save's aside folder, and leftovers of crashed saves
        if left.is_dir():
            shutil.rmtree(left, ignore_errors=True)
    _prune(root, keep, protect=name)
    return final


def _point_latest(root: Path, name: str) -> None:
    atomic_write_bytes(root / "latest", (name + "\n").encode())


def _prune(root: Path, keep: int, protect: str) -> None:
    """Keep `protect` (what `latest` names) and the newest `keep - 1` other checkpoints.

    `protect` is not always the newest: a run resumed from an older checkpoint re-saves steps
    below the ones it left behind, and pruning by name alone would delete the new checkpoint.
    """
    others = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name != protect)
    for old in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = checkpoints_newest_first(run_dir)
    return found[0] if found else None


def checkpoints_newest_first(run_dir: str | os.PathLike) -> list[Path]:
    """A run's complete-looking checkpoint folders: the one `latest` names first, then by step, newest first.

    "Complete-looking" means both files are there; whether they load is `load_checkpoint`'s test
    (a damaged one is skipped for the next by the trainer's resume).
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = sorted((p for p in root.glob("step_*") if _complete(p)), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if _complete(cand):
            done = [cand] + [p for p in done if p != cand]
    return done


def _complete(folder: Path) -> bool:
    return (folder / "state.pt").is_file() and (folder / "tokens.safetensors").is_file()


def remove_leftovers(run_dir: str | os.PathLike) -> list[str]:
    """Delete what killed writers left: hidden `.step_*` checkpoint folders and `.*.tmp` files.

    Only safe while holding the run's lock (no other writer can be mid-write). Returns the names removed.
    """
    run_dir = Path(run_dir)
    removed = []
    pointer = run_dir / "checkpoints" / "latest"
    # a kill in the middle of re-saving a step leaves `latest` naming a hidden folder: keep that one
    named = pointer.read_text().strip() if pointer.is_file() else None
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name == named:
                continue
            if p.name.startswith(".") and (p.name.endswith(".tmp") or (folder.name == "checkpoints"
                                                                       and p.name.startswith(".step_"))):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(str(p.relative_to(run_dir)))
    return removed


#: read errors that say "cannot read now" (I/O error, permissions, a network filesystem), not "damaged"
_CANNOT_READ_NOW = {errno.EIO, errno.EACCES, errno.EPERM, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EINTR,
                    errno.ENOMEM}


def _read_tokens(path: Path, fname: str, into: SoftTokens) -> SoftTokens:
    """One token file of a checkpoint, checked against the run's tokens `into` (not restored yet)."""
    file = path / fname
    if fname != "tokens.safetensors" and not file.is_file():
        raise RunFolderError(f"{file} is missing (the run trains more than one token module; the checkpoint is damaged)")
    try:
        loaded = load_soft_tokens(file)
    except OSError as e:
        if e.errno in _CANNOT_READ_NOW:
            raise
        raise RunFolderError(f"{file} is damaged ({type(e).__name__}: {e})") from e
    except Exception as e:
        raise RunFolderError(f"{file} is damaged ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    if loaded.layout != into.layout:
        raise SoftTokensError(f"{path}: checkpoint tokens layout {loaded.layout} differs from the run's {into.layout}")
    return loaded


def load_checkpoint(path: str | os.PathLike, tokens: SoftTokens, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any = None,
                    extra_tokens: dict[str, SoftTokens] | None = None) -> dict[str, Any]:
    """Restore training state in place from a checkpoint folder; returns the state dict.

    Every file is read and checked before anything is restored, so a damaged checkpoint leaves
    the training state untouched. `extra_tokens`: {file name: tokens} as given to
    `save_checkpoint`, restored too (a missing one is a damaged checkpoint).

    Raises:
        FileNotFoundError: not a checkpoint folder; RunFolderError: a damaged file (named);
        SoftTokensError: tokens of another layout.
    """
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no state.pt)")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= set(state):
            raise ValueError("missing keys")
    except OSError as e:
        if e.errno in _CANNOT_READ_NOW:  # not proof of damage: never skip (and move aside) a good checkpoint
            raise
        raise RunFolderError(f"{path / 'state.pt'} is damaged ({type(e).__name__}: {e})") from e
    except Exception as e:  # truncated zip, bad pickle, wrong content: all mean "damaged"
        raise RunFolderError(f"{path / 'state.pt'} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    targets = {"tokens.safetensors": tokens, **(extra_tokens or {})}
    loaded = {fname: _read_tokens(path, fname, into) for fname, into in targets.items()}
    with torch.no_grad():
        for fname, into in targets.items():
            into.base.copy_(loaded[fname].base)
            if into.time is not None:
                into.time.copy_(loaded[fname].time)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state
