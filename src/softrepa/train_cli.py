"""`softrepa train --config configs/<recipe>.yaml [--resume [CKPT]] [--key value ...]`."""

from __future__ import annotations

import argparse


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML recipe (configs/sd3.yaml, sd15.yaml, sdxl.yaml, toy_sd3.yaml)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the run's latest checkpoint, or from the given checkpoint folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(accepts_overrides=True, overrides=[])
    p.epilog = ("Any config field can be overridden as --key value, dotted for sections: --model DIR --data DIR "
                "--max_steps 100 --loss.tau 0.05 --tokens.num_tokens 8")


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from .config import load_config, parse_overrides
    from .train import Trainer

    cfg = load_config(args.config, parse_overrides(args.overrides))
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    final = Trainer(cfg).train(resume=args.resume)
    print(f"tokens: {final}")
    return 0
