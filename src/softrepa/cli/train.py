"""`softrepa train --config recipes/<recipe>.yaml [--resume [CKPT]] [--key value ...]`.

Everything is in the library: `softrepa.resume.resume_config` (the resume policy: a resumed run continues with
its saved config; a given config must train the same thing) and `softrepa.train.run_training` (the run
folder's claim, the early path checks, the training).
"""

from __future__ import annotations

import argparse

import yaml

from ..config import parse_overrides
from ..resume import resume_config
from ..train import run_training
from .common import add_progress_argument


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
                "--max_steps 100 --loss.tau 0.05 --tokens.num_tokens 8 --objective positive_only")


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
    final = run_training(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"tokens: {final}")
    return 0


__all__ = ["add_arguments", "run"]
