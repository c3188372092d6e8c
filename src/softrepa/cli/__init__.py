"""The `softrepa` command line (argparse only; everything it does is in the Python API)."""

from .main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
