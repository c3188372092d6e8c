"""Training step of AGSM vs SoftREPA, side by side in one process (random weights).

    python benchmarks/objective_step.py                          # reduced SD3 config, CPU
    python benchmarks/objective_step.py --full --dtype bf16 --batch 4 --chunk 16   # SD3-medium, GPU

Both arms run `softrepa.pairs.objective_backward` on the same batch, alternating step by step
(medians over `--iters` steps after `--warmup` rounds): SoftREPA (one token set, errors only) and
AGSM (psi+ on the matching pairs, psi- on the others, and one extra no-gradient pass per pair with
the EMA copies for the reward and guidance; the trainer's EMA update is timed too). Prints a markdown
table; `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from attach_overhead import REDUCED, SD3_MEDIUM  # noqa: E402
from report import emit  # noqa: E402
from train_step import random_step_inputs  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> list[str]:
    from softrepa import SoftTokens, SoftTokensConfig, attach
    from softrepa.objectives import AGSM, SoftREPA
    from softrepa.pairs import objective_backward

    cfg = SD3_MEDIUM if args.full else REDUCED
    device, dtype, model, bb, batch = random_step_inputs(args, cfg)
    pos = SoftTokens.for_model(model, SoftTokensConfig()).to(device)
    neg = copy.deepcopy(pos)
    neg.time = pos.time  # one shared time part, as the trainer's AGSM sets
    sets = {"positive": pos, "negative": neg}
    ema = copy.deepcopy(sets)
    handle = attach(model, pos)

    def use_set(name: str, reference: bool):
        return handle.carrying((ema if reference else sets)[name])

    B = args.batch
    chunk = None if args.chunk == "none" else int(args.chunk)
    params = {id(p): p for s in sets.values() for p in s.parameters()}
    ema_params = {id(p): p for s in ema.values() for p in s.parameters()}
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else torch.autocast(device.type, enabled=False))
    arms = {"SoftREPA": (SoftREPA(tau=0.07, scale=4.0), None), "AGSM": (AGSM(tau=0.1, gamma_neg=0.1), use_set)}

    def step(name: str) -> float:
        objective, sets_fn = arms[name]
        for p in params.values():
            p.grad = None
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            objective_backward(bb, batch, objective, pair_chunk=chunk, use_set=sets_fn)
        if name == "AGSM":  # the trainer's EMA update after the optimizer step
            with torch.no_grad():
                for e, o in zip(ema_params.values(), params.values()):
                    e.mul_(0.9999).add_(o, alpha=1e-4)
        _sync(device)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in arms}
    for r in range(args.warmup + args.iters):
        for name in arms:
            dt = step(name)
            print(f"round {r} {name}: {dt:.3f} s", file=sys.stderr, flush=True)
            if r >= args.warmup:
                times[name].append(dt)
    med = {n: statistics.median(v) for n, v in times.items()}
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else \
        f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    lines = [f"config: {'SD3-medium' if args.full else 'reduced SD3 (8 blocks, width 384)'}, random weights, "
             f"{args.resolution} px, T5 {args.text_len}, {args.dtype}, B = {B} ({B * B} pairs), pairs per "
             f"forward {args.chunk}, tokens m=4 L=5 with time buckets, device: {dev}; one process, arms "
             f"alternated step by step, median of {args.iters} steps after {args.warmup} warm-up round(s)", "",
             "| objective | step s | pairs/s | vs SoftREPA |", "|---|---|---|---|"]
    for name in arms:
        lines.append(f"| {name} | {med[name]:.3f} | {B * B / med[name]:.1f} | {med[name] / med['SoftREPA']:.2f}x |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="SD3-medium config (default: reduced, 8 blocks, width 384)")
    ap.add_argument("--resolution", type=int, default=None, help="training px (default 512 full / 128 reduced)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=256, help="T5 length (+77 CLIP tokens)")
    ap.add_argument("--chunk", default="none", help="'none' = all pairs at once, or pairs per forward")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.resolution = args.resolution or (512 if args.full else 128)
    emit(run(args), args.out)


if __name__ == "__main__":
    main()
