"""Contrastive training step: pairs/s and peak memory, all-pairs vs chunked (random weights).

    python benchmarks/train_step.py                    # reduced SD3 config on CPU
    python benchmarks/train_step.py --full --dtype bf16 --batch 4 8 16 --text-len 256 512 --chunk none 32
    python benchmarks/train_step.py --side-by-side --batch 4 --chunk none 8   # floor / eager / compiled
    python benchmarks/train_step.py --full --dtype bf16 --side-by-side --batch 4 --chunk none \
        --attention cudnn flash --fp8                     # + compiled arms with each speed option (issue 25)

`--side-by-side` runs, in ONE process and alternating step by step, the floor (the same all-pairs
forward + backward with the tokens disabled, gradients flowing to the text embeddings instead: the
plain layout without any token plumbing), softrepa eager and softrepa compiled
(`softrepa.compile_blocks`) for each pair chunk; it prints medians, the ratios compiled / eager and
eager / floor, and the compile time (first compiled step minus the median compiled step).
`--attention B [B ...]` adds, per chunk, a compiled arm with each SDPA backend (not "auto"), and
`--fp8` one with float8 linear layers (`softrepa.speedups`) for each `--attention` value, auto
included: the combinations the speed options make. An option the device lacks is skipped with the
reason printed (the trainer's own `check_speed`); `benchmarks/speed_precision.py` says which pass.

"all pairs" evaluates the B x B pairs in one forward + backward, the layout of the authors'
trainer; "chunk K" is the exact two-pass scheme with K pairs per forward (softrepa.pairs). Each
configuration runs in its own subprocess so that its peak memory (CUDA: max_memory_allocated;
CPU: peak RSS) is its own. Prints a markdown table; `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from attach_overhead import REDUCED, SD3_MEDIUM  # noqa: E402
from report import emit  # noqa: E402
from speed_precision import TINY  # noqa: E402

from softrepa.errors import SoftrepaError  # noqa: E402
from softrepa.speedups import ATTENTION_BACKENDS  # noqa: E402


def _config(args: argparse.Namespace) -> dict:
    return SD3_MEDIUM if args.full else TINY if args.tiny else REDUCED


def _name(args: argparse.Namespace) -> str:
    return "SD3-medium" if args.full else "tiny SD3 (2 blocks, width 32)" if args.tiny else "reduced SD3 (8 blocks, width 384)"


def random_step_inputs(args: argparse.Namespace, cfg: dict) -> tuple:
    """(device, dtype, model, backbone, batch): a random-weight SD3 transformer of config `cfg` (frozen,
    on the GPU when there is one) and a random batch of `args.batch` images and captions at
    `args.resolution` px with T5 length `args.text_len`; shared by this script and objective_step.py."""
    from diffusers import SD3Transformer2DModel

    from softrepa.backbone import TextCond
    from softrepa.families.sd3 import SD3Backbone
    from softrepa.pairs import PairBatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute for 2B params on CPU
        model = SD3Transformer2DModel(**cfg)
    model = model.to(dtype).eval().requires_grad_(False)

    class _Pipe:  # the backbone needs only the denoiser for the loss
        transformer = model
        vae = None

    B, lat, text_len = args.batch, args.resolution // 8, 77 + args.text_len
    g = torch.Generator().manual_seed(0)
    cond = TextCond(torch.randn(B, text_len, cfg["joint_attention_dim"], generator=g).to(device, dtype),
                    torch.randn(B, cfg["pooled_projection_dim"], generator=g).to(device, dtype))
    batch = PairBatch(torch.randn(B, 16, lat, lat, generator=g).to(device, dtype), cond,
                      [f"caption {i}" for i in range(B)], torch.full((B,), 500.0, device=device),
                      torch.randn(1, 16, lat, lat, generator=g).to(device, dtype))
    return device, dtype, model, SD3Backbone(_Pipe()), batch


def one(args: argparse.Namespace) -> dict:
    from softrepa import SoftTokens, SoftTokensConfig, attach
    from softrepa.pairs import contrastive_backward
    from softrepa.speedups import SpeedConfig, attention_backend, check_speed, convert_fp8

    cfg = _config(args)
    device, dtype, model, bb, batch = random_step_inputs(args, cfg)
    if args.ckpt:
        model.enable_gradient_checkpointing()
    tokens = SoftTokens.for_model(model, SoftTokensConfig(num_layers=min(5, cfg["num_layers"]))).to(device)
    attach(model, tokens)
    B = args.batch
    chunk = None if args.chunk == "none" else int(args.chunk)
    opt = torch.optim.AdamW(tokens.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)
    attention = args.attention[0]
    check_speed(SpeedConfig(attention=attention, fp8=args.fp8), device, half=dtype != torch.float32)
    if args.fp8:
        convert_fp8(model)
    times = []
    for i in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast, attention_backend(attention):
            contrastive_backward(bb, batch, pair_chunk=chunk)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name(0)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        name = f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    return {"batch": B, "text_len": args.text_len, "chunk": args.chunk, "ckpt": args.ckpt, "step_s": step,
            "speed": SpeedConfig(attention=attention, fp8=args.fp8).describe(),
            "pairs_per_s": B * B / step, "peak_gib": peak, "device": name}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def side_by_side(args: argparse.Namespace) -> list[str]:
    """Floor, eager and compiled steps of one batch size, alternated in one process (see the docstring)."""
    from torch._dynamo.utils import counters

    from softrepa import CompileConfig, SoftTokens, SoftTokensConfig, attach, compile_blocks
    from softrepa.backbone import TextCond
    from softrepa.pairs import PairBatch, contrastive_backward
    from softrepa.speedups import SpeedConfig, attention_backend, check_speed, convert_fp8

    cfg = _config(args)
    device, dtype, model, bb, batch = random_step_inputs(args, cfg)
    cond = batch.cond
    tokens = SoftTokens.for_model(model, SoftTokensConfig(num_layers=min(5, cfg["num_layers"]))).to(device)
    handle = attach(model, tokens)
    B = args.batch
    floor_cond = TextCond(cond.embeds.clone().requires_grad_(True), cond.pooled)
    floor_batch = PairBatch(batch.latents, floor_cond, batch.captions, batch.t, batch.noise)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else torch.autocast(device.type, enabled=False))
    compiled = fp8 = None

    def use_fp8(on: bool) -> None:
        nonlocal fp8
        if on:  # converted once, then the same float8 modules re-installed: compiled code keeps its cache
            fp8 = fp8 or convert_fp8(model)
            fp8.apply()
        elif fp8 is not None:
            fp8.remove()

    def use_compiled(on: bool) -> None:
        nonlocal compiled
        if on and compiled is None:
            # dynamo's cache outlives remove(): re-wrapping recompiles nothing
            compiled = compile_blocks(model, CompileConfig(mode=args.compile_mode, backend=args.compile_backend))
        elif not on and compiled is not None:
            compiled.remove()
            compiled = None

    def step(arm: tuple[str, str, bool, str, bool]) -> tuple[float, float]:
        kind, chunk, on, attention, with_fp8 = arm
        use_fp8(with_fp8)  # before compiling: the blocks are traced with the modules of this arm
        use_compiled(on)
        tokens.zero_grad(set_to_none=True)
        floor_cond.embeds.grad = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        with autocast, attention_backend(attention):
            if kind == "floor":
                with handle.disabled():
                    contrastive_backward(bb, floor_batch, pair_chunk=None)
            else:
                contrastive_backward(bb, batch, pair_chunk=None if chunk == "none" else int(chunk))
        _sync(device)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        return dt, peak

    arms = [] if args.no_floor else [("floor", "none", False, "auto", False)]
    options = [(a, False) for a in args.attention if a != "auto"] + [(a, True) for a in args.attention if args.fp8]
    skipped = []
    for attention, with_fp8 in list(options):  # what this device lacks: skipped, the reason printed
        try:
            check_speed(SpeedConfig(attention=attention, fp8=with_fp8), device, half=dtype != torch.float32)
        except SoftrepaError as e:
            options.remove((attention, with_fp8))
            skipped.append(f"{SpeedConfig(attention=attention, fp8=with_fp8).describe()}: {e}")
            print(f"skip {skipped[-1]}", file=sys.stderr, flush=True)
    for c in args.chunk:
        arms += [("softrepa", c, False, "auto", False), ("softrepa", c, True, "auto", False)]
        arms += [("softrepa", c, True, a, f) for a, f in options]
    if args.compiled_floor:
        arms.insert(1, ("floor", "none", True, "auto", False))
    first: dict = {}
    times: dict = {a: [] for a in arms}
    peaks: dict = {a: 0.0 for a in arms}
    graphs_after_warmup = None
    for r in range(args.warmup + args.iters):
        for arm in list(arms):
            try:
                dt, peak = step(arm)
            except Exception as e:  # an option arm that fails here is reported; the others go on
                if arm[3:] == ("auto", False):
                    raise
                arms.remove(arm)
                times.pop(arm)
                skipped.append(f"{SpeedConfig(attention=arm[3], fp8=arm[4]).describe()}: failed at run time: "
                               f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}")
                print(f"arm {arm} failed: {skipped[-1]}", file=sys.stderr, flush=True)
                continue
            if r == 0:
                first[arm] = dt
            if r >= args.warmup:
                times[arm].append(dt)
            peaks[arm] = max(peaks[arm], peak)
            print(f"round {r} {arm}: {dt:.3f} s", file=sys.stderr, flush=True)
        if r == args.warmup - 1:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
    recompiled = counters["stats"]["unique_graphs"] - (graphs_after_warmup or 0)
    med = {a: statistics.median(v) for a, v in times.items()}
    floor = med.get(("floor", "none", False, "auto", False))
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else \
        f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    lines = [f"config: {_name(args)}, random weights, "
             f"{args.resolution} px, T5 {args.text_len}, {args.dtype}, B = {B} ({B * B} pairs), tokens m=4 L={min(5, cfg['num_layers'])} "
             f"with time buckets, device: {dev}; one process, arms alternated step by step, median of "
             f"{args.iters} steps after {args.warmup} warm-up round(s); compile mode "
             f"{args.compile_mode or 'default'}; graphs compiled after the warm-up: "
             f"{recompiled}", "",
             "| arm | speed options | pairs/forward | step s | pairs/s | vs floor | compiled / eager | compile s | "
             "peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        kind, chunk, on, attention, with_fp8 = arm
        name = f"{kind} {'compiled' if on else 'eager'}"
        eager = med.get((kind, chunk, False, "auto", False))
        speedup = f"{eager / med[arm]:.2f}x" if on and eager else ""
        comp = f"{first[arm] - med[arm]:.0f}" if on else ""
        per = "all" if chunk == "none" else chunk
        vs_floor = f"{floor / med[arm]:.2f}x" if floor else "n/a"
        lines.append(f"| {name} | {SpeedConfig(attention=attention, fp8=with_fp8).describe()} | {per} | {med[arm]:.3f} | {B * B / med[arm]:.1f} | {vs_floor} | "
                     f"{speedup} | {comp} | {'n/a' if device.type != 'cuda' else f'{peaks[arm]:.2f}'} |")
    lines += [f"| skipped | {s} | | | | | | | |" for s in skipped]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="SD3-medium config (default: reduced, 8 blocks, width 384)")
    ap.add_argument("--resolution", type=int, default=None, help="training px (default 512 full / 128 reduced)")
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--text-len", type=int, nargs="+", default=[256], help="T5 length (+77 CLIP tokens)")
    ap.add_argument("--chunk", nargs="+", default=["none", "16"], help="'none' = all pairs at once, or pairs/forward")
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing on")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--side-by-side", action="store_true",
                    help="floor / eager / compiled alternated in one process (first --batch only)")
    ap.add_argument("--no-floor", action="store_true",
                    help="side by side: no floor arm (it runs all B*B pairs in one pass: too large at B = 16)")
    ap.add_argument("--compiled-floor", action="store_true", help="side by side: also the compiled floor")
    ap.add_argument("--compile-mode", default=None, choices=[None, "default", "max-autotune-no-cudagraphs"],
                    help="side by side: torch.compile mode of the compiled arms (default: inductor's default)")
    ap.add_argument("--tiny", action="store_true", help="2 blocks, width 32: the suite's CPU dry run")
    ap.add_argument("--attention", nargs="+", default=["auto"], choices=list(ATTENTION_BACKENDS),
                    help="SDPA backend(s): one run uses the first; side by side adds a compiled arm per backend")
    ap.add_argument("--fp8", action="store_true", help="float8 linear layers (torchao; CUDA capability >= 8.9)")
    ap.add_argument("--compile-backend", default="inductor", help="side by side: torch.compile backend")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.resolution = args.resolution or (512 if args.full else 64 if args.tiny else 128)
    if args.side_by_side:
        lines = []
        for B in args.batch:
            args.batch = B
            args.text_len = args.text_len[0] if isinstance(args.text_len, list) else args.text_len
            lines += side_by_side(args) + [""]
        emit(lines, args.out)
        return
    if args.one:
        args.batch, args.text_len, args.chunk = args.batch[0], args.text_len[0], args.chunk[0]
        print("RESULT " + json.dumps(one(args)))
        return
    rows = []
    for B in args.batch:
        for L in args.text_len:
            for c in args.chunk:
                cmd = [sys.executable, __file__, "--one", "--batch", str(B), "--text-len", str(L), "--chunk", c,
                       "--dtype", args.dtype, "--iters", str(args.iters), "--warmup", str(args.warmup),
                       "--resolution", str(args.resolution), "--attention", args.attention[0]] + \
                    (["--full"] if args.full else []) + (["--ckpt"] if args.ckpt else []) + \
                    (["--tiny"] if args.tiny else []) + (["--fp8"] if args.fp8 else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append({"batch": B, "text_len": L, "chunk": c, "error": err[:80]})
                else:
                    rows.append(json.loads(line[0][7:]))
                print(rows[-1], file=sys.stderr)
    dev = next((r["device"] for r in rows if "device" in r), "?")
    head = (f"config: {_name(args)}, random weights, "
            f"{args.resolution} px, {args.dtype}, grad checkpointing {'on' if args.ckpt else 'off'}, speed options: "
            f"{next((r['speed'] for r in rows if 'speed' in r), '?')}, device: {dev}")
    lines = [head, "", "| B | pairs | T5 len | pairs/forward | step s | pairs/s | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = "all (authors' layout)" if r["chunk"] == "none" else r["chunk"]
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['batch'] ** 2} | {r['text_len']} | {mode} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['batch']} | {r['batch'] ** 2} | {r['text_len']} | {mode} | {r['step_s']:.2f} | "
                         f"{r['pairs_per_s']:.1f} | {r['peak_gib']:.2f} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
