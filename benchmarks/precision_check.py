"""fp16 / bf16 against fp32 with soft tokens attached: forward, token gradients, chunked loss.

    python benchmarks/precision_check.py                 # reduced SD3 config, CPU (bf16 only)
    python benchmarks/precision_check.py --full          # SD3-medium config on a GPU, bf16 + fp16

Random weights, tokens attached to the first 5 blocks. For each half precision it reports:
* forward: max |out_half - out_fp32| / max |out_fp32| of the model's prediction;
* token gradient: cosine similarity of d(loss)/d(tokens) under autocast with the fp32 gradient,
  loss = the SoftREPA contrastive loss over B x B pairs (the training path);
* chunked vs all-pairs: relative difference of the token gradients of the exact two-pass scheme
  (B pairs per forward) and the one-pass path, both under the same autocast.
Prints a markdown table; `--out FILE` also writes it. Read it as a sanity check, not a test:
half precision differs from fp32 by its rounding, and the numbers say by how much.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from attach_overhead import REDUCED, SD3_MEDIUM  # noqa: E402
from report import emit  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="SD3-medium config (default: reduced)")
    ap.add_argument("--resolution", type=int, default=None, help="px (default 512 full / 128 reduced)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=128, help="T5 tokens (+77 CLIP)")
    ap.add_argument("--dtypes", default=None, help="comma list of bf16,fp16 (default: both on GPU, bf16 on CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from diffusers import SD3Transformer2DModel

    from softrepa import SoftTokens, SoftTokensConfig, attach
    from softrepa.backbone import TextCond
    from softrepa.families.sd3 import SD3Backbone as MMDiTBackbone
    from softrepa.pairs import PairBatch, contrastive_backward

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = (args.dtypes or ("bf16,fp16" if device.type == "cuda" else "bf16")).split(",")
    cfg = SD3_MEDIUM if args.full else REDUCED
    res = args.resolution or (512 if args.full else 128)
    torch.manual_seed(0)
    with torch.device(device):
        model = SD3Transformer2DModel(**cfg)
    model.eval().requires_grad_(False)  # fp32 weights; autocast runs the matmuls in half precision
    tokens = SoftTokens.for_model(model, SoftTokensConfig()).to(device)
    with torch.no_grad():
        for p in tokens.parameters():
            p.normal_(0, 0.5)  # tokens that matter, so that errors in their path show

    class _Pipe:
        transformer = model
        vae = None

    bb = MMDiTBackbone(_Pipe())
    attach(model, tokens)
    B, lat = args.batch, res // 8
    g = torch.Generator().manual_seed(0)
    cond = TextCond(torch.randn(B, 77 + args.text_len, cfg["joint_attention_dim"], generator=g).to(device),
                    torch.randn(B, cfg["pooled_projection_dim"], generator=g).to(device))
    batch = PairBatch(torch.randn(B, 16, lat, lat, generator=g).to(device), cond,
                      [f"caption {i}" for i in range(B)], torch.full((B,), 500.0, device=device),
                      torch.randn(1, 16, lat, lat, generator=g).to(device))
    kw = dict(loss_kwargs=dict(tau=1.0, scale=4.0))  # tau 1 keeps logits O(1) on random weights

    def forward():
        with torch.no_grad():
            x_t = bb.add_noise(batch.latents, batch.noise.expand_as(batch.latents), batch.t)
            return bb.denoise(x_t, batch.t, batch.cond).float()

    def token_grad(chunk):
        for p in tokens.parameters():
            p.grad = None
        contrastive_backward(bb, batch, pair_chunk=chunk, **kw)
        return torch.cat([p.grad.flatten() for p in tokens.parameters()]).float()

    ref_out, ref_grad = forward(), token_grad(None)
    rows = []
    for name in dtypes:
        with torch.autocast(device.type, dtype=DTYPES[name]):
            out = forward()
            grad_all, grad_chunk = token_grad(None), token_grad(B)  # B pairs per forward: B chunks
        rows.append((name, float((out - ref_out).abs().max() / ref_out.abs().max()),
                     float(torch.nn.functional.cosine_similarity(grad_all, ref_grad, dim=0)),
                     float((grad_chunk - grad_all).norm() / grad_all.norm()),
                     bool(torch.isfinite(grad_all).all() and torch.isfinite(grad_chunk).all())))
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU {platform.machine()}"
    lines = [f"config: {'SD3-medium' if args.full else 'reduced SD3 (8 blocks, width 384)'}, random weights, "
             f"{res} px, B = {B} ({B * B} pairs), T5 {args.text_len}, tokens in 5 blocks, device: {dev}", "",
             "| autocast | forward rel. max error vs fp32 | token-grad cosine vs fp32 | chunked vs all-pairs grad rel. diff | finite |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {e:.2e} | {c:.5f} | {d:.2e} | {f} |" for n, e, c, d, f in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
