"""Options shared by the subcommands: one spelling per concept, the old spellings as hidden aliases.

* `--out` (aliases `--output-dir`, `--output_dir`): the output folder of every command.
* `--dtype`: fp32 / fp16 / bf16 (aliases float32 / float16 / bfloat16).
* `--no-progress`: no progress bars (ours and the libraries' "Loading ..." bars).
* `--model`, `--tokens`, `--device`, `--max-sequence-length`: the same meaning everywhere
  (`--tokens` also takes a run folder or a Hub repo id, `softrepa.hub`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16", "float": "fp32"}


def dtype_name(value: str) -> str:
    """argparse type: a dtype spelling -> its short name (fp32 / fp16 / bf16)."""
    key = DTYPE_ALIASES.get(value.lower(), value.lower())
    if key not in DTYPES:
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
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="text length of families that take one (SD3: T5 tokens, default 256, the authors "
                        "trained with 512; FLUX, Qwen-Image: their pipeline's default)")
    p.add_argument("--compile", action="store_true",
                   help="regional torch.compile of the denoiser's repeated blocks (the first call compiles)")


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-offload", action="store_true", help="model CPU offload (accelerate): lower GPU memory, slower")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    p.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")


def device_and_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    return device, dtype


def quiet_libraries(args: argparse.Namespace) -> None:
    """With --no-progress, also silence diffusers' / transformers' loading bars."""
    if getattr(args, "no_progress", False):
        import diffusers.utils.logging as dlog  # here: importing diffusers costs seconds, --help must not
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()


def check_model(model: str) -> None:
    """Fail in milliseconds, before anything heavy loads, on a local model folder that is not one."""
    from ..pipeline import resolve_model_path

    path = resolve_model_path(model)
    looks_local = Path(path).exists() or path.startswith((".", "/", "~")) or re.search(r"[\\/].*[\\/]", path)
    if looks_local and not (Path(path).expanduser() / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {model}: no diffusers pipeline there (no model_index.json)")


def check_data(data: str, option: str = "--data") -> None:
    """A local dataset path must exist, shard patterns must match (checked before the model loads);
    Hub dataset ids pass (`softrepa.data.check_data_spec`)."""
    from ..data import check_data_spec

    check_data_spec(data, option)


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the pipeline named by the options and attach `--tokens`.

    Returns:
        (pipeline, attach handle or None).
    Raises:
        FileNotFoundError: the model cannot be loaded; SoftTokensError: tokens that do not fit.
    """
    from ..artifact import load_into, load_soft_tokens
    from ..compilation import compile_blocks
    from ..pipeline import load_pipeline

    device, dtype = device_and_dtype(args)
    if getattr(args, "cpu_offload", False) and not device.startswith("cuda"):
        raise ValueError("--cpu-offload needs a CUDA --device")
    check_model(args.model)
    if args.tokens:
        load_soft_tokens(args.tokens)  # a bad tokens file fails before the (slow) model load
    quiet_libraries(args)
    # with offload the weights stay on the CPU and accelerate moves each model in when it runs
    offload = getattr(args, "cpu_offload", False)
    pipe = load_pipeline(args.model, dtype, "cpu" if offload else device)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    if getattr(args, "vae_tiling", False):
        pipe.vae.enable_tiling()
    if getattr(args, "vae_slicing", False):
        pipe.vae.enable_slicing()
    handle = load_into(pipe, args.tokens) if args.tokens else None
    if getattr(args, "compile", False):
        compile_blocks(pipe)
    return pipe, handle


__all__ = ["DTYPES", "add_dtype_argument", "add_model_arguments", "add_offload_arguments", "add_out_argument",
           "add_progress_argument", "check_data", "check_model", "device_and_dtype", "dtype_name", "load_model",
           "quiet_libraries"]
