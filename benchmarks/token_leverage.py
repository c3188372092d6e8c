"""How much can soft tokens move a model's errors at all? (the miniature's leverage problem)

For a fixed batch at a fixed timestep, E is computed without tokens, then with tokens of a given
layout at their initialisation and after adding N(0, s^2) to every base token. The printed table
gives the relative change of the matching pairs' errors (diagonal) and of all pairs, averaged over
a few random draws. Trained tokens (`--tokens FILE ...`) are measured the same way. If no
perturbation moves E by more than a few percent, the contrastive loss cannot move the samples
either, whatever the temperature: that is what the bundled SD3 miniature shows (docs/effect.md).

    python benchmarks/token_leverage.py --model @assets/toy_sd3 --data demo_out/data \
        --tokens demo_out/train/tokens.safetensors demo_out/train_positive_only/tokens.safetensors
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from softrepa import SoftTokens, SoftTokensConfig, attach
    from softrepa.backbone import backbone_for
    from softrepa.pipeline import load_pipeline
    from softrepa.data import build_dataset
    from softrepa.diagnose import draw_batches, prepare_batch
    from softrepa.artifact import load_soft_tokens
    from softrepa.pairs import error_matrix

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="@assets/toy_sd3")
    p.add_argument("--data", required=True)
    p.add_argument("--tokens", nargs="*", default=[], help="trained tokens files to measure too")
    p.add_argument("--num-tokens", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 5.0, 20.0])
    p.add_argument("--t", type=float, nargs="+", default=[300.0, 600.0])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-sequence-length", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    pipe.set_progress_bar_config(disable=True)
    bb = backbone_for(pipe, max_sequence_length=a.max_sequence_length)
    bb.freeze()
    ds = build_dataset(a.data, 32)
    batch = next(draw_batches(ds, a.batch_size, 1, 5))
    pbs = [prepare_batch(bb, batch, t, 3, 32) for t in a.t]
    with torch.no_grad():
        E0 = [error_matrix(bb, pb) for pb in pbs]

    def change(tokens) -> tuple[float, float]:
        h = attach(pipe, tokens)
        try:
            with torch.no_grad():
                d, o = [], []
                for pb, e0 in zip(pbs, E0):
                    e = error_matrix(bb, pb)
                    d.append(float((e.diagonal() - e0.diagonal()).abs().mean() / e0.diagonal().mean()))
                    o.append(float((e - e0).abs().mean() / e0.mean()))
        finally:
            h.remove()
        return sum(d) / len(d), sum(o) / len(o)

    family = bb.family
    rows = ["| tokens | perturbation s | rel. change of E diag | rel. change of all E |", "|---|---|---|---|"]
    for m in a.num_tokens:
        layers = {"num_layers": 5} if family == "sd3" else {"blocks": ("down", "mid")}
        cfg = SoftTokensConfig(num_tokens=m, time_buckets=0, init="empty_prompt", **layers)
        for s in a.scales:
            vals = []
            for k in range(a.draws if s > 0 else 1):
                tok = SoftTokens.for_model(pipe, cfg, seed=0)
                g = torch.Generator().manual_seed(1000 + k)
                with torch.no_grad():
                    tok.base.add_(s * torch.randn(tok.base.shape, generator=g))
                vals.append(change(tok))
            d = sum(v[0] for v in vals) / len(vals)
            o = sum(v[1] for v in vals) / len(vals)
            rows.append(f"| m = {m}, empty-prompt init, {'first 5 blocks' if family == 'sd3' else 'down + mid'} "
                        f"| {s:g} | {100 * d:.1f}% | {100 * o:.1f}% |")
    for path in a.tokens:
        d, o = change(load_soft_tokens(path))
        rows.append(f"| trained: `{path}` | - | {100 * d:.1f}% | {100 * o:.1f}% |")
    print(f"model {a.model} ({family}), batch {a.batch_size}, t in {a.t}, {a.draws} draws per perturbation\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
