"""Leverage of soft tokens on a model's prediction: gate 1 of a miniature (softrepa.toy.gates).

    leverage = median over images and t in {300, 600} of
               |v(caption, tokens) - v(caption)| / |v(caption) - v(empty prompt)|

on 16 two-object train-split scenes with one noise draw. Random tokens: m = 4 in the first 5
blocks, base ~ N(0, s^2) with s the per-element std of the model's own caption embeddings, no
time part, best of 5 draws. Trained tokens (`--tokens FILE ...`) are measured the same way.

    python benchmarks/token_leverage.py --model @assets/toy_sd3 \
        --tokens demo_out/train/tokens.safetensors demo_out/train_positive_only/tokens.safetensors
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from softrepa.pipeline import load_pipeline, resolve_model_path
    from softrepa.toy.gates import LEVERAGE_GATE, token_leverage

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="@assets/toy_sd3", help="pipeline folder (or @assets/toy_sd3)")
    p.add_argument("--tokens", nargs="*", default=[], help="trained tokens files to measure too")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--max-sequence-length", type=int, default=8, help="SD3: T5 length (the recipe's)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # the stand-in T5's truncation warning on every prompt
    pipe = load_pipeline(resolve_model_path(a.model))
    rand = token_leverage(pipe, n_images=a.images, draws=a.draws, max_sequence_length=a.max_sequence_length)
    rows = ["| tokens | leverage (median over images x t) |", "|---|---|",
            f"| random, m = 4, first 5 blocks, N(0, {rand['s']:.3f}^2), best of {a.draws} "
            f"(draws: {', '.join(f'{v:.3f}' for v in rand['per_draw'])}) | **{rand['leverage']:.3f}** |"]
    if a.tokens:
        trained = token_leverage(pipe, a.tokens, n_images=a.images, max_sequence_length=a.max_sequence_length)
        rows += [f"| {path} | {v:.3f} |" for path, v in zip(a.tokens, trained["leverage"])]
    print(f"model: {a.model}; {rand['n']} image x t values; gate: random tokens >= {LEVERAGE_GATE}\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
