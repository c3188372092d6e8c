"""`softrepa ui`: a local web page, vanilla vs soft tokens side by side, for generation and FlowEdit.

    softrepa ui                                   # the bundled SD3 miniature with the demo's tokens
    softrepa ui --model DIR --tokens sd3.safetensors --port 7860

Serves on http://127.0.0.1:7860 until Ctrl-C; `--host 0.0.0.0` exposes it to the network (anyone
who reaches it can load models from this machine's folders). Needs `pip install 'softrepa[ui]'`.
"""

from __future__ import annotations

import argparse
import time

from ..errors import MissingDependencyError, UsageError
from .common import add_dtype_argument, add_uncond_argument, text_length_help

# the defaults are spelled here rather than imported: `softrepa --help` must not import the page
DEFAULT_MODEL = "@assets/toy_sd3"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="diffusers pipeline: hub id, local folder or @assets/toy_sd3 (default: the bundled SD3 miniature)")
    p.add_argument("--tokens", default=None,
                   help="soft tokens: a .safetensors file, a run folder or a Hub id owner/name (default: the demo's "
                        "tokens for the bundled miniature; another "
                        "miniature trains --train-steps steps on start; other models need this)")
    add_uncond_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add_dtype_argument(p)
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help=text_length_help("a miniature's recipe length, else the family's own"))
    p.add_argument("--metrics-config", default=None,
                   help="metrics.yaml whose lpips section names LPIPS' weights (without them the page says so)")
    p.add_argument("--train-steps", type=int, default=30,
                   help="steps of the quick training when a miniature has no tokens (default 30)")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()  # the startup time printed includes importing gradio and torch
    try:
        from ..ui.app import serve
    except ImportError as e:
        if getattr(e, "name", "") and e.name.split(".")[0] == "gradio":
            raise MissingDependencyError("softrepa ui needs gradio: pip install 'softrepa[ui]'") from e
        raise
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.train_steps < 1:
        raise UsageError(f"--train-steps must be >= 1, got {args.train_steps}")
    serve(args.model, args.tokens, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          max_sequence_length=args.max_sequence_length, metrics_config=args.metrics_config,
          train_steps=args.train_steps, started=started, uncond_tokens=args.uncond_tokens)
    return 0


__all__ = ["add_arguments", "run"]
