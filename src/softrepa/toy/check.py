"""Judge a text-to-image pipeline on the miniature world: train-distribution vs held-out prompts.

Generation goes through the stock diffusers pipeline (`DiffusionPipeline.from_pretrained` or
an in-memory one), so what is measured is what a user gets. Three prompt sets:

* ``train_single``: canonical one-object prompts of train-split scenes (colour-shape pairings
  and positions the model saw) - a model of this world must get these right;
* ``train_pair``: canonical two-object prompts of train-split scenes (seen compositions);
* ``heldout``: `heldout_prompts()` - held-out colour-shape pairings and two-object
  compositions, which a small model gets partly wrong (room for alignment work).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from .metrics import alignment_report
from .world import WorldDataset, heldout_prompts, prompt

#: Sampling settings per pipeline class: (steps, guidance scale).
DEFAULT_SAMPLING = {"StableDiffusion3Pipeline": (20, 4.5), "StableDiffusionPipeline": (20, 6.0)}


def train_prompts(n: int, seed: int = 777, two_objects: bool = False) -> list[str]:
    """Canonical prompts of n train-split scenes (one-object, or two-object).

    Args:
        n: number of prompts.
        seed: dataset seed (not the training data's; prompts repeat, the split's vocabulary is small).
        two_objects: two-object scenes instead of one-object ones.
    """
    ds = WorldDataset(n, seed, "train", p_two=1.0 if two_objects else 0.0)
    return [prompt(ds.scene(i)) for i in range(n)]


def load_pipeline(path: str):
    """Load a saved pipeline folder with the stock `DiffusionPipeline.from_pretrained` (CPU, fp32)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)  # the folders hold fp32 weights
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seed: int = 0, steps: int | None = None,
             guidance_scale: float | None = None, batch_size: int = 64, size: int = 32,
             **kwargs) -> list:
    """Images for prompts with the stock pipeline call; batch b uses generator seed + b.

    Args:
        pipe: a diffusers text-to-image pipeline.
        prompts: prompts, one image each.
        seed: base generator seed.
        steps: denoising steps (default per pipeline class, `DEFAULT_SAMPLING`).
        guidance_scale: CFG scale (default per pipeline class).
        batch_size: prompts per pipeline call.
        size: image side in pixels.
        **kwargs: passed to the pipeline call (e.g. max_sequence_length for SD3).
    Returns:
        PIL images.
    """
    d_steps, d_cfg = DEFAULT_SAMPLING.get(type(pipe).__name__, (20, 5.0))
    steps = steps or d_steps
    guidance_scale = d_cfg if guidance_scale is None else guidance_scale
    out = []
    for b, i in enumerate(range(0, len(prompts), batch_size)):
        g = torch.Generator().manual_seed(seed + b)
        out += pipe(list(prompts[i:i + batch_size]), num_inference_steps=steps, guidance_scale=guidance_scale,
                    height=size, width=size, generator=g, **kwargs).images
    return out


def _summary(report: dict) -> dict:
    cats = {k: round(v["accuracy"], 4) for k, v in report["categories"].items() if v["n"]}
    kinds = {k: {"n": v["n"], "accuracy": round(v["accuracy"], 4)} for k, v in report["by_kind"].items() if v["n"]}
    return {"n": report["n"], "accuracy": round(report["accuracy"], 4), "categories": cats, "by_kind": kinds}


def check_pipeline(pipe, n_single: int = 64, n_pair: int = 64, seeds: Sequence[int] = (0,),
                   steps: int | None = None, guidance_scale: float | None = None, **kwargs) -> dict:
    """Judge's alignment accuracy of a pipeline on train-distribution and held-out prompts.

    Args:
        pipe: a diffusers text-to-image pipeline.
        n_single: number of train-distribution one-object prompts.
        n_pair: number of train-distribution two-object prompts (0 = skip).
        seeds: generation seeds; each prompt set is generated once per seed.
        steps, guidance_scale, **kwargs: sampling settings (see `generate`).
    Returns:
        {set_name: {"n", "accuracy", "categories", "by_kind"}, "seconds": generation + judging time,
         "steps", "guidance_scale"}.
    """
    sets = {"train_single": train_prompts(n_single), "heldout": heldout_prompts()}
    if n_pair:
        sets["train_pair"] = train_prompts(n_pair, two_objects=True)
    t0 = time.perf_counter()
    result: dict = {}
    for name, prompts in sets.items():
        images, scored = [], []
        for seed in seeds:
            images += generate(pipe, prompts, seed=seed, steps=steps, guidance_scale=guidance_scale, **kwargs)
            scored += prompts
        result[name] = _summary(alignment_report(images, scored))
    d_steps, d_cfg = DEFAULT_SAMPLING.get(type(pipe).__name__, (20, 5.0))
    result["steps"] = steps or d_steps
    result["guidance_scale"] = d_cfg if guidance_scale is None else guidance_scale
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def format_check(result: dict, title: str = "") -> str:
    """Human-readable table of a `check_pipeline` result."""
    lines = [title] if title else []
    lines.append(f"sampling: {result['steps']} steps, CFG {result['guidance_scale']}, {result['seconds']} s")
    for name in ("train_single", "train_pair", "heldout"):
        if name not in result:
            continue
        r = result[name]
        cats = ", ".join(f"{k} {v:.2f}" for k, v in r["categories"].items())
        lines.append(f"  {name:<13} n={r['n']:<4} all-attributes accuracy {r['accuracy']:.3f}   ({cats})")
        if len(r.get("by_kind", {})) > 1:
            kinds = ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in r["by_kind"].items())
            lines.append(f"  {'':<13} by kind: {kinds}")
    return "\n".join(lines)


def sample_grid(images: Sequence, cols: int = 8, pad: int = 2, scale: int = 3):
    """Tile PIL images into one PIL image (a quick visual check of generations).

    Args:
        images: equally sized PIL images.
        cols: images per row.
        pad: white pixels between tiles.
        scale: nearest-neighbour upscaling of the result (32x32 tiles are hard to see).
    """
    from PIL import Image

    arrs = [np.asarray(im.convert("RGB")) for im in images]
    h, w, _ = arrs[0].shape
    rows = (len(arrs) + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k, a in enumerate(arrs):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a
    out = Image.fromarray(grid)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


__all__ = ["DEFAULT_SAMPLING", "check_pipeline", "format_check", "generate", "load_pipeline",
           "sample_grid", "train_prompts"]
