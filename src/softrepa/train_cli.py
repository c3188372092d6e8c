"""`softrepa train --config configs/<recipe>.yaml [--resume [CKPT]] [--key value ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML recipe (configs/sd3.yaml, sd15.yaml, sdxl.yaml, toy_sd3.yaml)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the run's latest checkpoint, or from the given checkpoint folder; the run's "
                        "saved config.yaml is used when --config is not given (--output_dir names the run)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(accepts_overrides=True, overrides=[])
    p.epilog = ("Any config field can be overridden as --key value, dotted for sections: --model DIR --data DIR "
                "--max_steps 100 --loss.tau 0.05 --tokens.num_tokens 8")


#: what may change when a run is resumed: its length, logging and validation, not what it learns
RESUMABLE_FIELDS = ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "log_with",
                    "validation", "output_dir")


def _saved_config(args: argparse.Namespace, overrides: dict) -> Path | None:
    """The config.yaml of the run being resumed (checkpoint folder first, then the run folder)."""
    from .config import ConfigError, load_config

    if args.resume != "latest":
        ckpt = Path(args.resume)
        for cand in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
            if cand.is_file():
                return cand
        return None
    out = overrides.get("output_dir")
    if out is None and args.config is not None:
        out = load_config(args.config, overrides).output_dir
    if out is None:
        raise ConfigError("--resume needs the run's folder: give --output_dir DIR (or the --config it was started with)")
    saved = Path(out) / "config.yaml"
    return saved if saved.is_file() else None


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from .config import ConfigError, config_diff, config_dict, load_config, parse_overrides
    from .train import Trainer

    overrides = parse_overrides(args.overrides)
    saved = _saved_config(args, overrides) if args.resume else None
    if saved is not None and args.config is None:
        cfg = load_config(str(saved), overrides)  # continue the run as it was configured
    else:
        cfg = load_config(args.config, overrides)
    if saved is not None:
        old = yaml.safe_load(saved.read_text())
        table = (old.get("loss") or {}).get("tau_table")
        if cfg.loss.tau_schedule == "calibrated" and cfg.loss.tau_table is None and table:
            cfg.loss.tau_table = [float(v) for v in table]  # estimated by the run itself: keep it
        changed = [d for d in config_diff(old, config_dict(cfg))
                   if d.split(":")[0].split(".")[0] not in RESUMABLE_FIELDS]
        if changed:
            raise ConfigError(
                f"--resume: this config differs from the run's {saved} in what it trains ({'; '.join(changed[:6])}). "
                "Resume without --config (the saved config is used) or with the same settings; only "
                f"{', '.join(RESUMABLE_FIELDS)} may change.")
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    final = Trainer(cfg).train(resume=args.resume)
    print(f"tokens: {final}")
    return 0
