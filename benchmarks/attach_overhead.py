"""Forward time of an MM-DiT with vs without attached soft tokens (random weights).

    python benchmarks/attach_overhead.py                 # reduced SD3 config on CPU
    python benchmarks/attach_overhead.py --full --dtype bf16   # SD3-medium config (GPU)
    python benchmarks/attach_overhead.py --compile        # + compiled rows (softrepa.compile_blocks)

Prints a markdown table; `--out FILE` also writes it. The overhead of the tokens themselves is
m extra text positions in L of the blocks (4 + 333 tokens at 1024 px with T5 256 -> ~1%),
plus the hook bookkeeping. One forward is one sampling step (batch 2 = one prompt with CFG), so
`--compile` gives the sampling comparison: stock / tokens x eager / compiled, alternated in one
process (the compile time is the first compiled call's excess over the median).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from report import emit

from softrepa import SoftTokens, SoftTokensConfig, attach, compile_blocks

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
REDUCED = dict(SD3_MEDIUM, num_layers=8, num_attention_heads=6, caption_projection_dim=384,
               joint_attention_dim=1024, pooled_projection_dim=512)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(model, inputs, device, warmup: int, iters: int) -> list[float]:
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            _sync(device)
            t0 = time.perf_counter()
            model(**inputs)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="SD3-medium config (default: reduced)")
    ap.add_argument("--resolution", type=int, default=None, help="image px (default 1024 full / 256 reduced)")
    ap.add_argument("--batch", type=int, default=2, help="batch (2 = one prompt with CFG)")
    ap.add_argument("--text-len", type=int, default=333, help="text tokens (77 CLIP + 256 T5)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true", help="also the compiled stock / tokens forwards")
    args = ap.parse_args()

    from diffusers import SD3Transformer2DModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = SD3_MEDIUM if args.full else REDUCED
    res = args.resolution or (1024 if args.full else 256)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute for 2B params on CPU
        model = SD3Transformer2DModel(**cfg)
    model = model.to(dtype).eval().requires_grad_(False)
    lat = res // 8
    inputs = dict(
        hidden_states=torch.randn(args.batch, 16, lat, lat, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(args.batch, args.text_len, cfg["joint_attention_dim"], device=device, dtype=dtype),
        pooled_projections=torch.randn(args.batch, cfg["pooled_projection_dim"], device=device, dtype=dtype),
        timestep=torch.full((args.batch,), 500.0, device=device),
    )
    tokens = SoftTokens.for_model(model, SoftTokensConfig())  # paper default: m=4, L=5, time buckets
    rows = []
    # interleave to cancel drift (thermal, other load)
    base_t, tok_t, cbase_t, ctok_t, first = [], [], [], [], {}
    for rep in range(2):
        base_t += time_forward(model, inputs, device, args.warmup, args.iters)
        with attach(model, tokens):
            tok_t += time_forward(model, inputs, device, args.warmup, args.iters)
        if args.compile:
            with compile_blocks(model):  # dynamo's cache outlives the context: the second round reuses it
                t0 = time.perf_counter()
                cbase_t += time_forward(model, inputs, device, args.warmup, args.iters)
                first.setdefault("stock", time.perf_counter() - t0)
                with attach(model, tokens):
                    t0 = time.perf_counter()
                    ctok_t += time_forward(model, inputs, device, args.warmup, args.iters)
                    first.setdefault("tokens", time.perf_counter() - t0)
    b, t = statistics.median(base_t), statistics.median(tok_t)
    rows.append(("stock", b, 0.0, ""))
    rows.append(("with tokens (m=4, L=5)", t, 100.0 * (t / b - 1), ""))
    if args.compile:
        n = args.warmup + args.iters
        cb, ct = statistics.median(cbase_t), statistics.median(ctok_t)
        rows.append(("stock, compiled", cb, 100.0 * (cb / b - 1), f"{b / cb:.2f}x; compile {first['stock'] - n * cb:.0f} s"))
        rows.append(("with tokens, compiled", ct, 100.0 * (ct / b - 1),
                     f"{t / ct:.2f}x vs tokens eager; compile {first['tokens'] - n * ct:.0f} s"))
    dev_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"config: {'SD3-medium' if args.full else 'reduced SD3 (8 blocks, width 384)'}, random weights, "
        f"{res} px, batch {args.batch}, text {args.text_len}, {args.dtype}, device: {dev_name}",
        "",
        "| forward | median ms | vs stock eager % | compiled speed-up |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {sec * 1e3:.1f} | {ov:+.2f} | {note} |" for name, sec, ov, note in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
