"""Per family: attach overhead (one denoiser call with / without the tokens) and one contrastive training
step, at the real configuration with random weights (issue 24's GPU figures).

    python benchmarks/family_step.py --tiny                        # every family, tiny models (CPU check)
    python benchmarks/family_step.py --families flux3 sd3 --out benchmarks/results/family_step_H100.md

Each family runs in its own subprocess (its peak memory is its own; an out-of-memory family is a row
saying so, not the end of the run). The stock pipeline around the denoiser is softrepa's tiny one of the
family (its glue: packing, ids, the scheduler); the denoiser is replaced by the diffusers class built
from the real configuration (`REAL`: the class defaults of diffusers 0.42.1, which are the flagship
configs of the DiT classes — their parameter counts are in the table —, SD3-medium's and the UNets'
published configs) with random weights, in bf16 on the GPU. Prompts: a random `TextCond` of the real
text width and of the rows a short caption takes in the model call (`TEXT_ROWS`); latents: random, of
the model latent's real channels at the resolution.

Attach overhead: `backbone.denoise` at `--resolution` (each family's native one by default), batch 1,
the recipe's token layout, tokens disabled vs enabled alternating, medians. Training step: the exact
contrastive step (`contrastive_backward`, B images x B captions, all pairs in one forward) at
`--train-resolution` with gradient checkpointing, after one warm-up step; peak memory of the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from attach_overhead import SD3_MEDIUM  # noqa: E402
from report import emit  # noqa: E402

#: the real configurations (diffusers class, kwargs); {} = the class defaults
REAL = {
    "sd3": ("SD3Transformer2DModel", SD3_MEDIUM),
    "sd15": ("UNet2DConditionModel", dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                          block_out_channels=(320, 640, 1280, 1280))),
    "sdxl": ("UNet2DConditionModel", dict(
        sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
    "flux": ("FluxTransformer2DModel", dict(guidance_embeds=True)),  # FLUX.1-dev
    "flux2": ("Flux2Transformer2DModel", {}),  # FLUX.2-dev
    "qwenimage": ("QwenImageTransformer2DModel", {}),
    "sana": ("SanaTransformer2DModel", {}),  # SANA 1.6B
    "wan": ("WanTransformer3DModel", {}),  # Wan 2.1 T2V 14B (one expert)
    "zimage": ("ZImageTransformer2DModel", {}),
    "qwenimage21": ("QwenImage21Transformer2DModel", {}),
    "flux3": ("Flux3Transformer2DModel", {}),
}
#: (latent channels, pixels per latent side) of the model latent the backbone works on, real VAEs
LATENT = {"sd3": (16, 8), "sd15": (4, 8), "sdxl": (4, 8), "flux": (16, 8), "flux2": (128, 16), "qwenimage": (16, 8),
          "sana": (32, 32), "wan": (16, 8), "zimage": (16, 8), "qwenimage21": (64, 16), "flux3": (128, 16)}
#: text rows of a short caption in the model call (the family's padded length where it pads)
TEXT_ROWS = {"sd3": 77 + 512, "sd15": 77, "sdxl": 77, "flux": 512, "flux2": 512, "qwenimage": 32, "sana": 300,
             "wan": 512, "zimage": 32, "qwenimage21": 32, "flux3": 80}
NATIVE = {"sd15": 512}  # default --resolution: 1024 for the others


def tiny_pipeline(family: str):
    from softrepa import tiny, tiny_crossattn, tiny_dit

    return {"sd3": lambda: tiny.tiny_sd3_pipeline(num_layers=6, with_t5=True), "sd15": tiny.tiny_sd15_pipeline,
            "sdxl": tiny.tiny_sdxl_pipeline, "flux": lambda: tiny.tiny_flux_pipeline(guidance_embeds=True),
            "flux2": tiny.tiny_flux2_pipeline, "qwenimage": tiny.tiny_qwenimage_pipeline,
            "sana": tiny_crossattn.tiny_sana_pipeline, "wan": tiny_crossattn.tiny_wan_pipeline,
            "zimage": tiny_dit.tiny_zimage_pipeline, "qwenimage21": tiny_dit.tiny_qwenimage21_pipeline,
            "flux3": tiny_dit.tiny_flux3_pipeline}[family]()


def swap_denoiser(pipe, model) -> None:
    name = "unet" if hasattr(pipe, "unet") and getattr(pipe, "unet", None) is not None else "transformer"
    if hasattr(pipe, "update_components"):  # a modular pipeline
        pipe.update_components(**{name: model})
    else:
        setattr(pipe, name, model)


def inflate(cond, rows: int, width: int, pooled: int | None, device, dtype, g):
    """A random `TextCond` of the tiny one's structure with `rows` x `width` embeddings (masks all ones,
    lengths = rows, other extras kept)."""
    from softrepa.backbone import TextCond

    n = len(cond)
    embeds = torch.randn(n, rows, width, generator=g).to(device, dtype)
    pool = None if cond.pooled is None else torch.randn(n, pooled, generator=g).to(device, dtype)
    extra = {}
    for k, v in cond.extra.items():
        if v.ndim == 2 and v.shape[1] == cond.embeds.shape[1]:  # a per-row mask
            extra[k] = torch.ones(n, rows, dtype=v.dtype, device=device)
        elif v.ndim == 1 and not v.is_floating_point():  # a per-sample text length
            extra[k] = torch.full((n,), rows, dtype=v.dtype, device=device)
        else:
            extra[k] = v.to(device)
    return TextCond(embeds, pool, extra)


def pooled_width(model) -> int | None:
    c = model.config
    if getattr(c, "pooled_projection_dim", None):
        return int(c.pooled_projection_dim)
    if getattr(c, "projection_class_embeddings_input_dim", None):  # SDXL: pooled + 6 time ids
        return int(c.projection_class_embeddings_input_dim) - 6 * int(c.addition_time_embed_dim)
    return None


def one(args: argparse.Namespace) -> dict:
    import diffusers

    from softrepa import SoftTokens, attach
    from softrepa.backbone import backbone_for
    from softrepa.config import load_config
    from softrepa.family import family_of, resolve_denoiser
    from softrepa.pairs import PairBatch, contrastive_backward

    fam = args.one
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = tiny_pipeline(fam)
    g = torch.Generator().manual_seed(0)
    tiny_bb = backbone_for(pipe)
    tiny_cond = tiny_bb.encode_prompts(["a red circle", "a small blue square"])
    if args.tiny:
        model = resolve_denoiser(pipe)
        res, train_res = 32, 32
        with torch.no_grad():
            x = tiny_bb.encode_images(torch.rand(1, 3, res, res, generator=g) * 2 - 1)
        channels, factor = x.shape[1], res // x.shape[-1]
    else:
        name, kw = REAL[fam]
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: seconds, not minutes
            model = getattr(diffusers, name)(**kw)
        swap_denoiser(pipe, model)
        channels, factor = LATENT[fam]
        res, train_res = args.resolution or NATIVE.get(fam, 1024), args.train_resolution
    model = model.to(device, dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    bb = backbone_for(pipe)
    info = family_of(pipe).describe(model)
    rows = tiny_cond.embeds.shape[1] if args.tiny else TEXT_ROWS[fam]
    pooled = tiny_cond.pooled.shape[1] if args.tiny and tiny_cond.pooled is not None else pooled_width(model)
    recipe = load_config(fam).tokens  # the recipe's layout; a tiny model's depth caps its block count
    layout = recipe if not info.depth else dataclasses.replace(recipe, layers=None,
                                                               num_layers=min(recipe.num_layers, info.depth))
    layout = dataclasses.replace(layout, init="normal")  # values do not change the timing; no text encoder needed
    tokens = SoftTokens.for_model(model, layout, seed=0).to(device)
    handle = attach(model, tokens)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # attach overhead: one call, batch 1, tokens off / on alternating
    def prompts(idx):  # the tiny prompts themselves for the tiny models, random real-size ones otherwise
        part = tiny_cond.index(idx)
        return part.to(device) if args.tiny else inflate(part, rows, info.text_dim, pooled, device, dtype, g)

    cond1 = prompts([0])
    x_t = torch.randn(1, channels, res // factor, res // factor, generator=g).to(device, dtype)
    t = torch.full((1,), 500.0, device=device)
    times = {False: [], True: []}
    with torch.no_grad():
        for i in range(2 * (args.warmup + args.iters)):
            on = bool(i % 2)
            handle.enabled = on
            sync()
            t0 = time.perf_counter()
            bb.denoise(x_t, t, cond1)
            sync()
            if i >= 2 * args.warmup:
                times[on].append(time.perf_counter() - t0)
    handle.enabled = True
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}

    # one contrastive training step (B x B pairs), gradient checkpointing on
    if hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    B = args.batch
    condB = prompts([i % 2 for i in range(B)])
    side = train_res // factor
    batch = PairBatch(torch.randn(B, channels, side, side, generator=g).to(device, dtype), condB,
                      [f"caption {i}" for i in range(B)], torch.full((B,), 500.0, device=device),
                      torch.randn(1, channels, side, side, generator=g).to(device, dtype))
    opt = torch.optim.AdamW(tokens.parameters(), lr=1e-3)
    step_s = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(2):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            contrastive_backward(bb, batch, pair_chunk=None)
        opt.step()
        sync()
        step_s.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"family": fam, "params_b": params / 1e9, "layers": list(tokens.layout.layers) or "blocks",
            "token_params": sum(p.numel() for p in tokens.parameters()), "res": res, "rows": rows,
            "vanilla_ms": 1e3 * med[False], "tokens_ms": 1e3 * med[True], "overhead": med[True] / med[False] - 1,
            "train_res": train_res, "batch": B, "step_s": step_s[-1], "peak_gib": peak,
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"}


def main() -> None:
    from softrepa.family import family_names

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="*", default=None, help="default: every registered family")
    ap.add_argument("--tiny", action="store_true", help="the tiny models (a CPU check of the script)")
    ap.add_argument("--resolution", type=int, default=None, help="attach overhead (default: native)")
    ap.add_argument("--train-resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="images (and captions) of the training step")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per family")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)))
        return
    families = args.families or family_names()
    rows = []
    for fam in families:
        cmd = [sys.executable, __file__, "--one", fam, "--train-resolution", str(args.train_resolution),
               "--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup)]
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--resolution", str(args.resolution)] if args.resolution else []
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            found = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
            if found:
                rows.append(json.loads(found[-1][7:]))
            else:
                last = (run.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"family": fam, "error": ("out of memory" if "out of memory" in run.stderr else last)[:120]})
        except subprocess.TimeoutExpired:
            rows.append({"family": fam, "error": f"over {args.timeout} s"})
        print(rows[-1], flush=True)
    device = next((r["device"] for r in rows if "device" in r), "?")
    lines = [f"# Per family: attach overhead and one training step ({'tiny models' if args.tiny else 'real configs, random weights, bf16'}; {device})",
             "", f"`python benchmarks/family_step.py {' '.join(sys.argv[1:])}`", "",
             "| family | denoiser params | token blocks | token params | call px / text rows | vanilla ms | tokens ms | overhead | train px, B x B pairs | step s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['error']} |  |  |  |  |  |  |  |  |  |")
            continue
        size = f"{r['params_b']:.2f}B" if r["params_b"] >= 0.1 else f"{1e3 * r['params_b']:.2f}M"
        lines.append(f"| {r['family']} | {size} | {r['layers']} | {r['token_params']:,} | {r['res']} / {r['rows']} | "
                     f"{r['vanilla_ms']:.1f} | {r['tokens_ms']:.1f} | {100 * r['overhead']:+.1f}% | {r['train_res']}, "
                     f"{r['batch']} x {r['batch']} | {r['step_s']:.2f} | {r['peak_gib']:.1f} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
