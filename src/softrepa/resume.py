"""A training run's folder across processes: who may start there, what a resumed run continues with.

* `claim_run_folder`: one run per folder; a new run over another run's artefacts is refused unless
  `--overwrite` removes them first (never a mix of two runs).
* `resume_config` / `check_resumable` / `saved_run_config`: a resumed run continues with its saved
  config.yaml; a config that would train something else is refused (only `RESUMABLE_FIELDS` may
  change).
* `newest_intact` / `drop_abandoned`: which checkpoint a resume restores (a damaged newest one is
  skipped, said so, and moved aside), and what a continuation past it had written goes.
* `trim_metrics`: the metrics log cut back to the resumed step, so that every step is logged once.

The trainer (`softrepa.train.Trainer`) calls these; the lock that keeps a second process out is
`softrepa.runlock`, the atomic writes `softrepa.runfolder`, the checkpoint format `softrepa.checkpoint`.

Example:
    >>> cfg = resume_config("latest", None, {"output_dir": "runs/sd3"})   # the run's own config
    >>> claim_run_folder("runs/new", resume=None)   # RunFolderError if another run lives there
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import PATH_FIELDS, ConfigError, TrainConfig, _merge, absolute_path, config_dict, config_diff, load_config
from .errors import RunFolderError
from .runfolder import atomic_write_bytes

logger = logging.getLogger(__name__)


#: what a training run writes into its folder (`--overwrite` removes exactly these)
RUN_ARTEFACTS = ("config.yaml", "tokens.safetensors", "tokens.json", "metrics.jsonl", "curves.png", "checkpoints",
                 "validation", "softrepa",  # softrepa/: accelerate's tracker logs (project "softrepa")
                 "tokens_negative.safetensors", "tokens_negative.json")  # objective agsm's second set (psi-)


#: what softrepa writes inside the artefact folders (`--overwrite` deletes these and nothing else there)
OWN_INSIDE = {"checkpoints": re.compile(r"step_\d+|\.step_\d+\..*|damaged\.step_\d+|latest|\..*\.tmp"),
              "validation": re.compile(r"step_\d+\.png|\..*\.tmp"),
              "softrepa": re.compile(r"events\.out\.tfevents\..*")}  # accelerate's tensorboard logs


def remove_own(path: Path) -> None:
    """Delete a run artefact; of the artefact folders only what softrepa writes there (`OWN_INSIDE`):
    a file of yours in `checkpoints/`, `validation/` or `softrepa/` stays, and so does its folder."""
    own = OWN_INSIDE.get(path.name)
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    if own is None:  # pragma: no cover - every artefact folder is listed
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        # checkpoints/ and validation/: their own top level only; softrepa/: the tracker's files at any depth
        if own.fullmatch(child.name) and (child.parent == path or path.name == "softrepa"):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    logs = path.rglob("*") if path.name == "softrepa" else ()
    for child in sorted((p for p in logs if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(child.iterdir()):  # folders the removed logs leave empty
            child.rmdir()
    if not any(path.iterdir()):
        path.rmdir()


def claim_run_folder(out: str | os.PathLike, resume: bool | str | None = None, overwrite: bool = False) -> None:
    """A run folder belongs to one run: refuse to start a new run over another run's artefacts.

    A folder holds a run when its `config.yaml` is a softrepa training config (folders merely named
    like artefacts, e.g. your own `validation/`, do not count and are never deleted).

    Args:
        out: the run folder.
        resume: "latest" / True, or a checkpoint inside `out/checkpoints`: the run continues in its
            own folder. A checkpoint of another run starts a new run here from its state, so `out`
            must not hold a run.
        overwrite: remove the other run's artefacts (`RUN_ARTEFACTS`) first; other files stay.
    Raises:
        RunFolderError: the folder holds a run and neither a resume of it nor `overwrite` was given
            (the message names what is there and the three choices), or its config.yaml is not a
            softrepa config.
    """
    out = Path(out)
    own = resume is True or resume == "latest" or (
        bool(resume) and Path(resume).resolve().parent == (out / "checkpoints").resolve())
    if own:
        return
    config = out / "config.yaml"
    if not config.is_file():
        return
    try:
        saved = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if not (isinstance(saved, dict) and {"tokens", "loss", "model"} <= set(saved)):
        raise RunFolderError(f"{out} holds a config.yaml that is not a softrepa run's; choose another --out folder")
    found = [name for name in RUN_ARTEFACTS if (out / name).exists()]
    if overwrite:
        for name in found:
            remove_own(out / name)
        logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(found), out)
        return
    what = "a resume from another run's checkpoint" if resume else "a new run"
    raise RunFolderError(f"{out} holds another run ({', '.join(found)}), so {what} cannot start there: continue "
                         "that run with --resume, choose a new --out folder, or pass --overwrite to delete it first")


#: what may change when a run is resumed: its length, logging and validation, not what it learns
RESUMABLE_FIELDS = ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "log_with",
                    "validation", "output_dir", "compile", "compile_mode", "speed")


def saved_run_config(resume: bool | str, output_dir: str | os.PathLike | None) -> Path | None:
    """The config.yaml of the run being resumed: beside the given checkpoint folder first, then in
    the run folder (`output_dir`); None when there is none (a run killed before its first save).

    Args:
        resume: True / "latest" (the run's latest checkpoint) or a checkpoint folder.
        output_dir: the run folder.
    Raises:
        ConfigError: resuming "latest" without a run folder.
    """
    if resume not in (True, "latest"):
        ckpt = Path(resume)
        for cand in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
            if cand.is_file():
                return cand
        return None
    if output_dir is None:
        raise ConfigError("--resume needs the run's folder: give --output_dir DIR (or the --config it was started with)")
    saved = Path(output_dir) / "config.yaml"
    return saved if saved.is_file() else None


def check_resumable(cfg: TrainConfig, saved: str | os.PathLike) -> None:
    """Refuse to resume `saved`'s run with a config that trains something else.

    A calibrated run's tau table, estimated by the run itself, is taken over from `saved` when `cfg`
    has none. Only `RESUMABLE_FIELDS` may differ.

    Raises:
        ConfigError: naming the differing fields (up to six) and what may change.
    """
    old = yaml.safe_load(Path(saved).read_text(encoding="utf-8")) or {}
    # a field the saved config lacks (written before the field existed) had its default
    old = _merge(config_dict(TrainConfig()), old) if isinstance(old, dict) else {}
    table = (old.get("loss") or {}).get("tau_table")
    if cfg.loss.tau_schedule == "calibrated" and cfg.loss.tau_table is None and table:
        cfg.loss.tau_table = [float(v) for v in table]
    new = config_dict(cfg)
    for name in PATH_FIELDS:  # a relative path and its absolute form name the same file
        old[name], new[name] = absolute_path(old.get(name)), absolute_path(new.get(name))
    changed = [d for d in config_diff(old, new) if d.split(":")[0].split(".")[0] not in RESUMABLE_FIELDS]
    if changed:
        raise ConfigError(
            f"--resume: this config differs from the run's {saved} in what it trains ({'; '.join(changed[:6])}). "
            "Resume without --config (the saved config is used) or with the same settings; only "
            f"{', '.join(RESUMABLE_FIELDS)} may change.")


def resume_config(resume: bool | str | None, config: str | os.PathLike | None,
                  overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of a (possibly resumed) run, as `softrepa train` resolves it.

    A resumed run without `config` continues with its saved config.yaml (plus `overrides`); with
    one, that config is used and checked against the saved one (`check_resumable`).

    Args:
        resume: None (a new run), True / "latest", or a checkpoint folder.
        config: a recipe file or None.
        overrides: dotted overrides ({"max_steps": 300}).
    """
    overrides = dict(overrides or {})
    if not resume:
        return load_config(config, overrides)
    out = overrides.get("output_dir")
    if out is None and config is not None:
        out = load_config(config, overrides).output_dir
    saved = saved_run_config(resume, out)
    cfg = load_config(str(saved) if saved is not None and config is None else config, overrides)
    if saved is not None:
        check_resumable(cfg, saved)
    return cfg


def saved_tau_table(path: Path) -> list[float] | None:
    """The tau table a calibrated run stored in its config.yaml (None: none, or no readable file)."""
    if not path.is_file():
        return None
    try:
        table = (yaml.safe_load(path.read_text()) or {}).get("loss", {}).get("tau_table")
    except yaml.YAMLError:
        return None
    return [float(v) for v in table] if table else None


def trim_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep only the rows of a metrics JSONL log with `row["step"] <= step`, rewritten atomically.

    A run killed after its last checkpoint has logged steps that the resumed run logs again;
    without trimming, the log (and the curves drawn from it) would hold them twice. Lines that do
    not parse (a row cut short by the kill) are dropped too.

    Args:
        path: the log; nothing happens when it does not exist.
        step: the step the run resumes from.
    Returns:
        The number of rows dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += line.strip() != ""
    if dropped:
        atomic_write_bytes(path, "".join(x + "\n" for x in kept).encode())
        logger.info("%s: dropped %d row(s) logged after step %d", path, dropped, step)
    return dropped


def newest_intact(candidates: list[Path], latest: bool, load: Callable[[Path], dict[str, Any]]) -> tuple[int, int]:
    """Restore the first of `candidates` (newest first) that reads whole.

    Args:
        candidates: checkpoint folders, newest first.
        latest: True: a damaged one is reported and the next is tried; False (one named checkpoint):
            its error is raised.
        load: restores one checkpoint into the run's state and returns its state dict (with "step").
    Returns:
        (index of the restored checkpoint, its step).
    Raises:
        RunFolderError: the only (or the last) candidate is damaged.
        OSError: a read that failed for another reason ("cannot read now": I/O error, permissions, a
            network filesystem) is passed on as it is, never taken for damage.
    """
    for k, ckpt in enumerate(candidates):
        try:
            state = load(ckpt)
        except RunFolderError as e:
            if not latest or k == len(candidates) - 1:
                raise
            logger.warning("%s; resuming from the previous checkpoint %s instead", e, candidates[k + 1].name)
            continue
        return k, int(state["step"])
    raise RunFolderError("no checkpoint to resume from")


def drop_abandoned(out: Path, ckpt: Path, step: int, damaged: list[Path]) -> None:
    """After resuming at `step`: what a later continuation wrote goes, damaged checkpoints move aside.

    Checkpoints, validation grids and final tokens past `step` belong to a continuation being
    abandoned: kept, a later `--resume` could jump over the steps re-run from here, and the folder
    would mix two runs. Only the run's own folder `out` is touched.
    """
    root = out / "checkpoints"
    for bad in damaged:  # kept for inspection, out of every glob that finds checkpoints
        os.replace(bad, bad.with_name(f"damaged.{bad.name}"))
    if ckpt.resolve().parent == root.resolve():
        # by step number, not name: `ckpt` may be the hidden folder of an interrupted re-save
        for newer in (p for p in root.glob("step_*") if p.is_dir() and int(p.name[5:]) > step):
            logger.warning("removing %s: the run continues from %s", newer, ckpt.name)
            shutil.rmtree(newer, ignore_errors=True)
    for grid in (out / "validation").glob("step_*.png"):
        if int(grid.stem.split("_")[1]) > step:
            grid.unlink()
    for name in RUN_ARTEFACTS:  # the final tokens (every set): the run is not finished any more
        if name.startswith("tokens"):
            (out / name).unlink(missing_ok=True)


__all__ = ["RESUMABLE_FIELDS", "RUN_ARTEFACTS", "check_resumable", "claim_run_folder", "drop_abandoned",
           "newest_intact", "resume_config", "saved_run_config", "saved_tau_table", "trim_metrics"]
