"""Shared pieces of the miniature pretraining: world data in memory, tokens, schedules, EMA, timing.

The miniature pipelines (`pretrain.py`) are trained from scratch on the world's train split on a
small CPU. Everything here serves that: images are rendered once into a uint8 tensor (rendering
is cheaper than decoding files and keeps the run self-contained), captions are redrawn every
step from the scene with the world's own caption templates (more text variety at no cost),
prompts are tokenized once per distinct string, and the learning rate, EMA and timing helpers
keep the three training loops short and alike.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UsageError
from .world import INVERSE, POSITION_PHRASES, RELATION_PHRASES, Scene, WorldDataset, caption, is_heldout

#: Token budget of the miniature CLIP tokenizers: the longest caption the world's templates can
#: produce is 54 character tokens (BOS/EOS included); 64 leaves room for a few extra words.
TOKENIZER_MAX_LENGTH = 64


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU) so a pretraining run is a function of its seed.

    Args:
        seed: the run's seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(n: int | None) -> None:
    """Pin torch's intra-op threads.

    On a small shared machine one thread per process is the robust choice: with other jobs
    running, OpenMP workers spin-wait on each other and two threads measured 2-10x *slower* than
    one on this 2-core box (see benchmarks/toy_pretrain.md).

    Args:
        n: thread count; None leaves torch's default.
    """
    if n:
        torch.set_num_threads(int(n))


def autocast(enabled: bool):
    """bf16 autocast on CPU (about 2x faster matmuls/convs here), or a no-op context.

    Weights, optimiser state and losses stay fp32; only the forward's matmuls run in bf16.

    Args:
        enabled: whether to autocast.
    """
    if enabled:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class WorldImages:
    """Train-split world scenes rendered once into memory, with captions redrawn per draw.

    Args:
        n: number of scenes (item i is `WorldDataset(n, seed, "train")[i]`).
        seed: dataset seed.
        size: image side in pixels.
        p_two: probability of a two-object scene.
        caption_noise: share of two-object captions drawn for a corrupted scene (`web_noise`):
            the "alt-text" noise of web-scale pretraining data, which SoftREPA's clean captions
            then correct (0: every caption describes its image).
    """

    def __init__(self, n: int, seed: int, size: int = 32, p_two: float = 0.5, caption_noise: float = 0.0):
        if not 0.0 <= caption_noise <= 1.0:
            raise UsageError(f"caption_noise must be in [0, 1], got {caption_noise}")
        self.caption_noise = float(caption_noise)
        ds = WorldDataset(n, seed, "train", size, p_two=p_two)
        self.scenes = [ds.scene(i) for i in range(n)]
        arr = np.stack([s.to_array(size) for s in self.scenes])  # (N, H, W, 3) uint8
        self.pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.scenes)

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        """Images idx as float in [-1, 1], (B, 3, H, W): the range diffusers VAEs work in."""
        return self.pixels[idx].float() / 127.5 - 1.0

    def captions(self, idx: torch.Tensor, rng: np.random.Generator, drop: float = 0.0,
                 omit_share: float = 0.0) -> list[str]:
        """A fresh random caption per item; with probability `drop` the empty prompt instead.

        The empty prompt is exactly what the stock pipelines encode as the negative prompt, so
        training on it is what makes classifier-free guidance work at sampling time.

        Args:
            idx: item indices.
            rng: numpy generator for the templates and the dropout.
            drop: caption-dropout probability.
            omit_share: probability that the caption leaves one attribute or the relation out
                (`omit`: web-like incomplete captions, never a wrong one).
        """
        out = []
        for i in idx.tolist():
            if rng.random() < drop:
                out.append("")
                continue
            scene = self.scenes[i]
            # only draw from rng when noise is on: noise 0 keeps the caption stream of older bundles
            if self.caption_noise and len(scene.objects) == 2 and rng.random() < self.caption_noise:
                scene = web_noise(scene, rng)
            # only draw from rng when omissions are on: 0 keeps the caption stream of older bundles
            if omit_share and rng.random() < omit_share:
                out.append(omit(scene, rng))
                continue
            out.append(caption(scene, rng))
        return out


def web_noise(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene a noisy web caption would describe: colours swapped between the two objects
    (a binding error) or the relation reversed, whichever is drawn first and names no held-out
    composition (held-out text stays out of training); the scene itself when neither qualifies.

    Args:
        scene: a two-object scene.
        rng: numpy generator choosing the corruption.
    """
    from dataclasses import replace

    a, b = scene.objects
    options = [replace(scene, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour))),
               replace(scene, relation=INVERSE[scene.relation])]
    first = int(rng.integers(2))
    for wrong in (options[first], options[1 - first]):
        if not is_heldout(wrong):
            return wrong
    return scene


def omit(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of the scene with one thing left out (true, only less complete).

    Two objects: one colour, one shape ("a red shape") or the relation ("a red circle and a blue
    square", either order) is dropped; one object: its colour, its shape or its position.

    Args:
        scene: the scene (one or two objects).
        rng: numpy generator choosing what to drop and the phrasing.
    """
    def phrase(o, drop: str | None) -> str:
        if drop == "colour":
            return f"a {o.shape}"
        if drop == "shape":
            return f"a {o.colour} shape"
        return o.phrase

    if len(scene.objects) == 1:
        o = scene.objects[0]
        what = ("colour", "shape", "position")[rng.integers(3)]
        if what == "position":
            return o.phrase
        return f"{phrase(o, what)} {POSITION_PHRASES[scene.position][rng.integers(4)]}"
    a, b = scene.objects
    what = int(rng.integers(5))  # colour a, colour b, shape a, shape b, relation
    if what == 4:
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        return f"{first.phrase} and {second.phrase}"
    da = ("colour", None, "shape", None)[what]
    db = (None, "colour", None, "shape")[what]
    rel = RELATION_PHRASES[scene.relation][rng.integers(3)]
    return f"{phrase(a, da)} {rel} {phrase(b, db)}"


class TokenCache:
    """Token ids for prompts, padded/truncated exactly as the stock pipelines do, cached per text.

    Args:
        tokenizer: a transformers tokenizer (the pipeline's own).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._ids]
        if missing:
            enc = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self._ids.update(zip(missing, enc))
        return torch.stack([self._ids[t] for t in texts])


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to `floor` of the peak (short runs end on a low lr,
    which sharpens what a few thousand steps can learn).

    Args:
        step: current optimiser step (0-based).
        total: total steps.
        warmup: warm-up steps.
        floor: final fraction of the peak learning rate.
    """
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def diffusion_optimizer(modules: list[torch.nn.Module], lr: float, steps: int):
    """AdamW, warm-up + cosine lr schedule and EMA shared by the SD3 and SD1.5 miniatures.

    Args:
        modules: the trained modules (all their parameters are optimised and averaged).
        lr: peak learning rate.
        steps: total optimiser steps (sets the schedule).
    Returns:
        (params, optimizer, scheduler, ema).
    """
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, min(200, steps // 10 + 1)))
    return params, opt, sched, EMA(modules, decay=0.999)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, sched, ema: "EMA") -> float:
    """One step of the miniatures' pretraining: backward, clip to norm 1, step, lr schedule, EMA.

    Args:
        loss: the scalar loss of the step.
        opt, sched: optimiser and its lr scheduler.
        params: the parameters whose gradient norm is clipped.
        ema: the running average updated after the step.
    Returns:
        The loss as a float (for the run's log).
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    ema.update()
    return loss.item()


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay.

    Diffusion samples from the averaged weights are markedly cleaner than from the last
    iterate, most of all after short, noisy CPU runs. Decay at update n is
    min(decay, (1 + n) / (10 + n)), so the average does not drag in the random init.

    Args:
        modules: the modules whose parameters are averaged.
        decay: the asymptotic decay.
    """

    def __init__(self, modules: list[torch.nn.Module], decay: float = 0.999):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        self.n += 1
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the averaged and the live weights (twice = unchanged): for mid-run snapshots."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the averaged weights into the live parameters (end of training)."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


@dataclass
class Timer:
    """Wall-clock seconds per named stage, printed as they finish (reported in the benchmark)."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        print(f"[toy pretrain] {name} ...", flush=True)
        try:
            yield
        finally:
            self.stages[name] = time.perf_counter() - t0
            print(f"[toy pretrain] {name}: {self.stages[name]:.1f} s", flush=True)


def param_count(*modules: torch.nn.Module | None) -> int:
    """Total number of parameters of the given modules (None skipped)."""
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def folder_megabytes(path: str | os.PathLike) -> float:
    """Size of all files under a folder in MB (10^6 bytes), as `du` would count the payload."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e6


__all__ = ["omit", "EMA", "TOKENIZER_MAX_LENGTH", "Timer", "TokenCache", "WorldImages", "autocast", "diffusion_optimizer", "optimizer_step",
           "folder_megabytes", "lr_factor", "param_count", "seed_everything", "set_threads"]
