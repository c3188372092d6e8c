"""Where the time of a contrastive pair step goes: the denoiser's parts vs the backward (random weights).

    python benchmarks/pair_step_profile.py                 # reduced SD3 config, B = 4 (16 pairs), CPU
    python benchmarks/pair_step_profile.py --full --batch 4 --dtype bf16   # SD3-medium (GPU)

Times each top-level part of the denoiser with forward hooks over the all-pairs step (median of
`--iters` steps after one warm-up) and prints a table; it answers "is there avoidable work outside
the blocks?" (the context embedder runs once per pair, the patch embedding once per pair, ...).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from attach_overhead import REDUCED, SD3_MEDIUM  # noqa: E402
from report import emit  # noqa: E402

PARTS = ("pos_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from diffusers import SD3Transformer2DModel

    from softrepa import SoftTokens, SoftTokensConfig, attach
    from softrepa.backbone import TextCond
    from softrepa.families.sd3 import SD3Backbone
    from softrepa.pairs import PairBatch, contrastive_backward

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = SD3_MEDIUM if args.full else REDUCED
    res = args.resolution or (512 if args.full else 128)
    torch.manual_seed(0)
    with torch.device(device):
        model = SD3Transformer2DModel(**cfg)
    model = model.to(dtype).eval().requires_grad_(False)

    class _Pipe:
        transformer, vae = model, None

    bb = SD3Backbone(_Pipe())
    attach(model, SoftTokens.for_model(model, SoftTokensConfig()).to(device))
    B, lat = args.batch, res // 8
    g = torch.Generator().manual_seed(0)
    cond = TextCond(torch.randn(B, 77 + args.text_len, cfg["joint_attention_dim"], generator=g).to(device, dtype),
                    torch.randn(B, cfg["pooled_projection_dim"], generator=g).to(device, dtype))
    batch = PairBatch(torch.randn(B, 16, lat, lat, generator=g).to(device, dtype), cond, [f"c{i}" for i in range(B)],
                      torch.full((B,), 500.0, device=device), torch.randn(1, 16, lat, lat, generator=g).to(device, dtype))
    spent: dict[str, float] = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(name, module):
        def pre(*_):
            sync()
            spent[name] = spent.get(name, 0.0) - time.perf_counter()

        def post(*_):
            sync()
            spent[name] += time.perf_counter()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for name in PARTS:
        timed(name, getattr(model, name))
    for block in model.transformer_blocks:
        timed("transformer blocks", block)
    timed("denoiser forward", model)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    rows: dict[str, list[float]] = {}
    for i in range(1 + args.iters):
        spent.clear()
        sync()
        t0 = time.perf_counter()
        with autocast:
            contrastive_backward(bb, batch)
        sync()
        spent["whole step"] = time.perf_counter() - t0
        if i:
            for k, v in spent.items():
                rows.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in rows.items()}
    fwd = med["denoiser forward"]
    med["backward and the rest"] = med["whole step"] - fwd
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"config: {'SD3-medium' if args.full else 'reduced SD3 (8 blocks, width 384)'}, {res} px, "
             f"T5 {args.text_len}, B = {B} ({B * B} pairs in one pass), {args.dtype}, tokens m=4 L=5, device: {dev}; "
             f"median of {args.iters} steps", "", "| part | ms per step | % of the step |", "|---|---|---|"]
    order = ["whole step", "denoiser forward", "transformer blocks", *PARTS, "backward and the rest"]
    lines += [f"| {k} | {med[k] * 1e3:.1f} | {100 * med[k] / med['whole step']:.1f} |" for k in order]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
