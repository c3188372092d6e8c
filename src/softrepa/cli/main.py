"""`softrepa` command line: train | generate | edit | evaluate | compare | diagnose | toy | demo | import-official | info | push | ui.

Argparse only: each subcommand module has `add_arguments(parser)` and `run(args) -> int`, which
parses, calls one library function and prints; this file holds the explicit command table and the
one error policy (`softrepa.errors`):

* `SoftrepaError` (every error softrepa raises on purpose: bad option values included) and `OSError`
  (missing files, permissions, full disks): one line `softrepa <cmd>: error: <message>` on stderr,
  exit code 2. `--traceback` (before or after the subcommand; `-v` too) prints the traceback first.
* Ctrl-C: `softrepa <cmd>: interrupted`, exit code 130.
* Anything else, a bare `ValueError` or `RuntimeError` included, is a bug: its traceback, then
  `softrepa <cmd>: internal error — please report it (with the traceback above)`, exit code 1.
  Nothing here catches `ValueError` wholesale: a real bug never shrinks to one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Callable, NamedTuple

from .._version import __version__
from ..checks import check_out_folder
from ..errors import SoftrepaError, interrupt_state
from ..toy import cli as toy_cli
from ..toy import demo as toy_demo
from . import diagnose, edit, evaluate, generate, push, tokens, train, ui


class Command(NamedTuple):
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str


#: name -> command, in the order `softrepa --help` lists them
COMMANDS: dict[str, Command] = {
    "train": Command(train.add_arguments, train.run, "train soft tokens with the contrastive denoising-score loss"),
    "generate": Command(generate.add_arguments, generate.run, "generate images with (and without) soft tokens"),
    "edit": Command(edit.add_arguments, edit.run, "FlowEdit text-guided image editing with soft tokens"),
    "evaluate": Command(evaluate.add_evaluate_arguments, evaluate.run_evaluate,
                        "score generated / edited images (ImageReward, PickScore, CLIP, HPS, FID, LPIPS, world)"),
    "compare": Command(evaluate.add_compare_arguments, evaluate.run_compare,
                       "compare evaluated runs: table with deltas, bar chart, CFG-sweep curves"),
    "diagnose": Command(diagnose.add_arguments, diagnose.run,
                        "loss-regime diagnosis per timestep: errors, logits, gradient shares, calibrated tau"),
    "toy": Command(toy_cli.add_toy_arguments, toy_cli.run_toy, "the miniature world: pretrain the bundled tiny pipelines"),
    "demo": Command(toy_demo.add_demo_arguments, toy_demo.run_demo,
                    "offline miniature demo: train tokens, generate held-out prompts, judge"),
    "import-official": Command(tokens.add_import_official_arguments, tokens.run_import_official,
                               "convert the paper authors' released .pth token files"),
    "info": Command(tokens.add_info_arguments, tokens.run_info, "print the layout of a softrepa tokens file"),
    "push": Command(push.add_arguments, push.run, "upload tokens, config and a model card to the Hugging Face Hub"),
    "ui": Command(ui.add_arguments, ui.run, "local web page: vanilla vs tokens side by side, generation and FlowEdit"),
}


TRACEBACK_HELP = "print the traceback of an error too (errors are one line otherwise)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softrepa", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"softrepa {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and --traceback)")
    parser.add_argument("--traceback", action="store_true", help=TRACEBACK_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        # also after the subcommand; its own dest, so that it never resets the global flag
        p.add_argument("--traceback", dest="traceback_here", action="store_true", default=argparse.SUPPRESS,
                       help=TRACEBACK_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    interrupt_state["running"] = True  # Ctrl-C is a KeyboardInterrupt again, reported below
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    show_traceback = args.traceback or args.verbose or getattr(args, "traceback_here", False)
    try:
        if getattr(args, "out", None) and args.command != "import-official":  # its --out is a file
            check_out_folder(args.out)  # an --out that is a file: one clear line, not [Errno 17]
        return int(COMMANDS[args.command].run(args) or 0)
    except (SoftrepaError, OSError) as e:  # OSError: missing files, permissions, full disks
        if show_traceback:
            traceback.print_exc()
        print(f"softrepa {args.command}: error: {str(e) or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"softrepa {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:  # host memory: a resource the user sizes, not a bug
        print(f"softrepa {args.command}: error: out of memory ({str(e) or 'host'}): lower the batch size or "
              "image size, or use --dtype bf16", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: never one line, always the traceback
        if type(e).__name__ == "OutOfMemoryError":  # torch's CUDA out-of-memory (a RuntimeError)
            print(f"softrepa {args.command}: error: out of GPU memory: lower the batch size, pair_chunk or image "
                  "size, use --dtype bf16, gradient checkpointing or --cpu-offload", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"softrepa {args.command}: internal error — please report it (with the traceback above)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
