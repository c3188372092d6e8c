"""`softrepa import-official` (the authors' .pth token files -> safetensors) and `softrepa info`."""

from __future__ import annotations

import argparse
import json

from ..artifact import PROVENANCE_KEYS, SETS_KEY, load_soft_tokens, provenance_of, read_metadata, token_sets_of
from ..official import FAMILIES, import_official
from .common import add_out_argument


def add_import_official_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True, choices=FAMILIES, help="model family of the tokens")
    p.add_argument("--dc-tokens", required=True, help="authors' dc_tokens.pth")
    p.add_argument("--dc-t-tokens", default=None, help="authors' dc_t_tokens.pth (pickled nn.Embedding), optional")
    p.add_argument("--layers", type=int, default=None, help="SD3: number of token layers (checked against the file)")
    p.add_argument("--blocks", default="down",
                   help="SD1.5/SDXL: comma-separated UNet block groups for the tokens, from down,mid,up "
                        "(default down: the authors' scripts, --apply_dc True False False; the paper's text "
                        "says down,mid)")
    p.add_argument("--model-dim", type=int, default=None,
                   help="SD3 block width when the file does not tell (default 1536, SD3-medium)")
    add_out_argument(p, help="output .safetensors")


def run_import_official(args: argparse.Namespace) -> int:
    path = import_official(args.family, args.dc_tokens, args.dc_t_tokens, args.out, layers=args.layers,
                           blocks=args.blocks, model_dim=args.model_dim)
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
