"""Sampling time of a stock pipeline with vs without attached soft tokens, same seeds.

    python benchmarks/sample_overhead.py                          # bundled miniature SD3 on CPU
    python benchmarks/sample_overhead.py --model DIR --size 1024 --steps 28 --dtype bf16   # GPU

Prints a markdown table; `--out FILE` also writes it. Also checks that detaching restores the
vanilla images exactly.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from report import emit

from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.pipeline import load_pipeline

ASSETS = Path(__file__).resolve().parents[1] / "src" / "softrepa" / "assets"


def run(pipe, prompts, args) -> tuple[float, np.ndarray]:
    dev = pipe.device
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.cfg, height=args.size, width=args.size,
               generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))], output_type="np")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out.images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ASSETS / "toy_sd3"))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pipe = load_pipeline(args.model, dtype, device)
    prompts = ["a red circle on the left", "a blue square above a yellow triangle"] * (args.batch // 2)
    depth = len(getattr(pipe, "transformer", pipe).transformer_blocks) if hasattr(pipe, "transformer") else 0
    cfg = SoftTokensConfig(num_layers=min(5, depth) if depth else 5)
    tokens = SoftTokens.for_model(pipe, cfg, seed=0)
    run(pipe, prompts[:2], args)  # warm-up
    base, tok = [], []
    for _ in range(args.repeats):
        t, vanilla = run(pipe, prompts, args)
        base.append(t)
        with attach(pipe, tokens):
            t, _ = run(pipe, prompts, args)
        tok.append(t)
    _, after = run(pipe, prompts, args)
    b, t = statistics.median(base), statistics.median(tok)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    lines = [f"model: {args.model}, {args.size} px, {args.steps} steps, CFG {args.cfg}, batch {len(prompts)}, "
             f"{args.dtype}, device: {name}; detach restores vanilla images exactly: {bool(np.array_equal(vanilla, after))}",
             "", "| pipeline call | median s | overhead % |", "|---|---|---|",
             f"| stock | {b:.3f} | +0.00 |", f"| with tokens | {t:.3f} | {100 * (t / b - 1):+.2f} |"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
