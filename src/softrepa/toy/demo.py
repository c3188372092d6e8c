"""`softrepa demo`: SoftREPA's effect end to end on the bundled miniature, offline, on a CPU.

Stages (each one the project's ordinary code path, run on an ordinary diffusers folder):
1. load the bundled tiny pipeline with the stock `from_pretrained`;
2. render the world's training split (clean captions) into an image folder with .txt captions;
3. train soft tokens with `softrepa.train.Trainer` and the miniature recipe
   (`recipes/toy_<backbone>.yaml`), and the positive-only control (same recipe, denoising term
   only: does the *contrastive* part matter?), and with `--agsm` AGSM, SoftREPA's successor;
4. sample the same (prompt, seed) pairs of two-object prompts — training-distribution and
   declared held-out compositions, test seeds — with each arm (`softrepa.toy.effect`);
5. judge every image with the world's analytic judge, compare the arms pair by pair (McNemar's
   exact test, paired confidence intervals) and against real renders (Fréchet quality proxy);
6. print the table and write `demo_out/report.md` with the grid and the training curves.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_SEEDS = "0-4"
#: prompts per set: 36 held-out + the first 36 training-distribution pairs = 72 x 5 seeds = 360 pairs per arm
DEMO_PROMPTS_PER_SET = 36


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", choices=["sd3", "sd15"], default="sd3", help="which bundled miniature")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled miniature)")
    p.add_argument("--train-images", type=int, default=2000, help="training images rendered from the world")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="generation (test) seeds per prompt (e.g. 0-4)")
    p.add_argument("--max-steps", type=int, default=None, help="override the recipe's training steps")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first (default: resume)")
    p.add_argument("--max-prompts", type=int, default=None,
                   help="only the first N prompts of each set (smoke tests; the reported table uses 36 each)")
    p.add_argument("--agsm", action="store_true",
                   help="also train and judge AGSM (softrepa.toy.effect.AGSM_ARM: psi+ / psi-, EMA-guided targets); "
                        "about 2 more minutes on 2 CPU cores, which is why the default demo leaves it out")
    p.set_defaults(accepts_overrides=True, overrides=[])
    p.epilog = "Extra --key value pairs override the training recipe (e.g. --loss.tau 0.1)."


class StageTimer:
    """Wall time per stage, printed and kept for the report."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()
                print(f"\n== {name}", flush=True)

            def __exit__(self, *exc):
                timer.rows.append((name, time.perf_counter() - self.t0))

        return _Ctx()


def run_demo(args: argparse.Namespace) -> int:
    from ..pipeline import load_pipeline
    from ..config import _merge as merge_overrides
    from ..config import load_config, parse_overrides
    from ..prompts import parse_seeds
    from .effect import (AGSM_ARM, POSITIVE_ONLY, heldout_pair_prompts, judge_arm, reference_images, sampling_length,
                         train_arm, train_pair_prompts)
    from .world import export_image_folder

    from diffusers.utils import logging as dlogging

    # The miniature's all-zero stand-in T5 makes diffusers warn about truncation on every
    # prompt with the recipe's short max_sequence_length; the zeros are the same either way.
    dlogging.set_verbosity_error()
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else ASSETS / f"toy_{args.backbone}"
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"bundled miniature {model_dir} is missing; build it with `softrepa toy pretrain`")
    timer = StageTimer()
    seeds = parse_seeds(args.seeds)
    n = args.max_prompts or DEMO_PROMPTS_PER_SET
    sets = {"train_pairs": train_pair_prompts()[:n], "heldout_pairs": heldout_pair_prompts()[:n]}

    with timer("load the bundled pipeline (stock from_pretrained)"):
        pipe = load_pipeline(str(model_dir))
    with timer(f"render {args.train_images} training images of the world"):
        data = out / "data"
        if not (data / "DONE").is_file():
            export_image_folder(data, args.train_images, seed=0, split="train", write_scenes=False)
            (data / "DONE").write_text("ok\n")
    overrides = parse_overrides(args.overrides)
    overrides["model"] = str(model_dir)
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    recipe = f"toy_{args.backbone}"
    cfg = load_config(recipe, {**overrides, "data": str(data), "output_dir": str(out / "train")})
    arms = {"vanilla": None, "positive-only": None, "SoftREPA": None}
    with timer(f"train SoftREPA tokens ({cfg.max_steps} steps, batch {cfg.batch_size}, {cfg.loss.tau_schedule} tau, "
               f"{cfg.negatives.per_image} hard negatives per image)"):
        arms["SoftREPA"] = train_arm(pipe, recipe, overrides, data, out / "train")
    with timer("train the positive-only control (same recipe, denoising term only)"):
        arms["positive-only"] = train_arm(pipe, recipe, merge_overrides(overrides, POSITIVE_ONLY), data,
                                          out / "train_positive_only")
    if getattr(args, "agsm", False):
        with timer("train AGSM (psi+ / psi-, EMA-guided targets; same data, lr and steps)"):
            arms["AGSM"] = train_arm(pipe, recipe, merge_overrides(overrides, AGSM_ARM), data, out / "train_agsm")
    n_pairs = sum(len(p) for p in sets.values()) * len(seeds)
    results: dict[str, dict[str, Any]] = {}
    with timer(f"generate and judge {n_pairs} (prompt, seed) pairs x {len(arms)} arms"):
        for name, tokens in arms.items():
            results[name] = {
                key: judge_arm(pipe, prompts, seeds, out / "generate" / _slug(name) / key, tokens=tokens,
                               cfg=cfg.validation.guidance_scale, steps=cfg.validation.steps, size=cfg.resolution,
                               reference=reference_images(prompts, seeds, cfg.resolution),
                               max_sequence_length=sampling_length(pipe, cfg))
                for key, prompts in sets.items()}
    from .effect import comparison_table, summary

    with timer("leverage of the trained tokens (gate 1's measure)"):
        gates = _gates(pipe, model_dir, cfg, arms)
    table = comparison_table(results, list(sets))
    headline = summary(results, list(sets), "SoftREPA")
    if "AGSM" in results:
        headline["agsm"] = summary(results, list(sets), "AGSM")
    print("\n" + table)
    print("\n" + "\n".join(gates))
    _report(out, args, cfg, sets, seeds, results, table, headline, timer.rows, gates)
    print("\n" + _headline(headline))
    print(f"\nreport: {out / 'report.md'}")
    return 0


def _gates(pipe: Any, model_dir: Path, cfg: Any, arms: dict[str, Any]) -> list[str]:
    """Report lines: the model's gates as measured on validation seeds (its `gates.json`, written
    by benchmarks/miniature_gates.py), and the leverage of the tokens this demo trained."""
    from .effect import sampling_length
    from .gates import gate_lines, token_leverage

    lines = []
    saved = model_dir / "gates.json"
    if saved.is_file():
        lines += gate_lines(json.loads(saved.read_text()))
    else:
        lines.append(f"* gates: {saved} not found (measure them with benchmarks/miniature_gates.py)")
    trained = {k: v for k, v in arms.items() if v is not None}
    lev = token_leverage(pipe, list(trained.values()), max_sequence_length=sampling_length(pipe, cfg))
    lines.append("* leverage of the tokens trained here: " + ", ".join(
        f"{name} {v:.3f}" for name, v in zip(trained, lev["leverage"])))
    return lines


def _headline(h: dict[str, Any]) -> str:
    from ..stats import format_p

    v, c = h["vs_vanilla"], h.get("vs_positive-only")
    line = (f"SoftREPA vs vanilla: {100 * v['acc_a']:.1f}% -> {100 * v['acc_b']:.1f}% "
            f"({100 * v['delta']:+.1f} pts, 95% CI {100 * v['delta_ci95'][0]:+.1f} to {100 * v['delta_ci95'][1]:+.1f}; "
            f"{v['b_only']} pairs better, {v['a_only']} worse; McNemar p = {format_p(v['p_mcnemar'])}; n = {v['n']})")
    if c:
        line += (f"\nSoftREPA vs the positive-only control: {100 * c['delta']:+.1f} pts "
                 f"(McNemar p = {format_p(c['p_mcnemar'])})")
    line += f"\nquality proxy (Fréchet distance to real renders) change vs vanilla: {100 * h['quality_proxy_change']:+.1f}%"
    if h.get("agsm"):
        a, ap = h["agsm"]["vs_vanilla"], h["agsm"].get("vs_positive-only")
        line += (f"\nAGSM vs vanilla: {100 * a['acc_a']:.1f}% -> {100 * a['acc_b']:.1f}% ({100 * a['delta']:+.1f} pts, "
                 f"{a['b_only']} better, {a['a_only']} worse; McNemar p = {format_p(a['p_mcnemar'])})"
                 + (f"; vs positive-only {100 * ap['delta']:+.1f} pts (p = {format_p(ap['p_mcnemar'])})" if ap else ""))
    return line


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def _report(out: Path, args: argparse.Namespace, cfg: Any, sets: dict[str, list[str]], seeds: list[int],
            results: dict[str, Any], table: str, headline: dict[str, Any], stages: list[tuple[str, float]],
            gates: list[str]) -> None:
    legend = _grid(out, sets, seeds, results)
    import yaml

    saved = out / "train" / "config.yaml"
    table_ = (yaml.safe_load(saved.read_text()).get("loss") or {}).get("tau_table") if saved.is_file() else None
    tau = (f"calibrated tau {min(table_):.2f}-{max(table_):.2f} over {len(table_)} timestep bins"
           if table_ else cfg.loss.describe_tau())
    curves = out / "train" / "curves.png"
    if curves.is_file():
        shutil.copy(curves, out / "curves.png")
    n = {k: len(v) for k, v in sets.items()}
    lines = [
        f"# softrepa demo — miniature {args.backbone}", "",
        f"Two-object prompts: {n['train_pairs']} training-distribution compositions (`train_pairs`) and "
        f"{n['heldout_pairs']} declared held-out compositions (`heldout_pairs`), seeds {seeds[0]}-{seeds[-1]} (test "
        f"seeds; the recipe was chosen on validation seeds 100-109), {cfg.validation.steps} steps, CFG "
        f"{cfg.validation.guidance_scale:g}; every arm samples the same (prompt, seed) pairs.",
        f"SoftREPA: recipe `toy_{args.backbone}` ({cfg.max_steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, "
        f"{tau}, scale {cfg.loss.scale:g}, {cfg.tokens.num_tokens} tokens x "
        f"{cfg.tokens.num_layers} layers, {cfg.negatives.per_image} hard-negative captions per image). "
        "Positive-only: the same tokens, recipe and data, trained on the denoising term alone "
        "(loss.contrastive_weight 0, loss.denoise_weight 1).", "",
        "**" + _headline(headline).replace("\n", "**  \n**") + "**", "",
        table, "",
        "Gates of the miniature (docs/effect.md; validation seeds, measured before any token arm saw a test seed):", "",
        *gates, "",
        "Alignment: share of images whose every prompt attribute (both colours, both shapes, both bindings, "
        "the relation) the analytic judge reads correctly; 95% CI: Wilson (arm), Newcombe (paired delta); "
        "up/down: pairs the arm gets right and vanilla wrong / the reverse; quality proxy: Fréchet distance of "
        "judge features to real renders of the same prompts (lower is better).", "",
        "| stage | wall time (s) |", "|---|---|",
        *[f"| {name} | {sec:.1f} |" for name, sec in stages], "",
        "![grid](grid.png)", "",
        "Grid: the first held-out prompts, seeds in columns; per prompt the rows are vanilla, positive-only, "
        "SoftREPA (same seed = same starting noise). Green / red corner: the judge's verdict.", "",
        *legend, "", *(["![flips](flips.png)", ""] if (out / "flips.png").is_file() else []),
        "![training curves](curves.png)", "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    js = {"results": results, "summary": headline, "stages": stages, "gates": gates,
          "sets": {k: {"prompts": v, "seeds": seeds} for k, v in sets.items()}}
    (out / "results.json").write_text(json.dumps(js, indent=2, default=str))


def _cell(out: Path, arm: str, key: str, k: int, s: int, ok: bool) -> Any:
    from PIL import Image, ImageDraw

    from ..generate import image_name

    with Image.open(out / "generate" / _slug(arm) / key / image_name(k, s)) as im:
        cell = im.convert("RGB").resize((96, 96), Image.NEAREST)
    ImageDraw.Draw(cell).rectangle([0, 0, 9, 9], fill=(30, 160, 60) if ok else (210, 40, 40))
    return cell


def _grid(out: Path, sets: dict[str, list[str]], seeds: list[int], results: dict[str, Any]) -> list[str]:
    """grid.png: fixed picks (the first held-out prompts, first 4 seeds), never chosen by outcome;
    flips.png: every pair on which vanilla and SoftREPA disagree (up to 24), all three arms.

    Returns the legend lines (prompt numbers -> prompts) for the report.
    """
    from ..viz import image_grid

    key = "heldout_pairs"
    prompts = sets[key]
    cols = seeds[:4]
    rows, labels = [], []
    for k in range(min(6, len(prompts))):
        for name in results:
            rows.append([_cell(out, name, key, k, s, results[name][key]["outcomes"][seeds.index(s) * len(prompts) + k])
                         for s in cols])
            labels.append(f"#{k} {name}")
    image_grid(rows, labels, [f"seed {s}" for s in cols]).save(out / "grid.png")
    legend = [f"* #{k}: {prompts[k]}" for k in range(min(6, len(prompts)))]
    flips = []
    for set_name, set_prompts in sets.items():
        van, sr = results["vanilla"][set_name]["outcomes"], results["SoftREPA"][set_name]["outcomes"]
        for j, (a, b) in enumerate(zip(van, sr)):
            if a != b:
                s, k = seeds[j // len(set_prompts)], j % len(set_prompts)
                flips.append((set_name, k, s, b))
    if flips:
        cells = [[_cell(out, name, st, k, s, results[name][st]["outcomes"][seeds.index(s) * len(sets[st]) + k])
                  for name in results] for st, k, s, _ in flips[:24]]
        flip_labels = [f"{'better' if up else 'worse'}: {st.split('_')[0]} #{k} s{s}" for st, k, s, up in flips[:24]]
        image_grid(cells, flip_labels, list(results)).save(out / "flips.png")
        legend.append(f"* flips.png: the {len(flips)} pair(s) where SoftREPA and vanilla disagree"
                      + (" (first 24 shown)" if len(flips) > 24 else "") + "; columns: " + ", ".join(results))
    return legend
