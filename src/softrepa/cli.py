"""`softrepa` command line: train | generate | edit | evaluate | diagnose | demo | import-official | info.

Each subcommand lives in its own module and registers itself here through `COMMANDS`; this file
only parses arguments and turns library errors into one clear line and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

# name -> (module, help). The module exposes `add_<name>_arguments(parser)` and `run_<name>(args) -> int`
# (dashes in <name> become underscores).
COMMANDS: dict[str, tuple[str, str]] = {
    "import-official": ("softrepa.cli_import", "convert the paper authors' released .pth token files"),
    "info": ("softrepa.cli_import", "print the layout of a softrepa tokens file"),
    "train": ("softrepa.train_cli", "train soft tokens with the contrastive denoising-score loss"),
    "generate": ("softrepa.generate_cli", "generate images with (and without) soft tokens"),
    "edit": ("softrepa.edit_cli", "FlowEdit text-guided image editing with soft tokens"),
    "evaluate": ("softrepa.evaluate_cli", "score generated / edited images (ImageReward, PickScore, CLIP, HPS, FID, LPIPS, world)"),
    "compare": ("softrepa.evaluate_cli", "compare evaluated runs: table with deltas, bar chart, CFG-sweep curves"),
    "diagnose": ("softrepa.diagnose_cli", "loss-regime diagnosis per timestep: errors, logits, gradient shares, calibrated tau"),
    "toy": ("softrepa.toy.cli", "the miniature world: pretrain the bundled tiny pipelines"),
    "demo": ("softrepa.toy.demo", "offline miniature demo: train tokens, generate held-out prompts, judge"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(prog="softrepa", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    runners: dict[str, Callable] = {}
    for name, (mod_name, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:  # a real missing dependency: report it, do not hide it
                raise
            continue  # subcommand not part of this build
        p = sub.add_parser(name, help=help_, description=help_)
        key = name.replace("-", "_")
        getattr(mod, f"add_{key}_arguments")(p)
        runners[name] = getattr(mod, f"run_{key}")
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    parser, runners = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from .tokens import SoftTokensError
    from .train import TrainingDiverged

    try:
        return int(runners[args.command](args) or 0)
    except (SoftTokensError, FileNotFoundError, ValueError, TrainingDiverged) as e:
        print(f"softrepa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"softrepa {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
