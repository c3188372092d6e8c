"""Controls for SoftREPA's effect on a bundled miniature: one table, every arm on the same pairs.

Arms (each judged on the same (prompt, seed) pairs of two declared prompt sets):
  vanilla               the frozen miniature, the recipe's CFG
  vanilla CFG x1.5 / x2 is a gain just stronger guidance?
  tokens at init        the recipe's tokens untrained (what does training add?)
  positive-only         the same tokens and recipe trained on the denoising term alone (no negatives)
  SoftREPA (paper)      the recipe with the authors' loss settings: tau 0.07 constant, no hard negatives
  SoftREPA (calibrated tau)  calibrated tau, in-batch negatives only (which part carries the gain?)
  SoftREPA (recipe)     the miniature recipe as shipped (calibrated tau + hard negatives)
  AGSM                  SoftREPA's successor on the same recipe (softrepa.toy.effect.AGSM_ARM)

    python benchmarks/effect_controls.py --split validation --out /tmp/controls_val   # recipe choice
    python benchmarks/effect_controls.py --split test --out /tmp/controls_test        # reported once

Prints the markdown table and writes it with every number to OUT/controls.md / controls.json.
Training folders and PNGs are kept in OUT, so a rerun resumes instead of starting over.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from softrepa.pipeline import load_pipeline, resolve_model_path
    from softrepa.config import load_config
    from softrepa.toy.effect import (AGSM_ARM, POSITIVE_ONLY, PROMPT_SETS, TEST_SEEDS, VALIDATION_SEEDS, Arm,
                                     comparison_table, initial_tokens, judge_arm, reference_images, sampling_length, summary,
                                     train_arm)
    from softrepa.toy.world import export_image_folder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=["sd3", "sd15"], default="sd3")
    p.add_argument("--split", choices=["validation", "test"], required=True,
                   help="validation seeds 100-109 (choose recipes) or test seeds 0-9 (report once)")
    p.add_argument("--seeds", type=int, default=None, help="first N seeds of the split per prompt (default: 6 / 10)")
    p.add_argument("--out", required=True)
    p.add_argument("--arms", default=None, help="comma-separated subset of arm names")
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="pipeline folder (default: the recipe's, the bundled miniature)")
    p.add_argument("--cfg", type=float, default=None, help="vanilla CFG (default: the recipe's validation CFG)")
    p.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                   help="an extra trained arm: its name and recipe overrides as JSON, e.g. "
                        "--variant 'lr 1e-2' '{\"lr\": 0.01}' (recipe variants are compared on validation seeds)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    recipe = f"toy_{a.backbone}"
    base = load_config(recipe)
    cfg5 = a.cfg or base.validation.guidance_scale
    arms = [
        Arm("vanilla", None, note="frozen miniature"),
        Arm(f"vanilla CFG {1.5 * cfg5:g}", None, 1.5 * cfg5, "stronger guidance alone"),
        Arm(f"vanilla CFG {2 * cfg5:g}", None, 2 * cfg5, "stronger guidance alone"),
        Arm("tokens at initialisation", {}, untrained=True,
            note="the recipe's tokens before training (empty-prompt init): what does training add?"),
        Arm("positive-only", POSITIVE_ONLY, note="same tokens, denoising term only, no negatives"),
        Arm("SoftREPA (paper loss)", {"loss": {"tau_schedule": "constant", "tau": 0.07}, "negatives": {"per_image": 0}},
            note="authors' tau 0.07, in-batch negatives"),
        Arm("SoftREPA (calibrated tau)", {"loss": {"tau_schedule": "calibrated"}, "negatives": {"per_image": 0}},
            note="calibrated tau, in-batch negatives"),
        Arm("SoftREPA (recipe)", {}, note=f"recipes/{recipe}.yaml as shipped"),
        Arm("AGSM", AGSM_ARM, note="AGSM (issue 23): psi+ / psi-, EMA-guided targets, official tau 0.1 / gammas, "
                                   "in-batch captions, the recipe's lr and steps"),
        Arm("SoftREPA (calibrated tau + hard negatives)",
            {"loss": {"tau_schedule": "calibrated"}, "negatives": {"per_image": 2, "swap": TOY_SWAPS}},
            note="calibrated tau, 2 hard-negative captions per image"),
    ]
    if a.arms:
        keep = {x.strip() for x in a.arms.split(",")}
        arms = [arm for arm in arms if arm.name in keep or arm.name == "vanilla"]
    arms += [Arm(name, json.loads(ov), note=f"variant: {ov}") for name, ov in a.variant]
    arms = _distinct(arms, recipe)
    seeds = list(VALIDATION_SEEDS if a.split == "validation" else TEST_SEEDS)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model_path(a.model or base.model)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    data = out / "data"
    if not (data / "DONE").is_file():
        export_image_folder(data, a.train_images, seed=0, split="train", write_scenes=False)
        (data / "DONE").write_text("ok\n")
    n_seeds = {"train_pairs": a.seeds or 6, "heldout_pairs": a.seeds or 10}
    sets = {name: (fn(), seeds[:n_seeds[name]]) for name, fn in PROMPT_SETS.items()}
    refs = {name: reference_images(prompts, s, base.resolution) for name, (prompts, s) in sets.items()}
    results: dict = {}
    timing: dict = {}
    for arm in arms:
        t0 = time.perf_counter()
        tokens = None
        if arm.untrained:
            tokens = initial_tokens(pipe, recipe, {**arm.overrides, "model": model}, out / "train" / _slug(arm.name))
        elif arm.overrides is not None:
            tokens = train_arm(pipe, recipe, {**arm.overrides, "model": model}, data, out / "train" / _slug(arm.name))
        t1 = time.perf_counter()
        results[arm.name] = {
            name: judge_arm(pipe, prompts, s, out / "images" / _slug(arm.name) / name, tokens=tokens,
                            cfg=arm.guidance_scale or cfg5, steps=base.validation.steps, size=base.resolution,
                            reference=refs[name], max_sequence_length=sampling_length(pipe, base))
            for name, (prompts, s) in sets.items()}
        timing[arm.name] = {"train_s": round(t1 - t0, 1), "generate_judge_s": round(time.perf_counter() - t1, 1)}
        print(f"{arm.name}: " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in results[arm.name].items())
              + f" ({timing[arm.name]})", flush=True)
    names = list(sets)
    table = comparison_table(results, names)
    n_pairs = {k: len(v[0]) * len(v[1]) for k, v in sets.items()}
    head = (f"# SoftREPA controls — miniature {a.backbone}, {a.split} seeds {seeds[0]}-{seeds[-1]}\n\n"
            f"Pairs per arm: {n_pairs} (prompt x seed), CFG {cfg5:g} unless named, {base.validation.steps} "
            f"sampling steps, recipe `{recipe}` ({base.max_steps} steps, batch {base.batch_size}, "
            f"{base.loss.describe_tau()}, {base.negatives.per_image} hard negatives per image).\n"
            f"Command: `python benchmarks/effect_controls.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    arms_md = "\n".join(f"* **{arm.name}**: {arm.note}" for arm in arms)
    text = f"{head}\n{arms_md}\n\n{table}\n"
    print("\n" + text)
    (out / "controls.md").write_text(text)
    recipe_arm = "SoftREPA (recipe)"
    js = {"results": {k: {s: {kk: vv for kk, vv in v.items()} for s, v in per.items()} for k, per in results.items()},
          "timing": timing, "sets": {k: {"prompts": v[0], "seeds": v[1]} for k, v in sets.items()}}
    if recipe_arm in results:
        js["summary"] = summary(results, names, recipe_arm)
    (out / "controls.json").write_text(json.dumps(js, indent=1))
    return 0


TOY_SWAPS = [["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "cross"]]


def _distinct(arms: list, recipe: str) -> list:
    """Drop a trained arm whose resolved config equals an earlier one's (e.g. the recipe itself)."""
    from softrepa.config import config_dict, load_config

    seen, out = {}, []
    for arm in arms:
        if arm.overrides is not None and not arm.untrained:
            key = repr(config_dict(load_config(recipe, arm.overrides)))
            if key in seen:
                print(f"{arm.name}: same training config as {seen[key]}, not run twice", flush=True)
                continue
            seen[key] = arm.name
        out.append(arm)
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


if __name__ == "__main__":
    sys.exit(main())
