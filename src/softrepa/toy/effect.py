"""Measuring SoftREPA's effect on a miniature: declared prompt sets, arms, paired statistics.

An *arm* is one way of sampling the same (prompt, seed) pairs: the vanilla model, the model with
tokens trained by some recipe, or the vanilla model at another CFG scale. Every arm is judged by
the world's analytic judge on the same pairs, so two arms compare with McNemar's exact test
(`softrepa.stats`). `softrepa demo` runs three arms (vanilla, positive-only, SoftREPA);
`benchmarks/effect_controls.py` runs all the controls.

Prompt sets (declared here, never chosen by their results):

* `train_pairs`: canonical prompts of the first 60 distinct two-object scenes of the train split
  drawn with seed 777 (the seed `softrepa toy check` uses) — compositions the miniature was
  pretrained on, sampled at new seeds;
* `heldout_pairs`: the 36 declared held-out two-object compositions (`heldout_prompts()`).

Seeds: recipes are chosen on validation seeds (100 and up); results are reported on test seeds
(0 and up), each once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UsageError
from .world import WorldDataset, heldout_prompts, is_heldout, parse_prompt, place_scene
from .world import prompt as canonical_prompt

VALIDATION_SEEDS = tuple(range(100, 110))
TEST_SEEDS = tuple(range(0, 10))


def train_pair_prompts(n: int = 60, seed: int = 777) -> list[str]:
    """Canonical prompts of the first n distinct two-object train-split scenes (seeded)."""
    ds = WorldDataset(50 * n, seed=seed, split="train", canonical=True)
    out: list[str] = []
    for i in range(len(ds)):
        scene = ds.scene(i)
        p = canonical_prompt(scene)
        if len(scene.objects) == 2 and p not in out:
            out.append(p)
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} distinct two-object prompts found")


def heldout_pair_prompts() -> list[str]:
    """The declared held-out two-object prompts."""
    return [p for p in heldout_prompts() if len(parse_prompt(p).objects) == 2]


PROMPT_SETS = {"train_pairs": train_pair_prompts, "heldout_pairs": heldout_pair_prompts}


def training_text_allowed(caption: str) -> bool:
    """Hard negatives must not name a held-out composition (held-out text stays out of training)."""
    try:
        return not is_heldout(parse_prompt(caption))
    except UsageError:
        return False  # not a caption of this world: keep the negatives to world captions


@dataclass
class Arm:
    """One way of sampling the evaluation pairs.

    Args:
        name: label in tables ("vanilla", "positive-only", ...).
        overrides: training-config overrides of the recipe; None = no tokens (the vanilla model).
        guidance_scale: CFG of this arm (None: the recipe's validation CFG).
        note: one line on what the arm controls for.
        untrained: the recipe's tokens at their initialisation, not trained (what training adds).
    """

    name: str
    overrides: dict[str, Any] | None = None
    guidance_scale: float | None = None
    note: str = ""
    untrained: bool = False


POSITIVE_ONLY = {"loss": {"contrastive_weight": 0.0, "denoise_weight": 1.0}, "negatives": {"per_image": 0}}
#: AGSM on the miniature recipe (same tokens, data, lr and steps): in-batch captions only (AGSM has no
#: hard negatives), the official tau 0.1 / gamma_pos 1 / gamma_neg 0.1; EMA decay chosen on
#: validation seeds among 0.9999 (official) and 0.99 (docs/effect.md, "AGSM")
AGSM_ARM = {"objective": "agsm", "negatives": {"per_image": 0}, "agsm": {"ema_decay": 0.99}}


def train_arm(pipe: Any, recipe: str, overrides: dict[str, Any], data: Path, out: Path) -> Path:
    """Train (or reuse) the tokens of one arm; returns the tokens file.

    A folder trained with another config is refused rather than reported under this arm's name.
    """
    import yaml

    from ..config import _merge as merge_overrides
    from ..config import absolute_paths, config_dict, config_diff, load_config
    from ..train import Trainer

    ov = merge_overrides(overrides, {"data": str(data), "output_dir": str(out)})
    cfg = absolute_paths(load_config(recipe, ov))  # as the trainer saves it
    tokens = out / "tokens.safetensors"
    saved = out / "config.yaml"
    if saved.is_file():
        old = yaml.safe_load(saved.read_text())
        new = config_dict(cfg)
        if old.get("loss", {}).get("tau_table") and new["loss"].get("tau_table") is None:
            new["loss"]["tau_table"] = old["loss"]["tau_table"]  # estimated by that run
        changed = config_diff(old, new)
        if changed:
            raise SystemExit(f"{out} was trained with another recipe ({'; '.join(changed[:4])}); "
                             "rerun with --fresh, or choose another --out")
    if not tokens.is_file():
        trainer = Trainer(cfg, pipe=pipe, keep_negative=training_text_allowed)
        # the recipe matched above: continue what a killed run left (from step 0 if it left no checkpoint)
        resume = (out / "config.yaml").is_file()
        try:
            trainer.train(resume=resume or None)
        finally:
            trainer.handle.remove()
    return tokens


def initial_tokens(pipe: Any, recipe: str, overrides: dict[str, Any], out: Path) -> Path:
    """The tokens a run of this recipe starts from (same layout, init and seed), saved untrained."""
    from ..config import load_config
    from ..artifact import save_soft_tokens
    from ..tokens import SoftTokens

    cfg = load_config(recipe, overrides)
    path = out / "tokens.safetensors"
    if not path.is_file():
        save_soft_tokens(SoftTokens.for_model(pipe, cfg.tokens, seed=cfg.seed), path)
    return path


def sampling_length(pipe: Any, cfg: Any) -> int | None:
    """The text length the recipe `cfg` trains with (its `max_sequence_length`, else the family's
    `text_length`) for families that take one, else None."""
    from ..registry import family_of

    family = family_of(pipe)
    return family.resolve_text_length(cfg.max_sequence_length) if family.text_length_option else None


def reference_images(prompts: Sequence[str], seeds: Sequence[int], size: int) -> list[Any]:
    """Real renders of the prompts (one placement per seed) for the Fréchet quality proxy."""
    return [place_scene(parse_prompt(p), np.random.default_rng([s, i, 7])).render(size=size)
            for s in seeds for i, p in enumerate(prompts)]


def judge_arm(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], out: Path, *, tokens: Path | None,
              cfg: float, steps: int, size: int, reference: Sequence[Any], batch_size: int = 40,
              max_sequence_length: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Generate (resumable PNGs in `out`) and judge one arm on every (prompt, seed) pair.

    `max_sequence_length` (SD3 family): sample with the T5 length the tokens were trained with,
    so that the text sequence the tokens share attention with is the one they saw in training.

    Returns:
        {"outcomes": [bool per pair, order (seed, prompt)], "accuracy", "categories", "quality_proxy"}.
    """
    from PIL import Image

    from ..artifact import load_into
    from ..generate import generate_images
    from .metrics import alignment_report, quality_proxy

    handle = load_into(pipe, tokens) if tokens is not None else None
    try:
        rows = generate_images(pipe, prompts, seeds, out, steps=steps, cfg=cfg, height=size, width=size,
                               batch_size=batch_size, tokens=tokens, progress=progress,
                               max_sequence_length=max_sequence_length)
    finally:
        if handle is not None:
            handle.remove()
    by_file = {r["file"]: r for r in rows}
    order = [(i, s) for s in seeds for i in range(len(prompts))]
    from ..generate import image_name

    images, texts = [], []
    for i, s in order:
        row = by_file[image_name(i, s)]
        with Image.open(out / row["file"]) as im:
            images.append(im.convert("RGB"))
        texts.append(prompts[i])
    rep = alignment_report(images, texts, keep_items=True)
    return {"outcomes": [bool(it["all_ok"]) for it in rep["items"]], "accuracy": rep["accuracy"],
            "categories": {k: v["accuracy"] for k, v in rep["categories"].items() if v["n"]},
            "quality_proxy": quality_proxy(images, reference)}


def comparison_table(results: dict[str, dict[str, dict[str, Any]]], sets: Sequence[str],
                     reference: str = "vanilla", control: str | None = "positive-only") -> str:
    """Markdown table: per arm and prompt set, accuracy, delta vs `reference` (CI, McNemar p), vs `control`.

    Args:
        results: {arm: {set: judge_arm result}}; arms in table order.
        sets: prompt-set names; a "pooled" row group concatenates them (same pairs in every arm).
    """
    from ..stats import format_p, paired_comparison, wilson_interval

    head = ("| prompts | arm | alignment (95% CI) | vs vanilla: delta (95% CI), up/down, McNemar p |"
            + (f" vs {control}: delta, p |" if control else "") + " quality proxy (FD, lower better) |")
    lines = [head, "|---|---|---|---|" + ("---|" if control else "") + "---|"]
    groups = list(sets) + (["pooled"] if len(sets) > 1 else [])
    for g in groups:
        for arm, per_set in results.items():
            outcomes = _outcomes(per_set, sets, g)
            ref = _outcomes(results[reference], sets, g)
            n, k = len(outcomes), sum(outcomes)
            lo, hi = wilson_interval(k, n)
            cells = [g, arm, f"{100 * k / n:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"]
            if arm == reference:
                cells.append("-")
            else:
                c = paired_comparison(ref, outcomes)
                cells.append(f"{100 * c['delta']:+.1f} pts ({100 * c['delta_ci95'][0]:+.1f}, "
                             f"{100 * c['delta_ci95'][1]:+.1f}), {c['b_only']}/{c['a_only']}, p = {format_p(c['p_mcnemar'])}")
            if control:
                if control in results and arm not in (control, reference):
                    c = paired_comparison(_outcomes(results[control], sets, g), outcomes)
                    cells.append(f"{100 * c['delta']:+.1f} pts, p = {format_p(c['p_mcnemar'])}")
                else:
                    cells.append("-")
            qp = [per_set[s]["quality_proxy"] for s in (sets if g == "pooled" else [g])]
            cells.append(f"{np.mean(qp):.4f}" + (" (mean)" if g == "pooled" else ""))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: dict[str, dict[str, dict[str, Any]]], sets: Sequence[str], arm: str,
            reference: str = "vanilla", control: str | None = "positive-only") -> dict[str, Any]:
    """Pooled paired comparison of `arm` against the reference and the control (for reports / JSON)."""
    from ..stats import paired_comparison

    out = {"vs_" + reference: paired_comparison(_outcomes(results[reference], sets, "pooled"),
                                                _outcomes(results[arm], sets, "pooled"))}
    if control and control in results:
        out["vs_" + control] = paired_comparison(_outcomes(results[control], sets, "pooled"),
                                                 _outcomes(results[arm], sets, "pooled"))
    qa = np.mean([results[reference][s]["quality_proxy"] for s in sets])
    qb = np.mean([results[arm][s]["quality_proxy"] for s in sets])
    out["quality_proxy_change"] = float(qb / qa - 1.0)
    return out


def _outcomes(per_set: dict[str, dict[str, Any]], sets: Sequence[str], group: str) -> list[bool]:
    if group == "pooled":
        return [o for s in sets for o in per_set[s]["outcomes"]]
    return list(per_set[group]["outcomes"])


__all__ = ["Arm", "POSITIVE_ONLY", "PROMPT_SETS", "TEST_SEEDS", "VALIDATION_SEEDS", "comparison_table",
           "heldout_pair_prompts", "initial_tokens", "judge_arm", "reference_images", "sampling_length", "summary", "train_arm",
           "train_pair_prompts", "training_text_allowed"]
