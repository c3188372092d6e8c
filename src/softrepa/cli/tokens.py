"""`softrepa import-official` (the authors' .pth token files -> safetensors) and `softrepa info`."""

from __future__ import annotations

import argparse
import json

from ..artifact import PROVENANCE_KEYS, SETS_KEY, load_soft_tokens, provenance_of, read_metadata, token_sets_of
from ..errors import UsageError
from ..official import FAMILIES, METHODS, OFFICIAL_BLOCKS, import_official
from .common import add_out_argument


def add_import_official_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True, choices=FAMILIES, help="model family of the tokens")
    p.add_argument("--method", choices=METHODS, default="softrepa",
                   help="whose files: softrepa (dc_tokens.pth, dc_t_tokens.pth; default) or agsm (soft_tokens.pth "
                        "with psi+ and psi-, soft_t_tokens.pth: one file with both sets)")
    p.add_argument("--dc-tokens", default=None, help="SoftREPA: the authors' dc_tokens.pth")
    p.add_argument("--dc-t-tokens", default=None, help="SoftREPA: dc_t_tokens.pth (pickled nn.Embedding), optional")
    p.add_argument("--soft-tokens", default=None, help="AGSM: the authors' soft_tokens.pth (psi+ and psi-)")
    p.add_argument("--soft-t-tokens", default=None, help="AGSM: soft_t_tokens.pth (pickled nn.Embedding), optional")
    p.add_argument("--layers", type=int, default=None, help="SD3: number of token layers (checked against the file)")
    p.add_argument("--blocks", default=None,
                   help="SD1.5/SDXL: comma-separated UNet block groups for the tokens, from down,mid,up "
                        "(default: the method's official code — SoftREPA down (its scripts pass --apply_dc True "
                        "False False; the paper's text says down,mid), AGSM down,mid)")
    p.add_argument("--model-dim", type=int, default=None,
                   help="SD3 block width when the file does not tell (default 1536, SD3-medium)")
    add_out_argument(p, help="output .safetensors")


def run_import_official(args: argparse.Namespace) -> int:
    main, time = ((args.dc_tokens, args.dc_t_tokens) if args.method == "softrepa"
                  else (args.soft_tokens, args.soft_t_tokens))
    flags = ("--dc-tokens", "--dc-t-tokens") if args.method == "softrepa" else ("--soft-tokens", "--soft-t-tokens")
    other = ("--soft-tokens", "--soft-t-tokens") if args.method == "softrepa" else ("--dc-tokens", "--dc-t-tokens")
    if main is None:
        raise UsageError(f"import-official --method {args.method} needs {flags[0]}")
    given = [f for f in other if getattr(args, f[2:].replace("-", "_")) is not None]
    if given:
        raise UsageError(f"{given[0]} belongs to the other method; --method {args.method} reads {' and '.join(flags)}")
    blocks = args.blocks if args.blocks is not None else OFFICIAL_BLOCKS[args.method]
    path = import_official(args.family, main, time, args.out, method=args.method, layers=args.layers,
                           blocks=blocks, model_dim=args.model_dim)
    print(f"wrote {path} (+ {path.with_suffix('.json').name})")
    return 0


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tokens", help="a softrepa .safetensors tokens file, a folder holding tokens.safetensors, or a "
                                  "Hub reference owner/name[@revision][:file.safetensors]")


def run_info(args: argparse.Namespace) -> int:
    tokens = load_soft_tokens(args.tokens)
    meta = read_metadata(args.tokens)
    sets = token_sets_of(args.tokens)
    print(json.dumps({"layout": tokens.layout.to_dict(),
                      "objective": meta.get("objective", "not recorded"),
                      "token_sets": sets,  # AGSM: ["positive", "negative"] = psi+ (main), psi-
                      "parameters": sum(p.numel() for p in tokens.parameters()) * len(sets),
                      "provenance": provenance_of(args.tokens) or "not recorded (an older or imported file)",
                      "metadata": {k: v for k, v in meta.items()
                                   if k not in ("softrepa_layout", SETS_KEY, "objective")
                                   and k not in PROVENANCE_KEYS}}, indent=2))
    return 0
