"""Options shared by the subcommands: one spelling per concept, the old spellings as hidden aliases.

* `--out` (aliases `--output-dir`, `--output_dir`): the output folder of every command.
* `--dtype`: fp32 / fp16 / bf16 (aliases float32 / float16 / bfloat16).
* `--no-progress`: no progress bars (ours and the libraries' "Loading ..." bars).
* `--model`, `--tokens`, `--device`, `--max-sequence-length`: the same meaning everywhere
  (`--tokens` also takes a run folder or a Hub repo id, `softrepa.hub`).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..checks import check_sampling_args
from ..loading import DTYPES, check_model, dtype_key
from ..loading import load_model as _load_model


def dtype_name(value: str) -> str:
    """argparse type: a dtype spelling -> its short name (fp32 / fp16 / bf16)."""
    key = dtype_key(value)
    if key is None:
        raise argparse.ArgumentTypeError(f"expected one of fp32, fp16, bf16 (or float32, float16, bfloat16), got {value!r}")
    return key


def add_out_argument(p: argparse.ArgumentParser, *, required: bool = True, default: str | None = None,
                     help: str = "output folder") -> None:
    p.add_argument("--out", "--output-dir", "--output_dir", dest="out", required=required, default=default, help=help)


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_dtype_argument(p: argparse.ArgumentParser, *,
                       help: str = "weights dtype (default: fp16 on CUDA, fp32 on CPU)") -> None:
    p.add_argument("--dtype", type=dtype_name, default=None, metavar="{fp32,fp16,bf16}", help=help)


def add_model_arguments(p: argparse.ArgumentParser, *, tokens_help: str | None = None) -> None:
    """Model-loading options shared by generate, edit and diagnose."""
    p.add_argument("--model", required=True, help="diffusers pipeline: hub id, local folder or @assets/toy_sd3")
    p.add_argument("--tokens", default=None, help=tokens_help or "soft tokens: a .safetensors file, a run folder, or a Hub "
                                                "repo owner/name[@revision][:file.safetensors] (omit for the "
                                                "vanilla model)")
    add_dtype_argument(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--max-sequence-length", type=int, default=None, help=text_length_help())
    p.add_argument("--compile", action="store_true",
                   help="regional torch.compile of the denoiser's repeated blocks (the first call compiles)")


def add_uncond_argument(p: argparse.ArgumentParser) -> None:
    from ..branches import UNCOND_CHOICES

    p.add_argument("--uncond-tokens", choices=UNCOND_CHOICES, default="positive",
                   help="what the unconditional CFG branch carries: positive (the tokens, on both branches; "
                        "default), negative (an AGSM file's psi-: the official --uncon2neg), none (the vanilla "
                        "model there)")


def text_length_help(default: str = "the family's own") -> str:
    """Help of `--max-sequence-length`, naming the registered families' own text lengths."""
    from ..registry import family_names, get_family

    lengths = ", ".join(f"{f.title} {f.text_length}" for f in map(get_family, family_names()) if f.text_length)
    return (f"text length (prompt tokens) of families that take one (default: {default}, the length train, "
            f"generate, edit, diagnose and ui share: {lengths})")


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-offload", action="store_true", help="model CPU offload (accelerate): lower GPU memory, slower")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    p.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")


def check_data(data: str, option: str = "--data") -> None:
    """A local dataset path must exist, shard patterns must match (checked before the model loads);
    Hub dataset ids pass (`softrepa.data.check_data_spec`)."""
    from ..data import check_data_spec

    check_data_spec(data, option)


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """`softrepa.load_model` with the options of `add_model_arguments` / `add_offload_arguments`.

    Returns:
        (pipeline, attach handle or None).
    """
    check_sampling_args(args)  # device, text length, steps, CFG: one line before the model loads
    return _load_model(args.model, tokens=args.tokens, device=args.device, dtype=args.dtype,
                       cpu_offload=getattr(args, "cpu_offload", False), compile=getattr(args, "compile", False),
                       vae_tiling=getattr(args, "vae_tiling", False), vae_slicing=getattr(args, "vae_slicing", False),
                       progress=not getattr(args, "no_progress", False),
                       uncond_tokens=getattr(args, "uncond_tokens", "positive"))


__all__ = ["DTYPES", "add_dtype_argument", "add_model_arguments", "add_offload_arguments", "add_out_argument",
           "add_progress_argument", "add_uncond_argument", "check_data", "check_model", "dtype_name", "load_model", "text_length_help"]
