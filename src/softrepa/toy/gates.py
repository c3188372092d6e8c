"""The three gates a miniature must pass before SoftREPA's effect on it means anything.

A null result on a model the tokens cannot move says nothing about the method (docs/effect.md).
So before any token arm sees a test seed, the miniature is measured on validation seeds for:

1. **leverage** (`token_leverage`): can soft tokens move its prediction at all? For two-object
   train-split scenes, one noise draw, t in {300, 600}:
   ``|v(caption, tokens) - v(caption)| / |v(caption) - v(empty prompt)|``, median over images and
   t; for random tokens (m = 4 in the first 5 blocks, N(0, s^2) with s the per-element std of
   the model's own caption embeddings) the best of 5 draws. Gate: >= 0.30.
2. **headroom** (`cfg_sweep`): vanilla two-object alignment at the demo's CFG between 25% and
   75%, held-out compositions below training-distribution ones.
3. **operating point** (`choose_cfg`): the demo's CFG is fixed by a rule stated before any token
   arm is measured: the CFG of the sweep at which the vanilla model's quality proxy (Fréchet
   distance of judge features to real renders, pooled over both prompt sets) is lowest, as a
   real model's default guidance is set for image quality, below the alignment optimum.

`benchmarks/miniature_gates.py` runs all three and writes `gates.json` into the miniature's
folder; `softrepa demo` prints those values and measures its trained tokens' leverage itself.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

LEVERAGE_GATE = 0.30
HEADROOM = (0.25, 0.75)
#: CFG values of the operating-point sweep (the miniature's vanilla curves are reported over them).
CFG_SWEEP = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.5)


def leverage_scenes(n: int = 16, seed: int = 4242) -> list[Any]:
    """n distinct two-object train-split scenes (placed), drawn apart from every prompt set."""
    from .world import WorldDataset

    ds = WorldDataset(40 * n, seed=seed, split="train", p_two=1.0)
    out, seen = [], set()
    for i in range(len(ds)):
        sc = ds.scene(i)
        if sc.spec not in seen:
            seen.add(sc.spec)
            out.append(sc)
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} distinct scenes")


def caption_embedding_std(backbone: Any, prompts: Sequence[str]) -> float:
    """Per-element std of the model's own caption embeddings (text-encoder space), over the
    positions that carry text (all-zero positions, e.g. SD3's absent T5, are left out)."""
    with torch.no_grad():
        emb = backbone.encode_prompts(list(prompts)).embeds.float()  # (B, S, D)
    rows = emb.reshape(-1, emb.shape[-1])
    rows = rows[rows.abs().amax(dim=-1) > 0]
    return float(rows.std())


@torch.no_grad()
def _velocities(backbone: Any, x0: torch.Tensor, noise: torch.Tensor, t: float, cond: Any) -> torch.Tensor:
    tt = torch.full((x0.shape[0],), float(t), device=x0.device)
    return backbone.denoise(backbone.add_noise(x0, noise.expand_as(x0), tt), tt, cond).float()


def token_leverage(pipe: Any, tokens: Sequence[Any] | None = None, *, n_images: int = 16,
                   timesteps: Sequence[float] = (300.0, 600.0), draws: int = 5, num_tokens: int = 4,
                   num_layers: int = 5, max_sequence_length: int = 8, seed: int = 0) -> dict[str, Any]:
    """Leverage of soft tokens on a pipeline's prediction (gate 1; definition in the module doc).

    Args:
        pipe: a loaded pipeline (SD3 family: m tokens in the first `num_layers` blocks; UNets:
            down + mid blocks).
        tokens: `SoftTokens` (or tokens files) to measure; None = `draws` random draws.
        n_images: two-object train-split scenes.
        timesteps: noise levels on the 0..1000 scale.
        draws: random draws (the best counts).
        num_tokens, num_layers: random tokens' layout.
        max_sequence_length: the SD3 family's T5 length (as the recipe trains and samples).
        seed: noise draw and random tokens.
    Returns:
        {"leverage": best (random) or per-file list, "per_draw": [...], "s": token std,
         "n": images x timesteps}.

    Example:
        >>> token_leverage(load_pipeline("@assets/toy_sd3"))["leverage"] >= LEVERAGE_GATE
        True
    """
    from ..artifact import load_soft_tokens
    from ..backbone import backbone_for
    from ..hooks import attach
    from ..tokens import SoftTokens, SoftTokensConfig
    from .world import prompt as canonical_prompt

    bb = backbone_for(pipe, max_sequence_length=max_sequence_length)
    scenes = leverage_scenes(n_images)
    prompts = [canonical_prompt(s) for s in scenes]
    pixels = torch.stack([torch.from_numpy(s.to_array(32)).permute(2, 0, 1).float() / 127.5 - 1 for s in scenes])
    g = torch.Generator().manual_seed(seed)
    x0 = bb.encode_images(pixels.to(bb.device), [torch.Generator().manual_seed(seed + 1 + k) for k in range(len(scenes))])
    noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=g).to(x0.device, x0.dtype)  # one draw, shared
    with torch.no_grad():
        cond = bb.encode_prompts(prompts)
        empty = bb.encode_prompts([""] * len(prompts))
    base = [(_velocities(bb, x0, noise, t, cond), _velocities(bb, x0, noise, t, empty)) for t in timesteps]

    def measure(tok: Any) -> float:
        handle = attach(pipe, tok)
        try:
            ratios = []
            for t, (vc, ve) in zip(timesteps, base):
                vt = _velocities(bb, x0, noise, t, cond)
                ratios += ((vt - vc).flatten(1).norm(dim=1) / (vc - ve).flatten(1).norm(dim=1)).tolist()
        finally:
            handle.remove()
        return float(statistics.median(ratios))

    s = caption_embedding_std(bb, prompts)
    if tokens is not None:
        vals = [measure(load_soft_tokens(t) if isinstance(t, (str, Path)) else t) for t in tokens]
        return {"leverage": vals, "per_draw": vals, "s": s, "n": len(scenes) * len(timesteps)}
    # the config is model-independent: MM-DiT families read num_layers, UNets their default blocks
    cfg = SoftTokensConfig(num_tokens=num_tokens, num_layers=num_layers, time_buckets=0, init="normal")
    per_draw = []
    for k in range(draws):
        tok = SoftTokens.for_model(pipe, cfg, seed=seed + k)
        gk = torch.Generator().manual_seed(10_000 + seed + k)
        with torch.no_grad():
            tok.base.copy_(s * torch.randn(tok.base.shape, generator=gk))
        per_draw.append(measure(tok))
    return {"leverage": max(per_draw), "per_draw": per_draw, "s": s, "n": len(scenes) * len(timesteps)}


def cfg_sweep(pipe: Any, sets: dict[str, Sequence[str]], seeds: Sequence[int], out: Path,
              cfgs: Sequence[float] = CFG_SWEEP, *, steps: int = 20, size: int = 32,
              max_sequence_length: int | None = 8) -> dict[float, dict[str, Any]]:
    """Vanilla alignment and quality proxy per CFG (gates 2 and 3), images kept in `out` (resumable).

    Returns:
        {cfg: {set: judge_arm result}}.
    """
    from .effect import judge_arm, reference_images

    res: dict[float, dict[str, Any]] = {}
    for c in cfgs:
        res[float(c)] = {k: judge_arm(pipe, p, seeds, Path(out) / f"cfg{c:g}" / k, tokens=None, cfg=float(c),
                                      steps=steps, size=size, reference=reference_images(p, seeds, size),
                                      max_sequence_length=max_sequence_length)
                         for k, p in sets.items()}
    return res


def choose_cfg(sweep: dict[float, dict[str, Any]]) -> float:
    """The operating point: the CFG whose vanilla quality proxy (mean over the sets) is lowest."""
    return min(sweep, key=lambda c: sum(r["quality_proxy"] for r in sweep[c].values()) / len(sweep[c]))


def sweep_table(sweep: dict[float, dict[str, Any]], chosen: float | None = None) -> str:
    """Markdown: per CFG, alignment per set and pooled, and the quality proxy."""
    sets = list(next(iter(sweep.values())))
    head = "| CFG | " + " | ".join(f"{s} alignment" for s in sets) + " | pooled alignment | quality proxy (FD, lower better) |"
    lines = [head, "|---|" + "---|" * (len(sets) + 2)]
    for c, per in sweep.items():
        pooled = [o for s in sets for o in per[s]["outcomes"]]
        qp = sum(per[s]["quality_proxy"] for s in sets) / len(sets)
        mark = " (chosen)" if chosen is not None and c == chosen else ""
        lines.append(f"| {c:g}{mark} | " + " | ".join(f"{100 * per[s]['accuracy']:.1f}%" for s in sets)
                     + f" | {100 * sum(pooled) / len(pooled):.1f}% | {qp:.4f} |")
    return "\n".join(lines)


def headroom(per_set: dict[str, Any]) -> dict[str, Any]:
    """Gate 2 from the vanilla results at the chosen CFG."""
    tr, ho = per_set["train_pairs"]["accuracy"], per_set["heldout_pairs"]["accuracy"]
    return {"train_pairs": tr, "heldout_pairs": ho,
            "passed": bool(HEADROOM[0] <= tr <= HEADROOM[1] and ho < tr)}


def gate_lines(gates: dict[str, Any]) -> list[str]:
    """Report lines naming the gates' values (for the demo report and the benchmark)."""
    lev, hr, op = gates["leverage"], gates["headroom"], gates["operating_point"]
    ok = lambda b: "passed" if b else "NOT passed"  # noqa: E731
    return [
        f"* leverage of random tokens (m = 4, first 5 blocks, best of {len(lev['per_draw'])} draws): "
        f"{lev['leverage']:.3f} (gate >= {LEVERAGE_GATE}: {ok(lev['leverage'] >= LEVERAGE_GATE)})",
        f"* headroom, vanilla at CFG {op['cfg']:g}, validation seeds: training-distribution pairs "
        f"{100 * hr['train_pairs']:.1f}%, held-out pairs {100 * hr['heldout_pairs']:.1f}% "
        f"(gate: {100 * HEADROOM[0]:.0f}-{100 * HEADROOM[1]:.0f}%, held-out below: {ok(hr['passed'])})",
        f"* operating point: CFG {op['cfg']:g} = {op['rule']}",
    ]


__all__ = ["CFG_SWEEP", "HEADROOM", "LEVERAGE_GATE", "caption_embedding_std", "cfg_sweep", "choose_cfg", "gate_lines",
           "headroom", "leverage_scenes", "sweep_table", "token_leverage"]
