"""`softrepa train --config recipes/<recipe>.yaml [--resume [CKPT]] [--key value ...]`.

Everything is in the library: `softrepa.resume.resume_config` (the resume policy: a resumed run continues with
its saved config; a given config must train the same thing) and `softrepa.train.Trainer`.
"""

from __future__ import annotations

import argparse
import os

import yaml

from ..config import parse_overrides
from ..runlock import check_free
from ..resume import claim_run_folder, resume_config
from ..train import Trainer
from .common import add_progress_argument, check_data, check_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML recipe (sd3.yaml, sd15.yaml, sdxl.yaml, toy_sd3.yaml, ...)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the run's latest checkpoint, or from the given checkpoint folder; the run's "
                        "saved config.yaml is used when --config is not given (--out names the run)")
    p.add_argument("--out", "--output-dir", dest="out", default=None,
                   help="the run folder (the config field output_dir; --output_dir DIR works too)")
    p.add_argument("--overwrite", action="store_true",
                   help="the --out folder holds another run: delete that run's files first (never mixes two runs)")
    p.add_argument("--compile", action="store_true",
                   help="regional torch.compile of the denoiser's blocks (the config field compile: true)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_progress_argument(p)
    p.set_defaults(accepts_overrides=True, overrides=[])
    p.epilog = ("Any config field can be overridden as --key value, dotted for sections: --model DIR --data DIR "
                "--max_steps 100 --loss.tau 0.05 --tokens.num_tokens 8")


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    if args.out is not None:
        overrides["output_dir"] = args.out
    if args.compile:
        overrides["compile"] = True
    cfg = resume_config(args.resume, args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite deletes it: give one of them")
    # Rank 0 only (torchrun / accelerate set RANK): another rank could meet rank 0's own lock or the
    # config.yaml rank 0 has just written, and take this run for another; rank 0 checks again under the lock.
    if int(os.environ.get("RANK", "0")) == 0:
        check_free(cfg.output_dir)  # another process training here: say so (pid, host) before anything else
        if not args.overwrite:  # refuse in a second, before anything loads (--overwrite deletes under the lock)
            claim_run_folder(cfg.output_dir, args.resume)
    if cfg.data and isinstance(cfg.data, str):
        check_data(cfg.data)  # before the model loads
    if cfg.model:
        check_model(cfg.model)
    final = Trainer(cfg, progress=not args.no_progress).train(resume=args.resume, overwrite=args.overwrite)
    print(f"tokens: {final}")
    return 0


__all__ = ["add_arguments", "run"]
