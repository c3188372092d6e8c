"""The three gates of a miniature, on validation seeds, before any token arm sees a test seed.

1. leverage of random soft tokens (>= 0.30; benchmarks/token_leverage.py has the definition);
2. headroom: vanilla two-object alignment between 25% and 75% at the chosen CFG, held-out
   compositions below training-distribution ones;
3. operating point: the CFG of the sweep where vanilla's quality proxy is lowest (rule fixed in
   softrepa.toy.gates.choose_cfg before any token arm was measured), with vanilla's alignment
   and quality-proxy curves over the sweep.

Validation seeds only: 60 training-distribution pairs x seeds 100-102 and 36 held-out pairs x
seeds 100-104 (180 pairs each), 20 steps. Writes OUT/gates.md and OUT/gates.json; `--save`
also copies gates.json into the model folder, where `softrepa demo` reads it.

    python benchmarks/miniature_gates.py --model src/softrepa/assets/toy_sd3 --out /tmp/gates --save
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from diffusers.utils import logging as dlogging

    from softrepa.pipeline import load_pipeline, resolve_model_path
    from softrepa.toy.effect import PROMPT_SETS, VALIDATION_SEEDS
    from softrepa.toy.gates import (CFG_SWEEP, choose_cfg, cfg_sweep, gate_lines, headroom, sweep_table,
                                    token_leverage)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="@assets/toy_sd3")
    p.add_argument("--out", required=True)
    p.add_argument("--cfgs", type=float, nargs="+", default=list(CFG_SWEEP))
    p.add_argument("--max-sequence-length", type=int, default=8)
    p.add_argument("--save", action="store_true", help="write gates.json into the model folder")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dlogging.set_verbosity_error()
    model = Path(resolve_model_path(a.model))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    lev = token_leverage(pipe, max_sequence_length=a.max_sequence_length)
    print(f"leverage {lev['leverage']:.3f} (draws {lev['per_draw']})", flush=True)
    seeds = list(VALIDATION_SEEDS)
    sets = {"train_pairs": PROMPT_SETS["train_pairs"](), "heldout_pairs": PROMPT_SETS["heldout_pairs"]()}
    n_seeds = {"train_pairs": 3, "heldout_pairs": 5}
    sweep = {}
    for name, prompts in sets.items():
        part = cfg_sweep(pipe, {name: prompts}, seeds[:n_seeds[name]], out / "images", a.cfgs,
                         max_sequence_length=a.max_sequence_length)
        for c, per in part.items():
            sweep.setdefault(c, {}).update(per)
    chosen = choose_cfg(sweep)
    gates = {"leverage": lev, "headroom": headroom(sweep[chosen]),
             "operating_point": {"cfg": chosen, "rule": "the sweep's CFG with the lowest vanilla quality proxy "
                                 "(Fréchet distance to real renders, mean of both sets), validation seeds"},
             "sweep": {str(c): {k: {"accuracy": v["accuracy"], "quality_proxy": v["quality_proxy"]}
                                for k, v in per.items()} for c, per in sweep.items()},
             "seeds": {k: seeds[:n] for k, n in n_seeds.items()}, "model": str(a.model),
             "seconds": round(time.perf_counter() - t0, 1)}
    text = "\n".join([
        f"# Miniature gates — {a.model}, validation seeds", "",
        f"Command: `python benchmarks/miniature_gates.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"({gates['seconds']:.0f} s). Pairs per CFG: 60 training-distribution prompts x seeds 100-102, "
        "36 held-out prompts x seeds 100-104; 20 steps.", "",
        *gate_lines(gates), "",
        "Vanilla over CFG (validation seeds):", "", sweep_table(sweep, chosen), ""])
    print(text)
    (out / "gates.md").write_text(text)
    (out / "gates.json").write_text(json.dumps(gates, indent=1))
    if a.save:
        shutil.copy(out / "gates.json", model / "gates.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
