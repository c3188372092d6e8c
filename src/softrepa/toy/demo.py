"""`softrepa demo`: SoftREPA end to end on the bundled miniature, offline, on a CPU, in minutes.

Stages (each one the project's ordinary code path, run on an ordinary diffusers folder):
1. load the bundled tiny pipeline with the stock `from_pretrained`;
2. render the world's training split into an image folder with .txt captions;
3. train soft tokens with `softrepa.train.Trainer` and the scaled-down paper recipe
   (`recipes/toy_<backbone>.yaml`);
4. generate the declared held-out prompts without and with the tokens, same seeds and CFG
   (`softrepa.sample.generate_comparison`);
5. judge both sets with the evaluator's `world` metrics and the Fréchet quality proxy against
   real renders of the same prompts;
6. print the before / after table and write `demo_out/report.md` with the grid and the curves.
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
DEFAULT_SEEDS = "0-3"


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", choices=["sd3", "sd15"], default="sd3", help="which bundled miniature")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled miniature)")
    p.add_argument("--train-images", type=int, default=2000, help="training images rendered from the world")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="generation seeds per held-out prompt (e.g. 0-3)")
    p.add_argument("--max-steps", type=int, default=None, help="override the recipe's training steps")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first (default: resume)")
    p.add_argument("--max-prompts", type=int, default=None,
                   help="only the first N held-out prompts (smoke tests; the reported table uses all)")
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
    from ..backbones import load_pipeline
    from ..config import load_config, parse_overrides
    from ..sample import generate_comparison, parse_seeds
    from ..train import Trainer
    from .world import export_image_folder, heldout_prompts, heldout_scenes

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
    prompts = heldout_prompts()[: args.max_prompts] if args.max_prompts else heldout_prompts()

    with timer("load the bundled pipeline (stock from_pretrained)"):
        pipe = load_pipeline(str(model_dir))
    with timer(f"render {args.train_images} training images of the world"):
        data = out / "data"
        if not (data / "DONE").is_file():
            export_image_folder(data, args.train_images, seed=0, split="train", write_scenes=False)
            (data / "DONE").write_text("ok\n")
    overrides = parse_overrides(args.overrides)
    overrides.update({"model": str(model_dir), "data": str(data), "output_dir": str(out / "train")})
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    cfg = load_config(f"toy_{args.backbone}", overrides)
    with timer(f"train soft tokens ({cfg.max_steps} steps, batch {cfg.batch_size})"):
        tokens_file = out / "train" / "tokens.safetensors"
        _check_same_recipe(out / "train" / "config.yaml", cfg)
        if not tokens_file.is_file():
            trainer = Trainer(cfg, pipe=pipe)
            resume = (out / "train" / "checkpoints" / "latest").is_file()
            trainer.train(resume=resume or None)
            trainer.handle.remove()
    gen = out / "generate"
    with timer(f"generate {len(prompts)} held-out prompts x {len(seeds)} seeds, without / with tokens"):
        generate_comparison(pipe, prompts, seeds, gen, tokens=tokens_file, steps=cfg.validation.steps,
                            cfg=cfg.validation.guidance_scale, height=cfg.resolution, width=cfg.resolution,
                            batch_size=len(seeds) * 4)
    with timer("judge both sets (world metrics + quality proxy vs real renders)"):
        ref = out / "reference"
        if not (ref / "DONE").is_file():
            _render_reference(ref, heldout_scenes, seeds, cfg.resolution, len(prompts))
        results = {name: _world_metrics(gen / name, ref, out / "evaluate" / name) for name in ("vanilla", "tokens")}
    table = _table(results)
    print("\n" + table)
    _report(out, args, cfg, prompts, seeds, results, table, timer.rows, gen)
    print(f"\nreport: {out / 'report.md'}")
    return 0


def _check_same_recipe(saved: Path, cfg: Any) -> None:
    """Refuse to reuse / resume a training folder that was made with another recipe.

    Without --fresh the demo continues what is in its output folder; after a recipe change (or
    different overrides) that would report old tokens under the new recipe's name.
    """
    if not saved.is_file():
        return
    import yaml

    from ..config import config_dict, config_diff

    changed = config_diff(yaml.safe_load(saved.read_text()), config_dict(cfg))
    if changed:
        raise SystemExit(f"{saved.parent} was trained with another recipe ({'; '.join(changed[:5])}); "
                         "rerun with --fresh, or choose another --out")


def _render_reference(ref: Path, heldout_scenes: Any, seeds: list[int], size: int, n: int) -> None:
    """Real renders of the held-out scenes (one layout per seed) for the quality proxy."""
    ref.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for i, scene in enumerate(heldout_scenes(seed=seed)[:n]):
            scene.render(size=size).save(ref / f"{i:05d}_s{seed}.png")
    (ref / "DONE").write_text("ok\n")


def _world_metrics(images_dir: Path, reference: Path, out: Path) -> dict[str, Any]:
    """The evaluator's `world` metrics (the same code `softrepa evaluate --metrics world` runs)."""
    from ..evaluate import evaluate

    res = evaluate(images_dir, out, metrics=["world"], reference=reference, progress=False)
    if res.get("errors"):
        raise RuntimeError(f"world metrics failed: {res['errors']}")
    return res["metrics"]["world"]


def _table(results: dict[str, dict[str, Any]]) -> str:
    """Before / after markdown table from the two evaluations.

    Rows for a category or prompt kind with no prompts (n = 0 on either side, e.g. no two-object
    prompt among a smoke run's first few) are left out: their accuracy is NaN ("nan%").

    Args:
        results: {"vanilla": world metrics, "tokens": world metrics}, each as `softrepa evaluate`
            records them (accuracy, categories / by_kind {name: {n, accuracy}}, quality_proxy).
    """
    a, b = results["vanilla"], results["tokens"]
    rows = ["| held-out prompts | vanilla | + SoftREPA tokens | delta |", "|---|---|---|---|",
            f"| alignment accuracy (all attributes) | {100 * a['accuracy']:.1f}% | {100 * b['accuracy']:.1f}% "
            f"| {100 * (b['accuracy'] - a['accuracy']):+.1f} pts |"]
    for group, label in (("categories", "{} (n={})"), ("by_kind", "{}-object prompts (n={})")):
        for name, ta in a[group].items():
            tb = b[group].get(name, {"n": 0})
            if not ta["n"] or not tb["n"]:
                continue
            rows.append(f"| {label.format(name, ta['n'])} | {100 * ta['accuracy']:.1f}% | {100 * tb['accuracy']:.1f}% "
                        f"| {100 * (tb['accuracy'] - ta['accuracy']):+.1f} pts |")
    qa, qb = a.get("quality_proxy"), b.get("quality_proxy")
    if qa is not None and qb is not None:
        rows.append(f"| quality proxy: Fréchet distance to real renders (lower is better) | {qa:.4f} | {qb:.4f} "
                    f"| {qb - qa:+.4f} ({100 * (qb - qa) / max(qa, 1e-12):+.1f}%) |")
    return "\n".join(rows)


def _report(out: Path, args: argparse.Namespace, cfg: Any, prompts: list[str], seeds: list[int],
            results: dict[str, Any], table: str, stages: list[tuple[str, float]], gen: Path) -> None:
    from PIL import Image

    from ..viz import image_grid

    picks = list(range(0, len(prompts), max(1, len(prompts) // 8)))[:8]
    rows, labels = [], []
    for k in picks:
        for name in ("vanilla", "tokens"):
            rows.append([Image.open(gen / name / f"{k:05d}_s{s}.png").convert("RGB") for s in seeds])
            labels.append(f"{name}: {prompts[k][:40]}")
    image_grid(rows, labels, [f"seed {s}" for s in seeds]).save(out / "grid.png")
    curves = out / "train" / "curves.png"
    if curves.is_file():
        shutil.copy(curves, out / "curves.png")
    lines = [
        f"# softrepa demo — miniature {args.backbone}", "",
        f"Held-out prompts: {len(prompts)} (declared in `softrepa.toy.world.heldout_prompts`), seeds {seeds}, "
        f"{cfg.validation.steps} steps, CFG {cfg.validation.guidance_scale}, same seeds with and without tokens.",
        f"Training: recipe `toy_{args.backbone}` ({cfg.max_steps} steps, batch {cfg.batch_size}, lr {cfg.lr}, "
        f"{cfg.loss.describe_tau()}, scale {cfg.loss.scale}, {cfg.tokens.num_tokens} tokens).", "",
        table, "",
        "Alignment accuracy: share of images whose every prompt attribute the judge reads correctly; "
        "quality proxy: Fréchet distance of judge features to real renders of the same prompts (lower is better).", "",
        "| stage | wall time (s) |", "|---|---|",
        *[f"| {name} | {sec:.1f} |" for name, sec in stages], "",
        "![grid](grid.png)", "", "![training curves](curves.png)", "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"results": results, "stages": stages}, indent=2, default=str))
