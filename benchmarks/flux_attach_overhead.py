"""Attach overhead of soft tokens on the FLUX.1-dev, FLUX.2-dev and Qwen-Image transformers at their real
configurations (random bf16 weights built on the GPU), 1024 px (64 x 64 packed tokens), one branch
(batch 1), text 512, m = 4 tokens on the recipes' layers (5 / 4 / 5); plus bit-exact detach on the GPU.

    python benchmarks/flux_attach_overhead.py            # GPU (FLUX.2-dev needs ~62 GiB)
    python benchmarks/flux_attach_overhead.py --only qwenimage   # one model (flux, flux2, qwenimage)
    python benchmarks/flux_attach_overhead.py            # without CUDA: a reduced-size dry run on the CPU

Median of 30 forwards each, plain and with tokens interleaved in 3 rounds of 10 (3 warm-ups each).
Prints a markdown table (results: benchmarks/results/flux_attach_overhead_NVIDIA_H200.md)."""

import statistics
import sys
import time

import torch

from softrepa import SoftTokens, SoftTokensConfig, attach

CUDA = torch.cuda.is_available()
dev = torch.device("cuda" if CUDA else "cpu")
SMALL = not CUDA  # CPU dry run of the script: reduced widths and depths


def sync():
    if CUDA:
        torch.cuda.synchronize()
torch.backends.cuda.matmul.allow_tf32 = True


def timed(model, inp, iters=10, warmup=3):
    ts = []
    with torch.no_grad():
        for i in range(warmup + iters):
            sync()
            t0 = time.perf_counter()
            model(**inp, return_dict=False)
            sync()
            if i >= warmup:
                ts.append(time.perf_counter() - t0)
    return ts


def build(cls, cfg):
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            m = cls(**cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    for p in m.parameters():  # random init of diffusers leaves some zero-init layers: make the model non-trivial
        if p.dim() >= 2:
            p.data.normal_(0, 0.02)
    return m.requires_grad_(False)


def run(name, model, inp, layers, rows):
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    tokens = SoftTokens.for_model(model, SoftTokensConfig(num_layers=layers), seed=0).to(dev)
    with torch.no_grad():
        before = model(**inp, return_dict=False)[0]
    plain, hooked = [], []
    for rep in range(3):  # interleaved against clock drift
        plain += timed(model, inp)
        with attach(model, tokens):
            hooked += timed(model, inp)
    with torch.no_grad():
        handle = attach(model, tokens)
        with_tok = model(**inp, return_dict=False)[0]
        handle.remove()
        after = model(**inp, return_dict=False)[0]
    p, h = statistics.median(plain), statistics.median(hooked)
    name = f"{name} [reduced CPU dry run]" if SMALL else name
    rows.append(f"| {name} | {n_params:.1f} B | {layers} | {p * 1e3:.1f} | {h * 1e3:.1f} | {100 * (h / p - 1):+.2f} % "
                 f"| {torch.equal(before, after)} | {(with_tok.float() - before.float()).abs().max().item():.3g} |")
    print(rows[-1], flush=True)


def main():
    import argparse

    from diffusers import FluxTransformer2DModel, Flux2Transformer2DModel, QwenImageTransformer2DModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=["flux", "flux2", "qwenimage"], default=["flux", "flux2", "qwenimage"])
    only = ap.parse_args().only

    rows = ["| model (random bf16) | params | token layers | plain ms | tokens ms | overhead | detach bit-exact "
            "| max abs effect |", "|---|---|---|---|---|---|---|---|"]
    n_txt, side = (512, 64) if not SMALL else (16, 8)  # 1024 px: 64 x 64 packed tokens for each model
    shrink = (lambda c: dict(c, num_layers=min(c["num_layers"], 6), num_single_layers=2, num_attention_heads=2,
                             attention_head_dim=c["attention_head_dim"] // 4,
                             axes_dims_rope=tuple(a // 4 for a in c["axes_dims_rope"]))) if SMALL else (lambda c: c)
    g = torch.Generator(device=dev).manual_seed(0)
    if "flux" in only:
        flux1(FluxTransformer2DModel, shrink, n_txt, side, g, rows)
    if "flux2" in only:
        flux2(Flux2Transformer2DModel, shrink, n_txt, side, g, rows)
    if "qwenimage" in only:
        qwenimage(QwenImageTransformer2DModel, shrink, n_txt, side, g, rows)
    print("\n".join(rows))
    if CUDA:
        print(torch.cuda.get_device_name(), "torch", torch.__version__, "peak GiB",
              round(torch.cuda.max_memory_allocated() / 2 ** 30, 1))


def flux1(cls, shrink, n_txt, side, g, rows):
    m = build(cls, shrink(dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                           attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                           pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))))
    ids = torch.zeros(side, side, 3, device=dev)
    ids[..., 1] = torch.arange(side, device=dev)[:, None]
    ids[..., 2] = torch.arange(side, device=dev)[None, :]
    inp = dict(hidden_states=torch.randn(1, side * side, 64, generator=g, device=dev, dtype=torch.bfloat16),
               encoder_hidden_states=torch.randn(1, n_txt, 4096, generator=g, device=dev, dtype=torch.bfloat16),
               pooled_projections=torch.randn(1, 768, generator=g, device=dev, dtype=torch.bfloat16),
               timestep=torch.tensor([0.5], device=dev, dtype=torch.bfloat16),
               guidance=torch.tensor([3.5], device=dev), img_ids=ids.reshape(-1, 3),
               txt_ids=torch.zeros(n_txt, 3, device=dev))
    run("FLUX.1-dev (19 + 38 blocks, 3072 wide)", m, inp, 5, rows)
    del m, inp
    torch.cuda.empty_cache() if CUDA else None


def flux2(cls, shrink, n_txt, side, g, rows):
    m = build(cls, shrink(dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48,
                                            attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
                                            timestep_guidance_channels=256, mlp_ratio=3.0,
                                            axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True)))
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n_txt))
    inp = dict(hidden_states=torch.randn(1, side * side, 128, generator=g, device=dev, dtype=torch.bfloat16),
               encoder_hidden_states=torch.randn(1, n_txt, 15360, generator=g, device=dev, dtype=torch.bfloat16),
               timestep=torch.tensor([0.5], device=dev, dtype=torch.bfloat16), guidance=torch.tensor([4.0], device=dev),
               img_ids=img_ids[None].to(dev), txt_ids=txt_ids[None].to(dev))
    run("FLUX.2-dev (8 + 48 blocks, 6144 wide)", m, inp, 4, rows)
    del m, inp
    torch.cuda.empty_cache() if CUDA else None


def qwenimage(cls, shrink, n_txt, side, g, rows):
    """Qwen-Image: 60 dual-stream blocks, 3072 wide, Qwen2.5-VL text (3584); a full prompt mask (the
    tokens' mask entries are 1 either way); `img_shapes` in 2 x 2 patches (64 x 64 at 1024 px)."""
    cfg = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
    if SMALL:
        cfg = dict(cfg, num_layers=6, num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12))
    m = build(cls, cfg)
    inp = dict(hidden_states=torch.randn(1, side * side, 64, generator=g, device=dev, dtype=torch.bfloat16),
               encoder_hidden_states=torch.randn(1, n_txt, 3584, generator=g, device=dev, dtype=torch.bfloat16),
               encoder_hidden_states_mask=torch.ones(1, n_txt, dtype=torch.long, device=dev),
               timestep=torch.tensor([0.5], device=dev, dtype=torch.bfloat16), img_shapes=[[(1, side, side)]])
    run(f"Qwen-Image ({cfg['num_layers']} blocks, {cfg['num_attention_heads'] * cfg['attention_head_dim']} wide)",
        m, inp, 5, rows)
    del m, inp
    torch.cuda.empty_cache() if CUDA else None


if __name__ == "__main__":
    sys.exit(main())
