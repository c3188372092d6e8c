"""FlowEdit: inversion-free text-based image editing (Kulikov et al. 2024), with or without soft tokens.

FlowEdit integrates an ODE directly from the source latent to the edited latent. At each step
it noises the source with fresh noise, shifts the edited latent by the same amount, and moves the
edit along the *difference* of the target and source velocities (Alg. 1 of the FlowEdit paper):

    z_edit = z_src
    for i in [NFE - n_max, NFE - n_min):                 # the last n_max steps, skipping the final n_min
        V = mean over n_avg draws of  V_tar(z_edit + z_src_t - z_src) - V_src(z_src_t),
            z_src_t = add_noise(z_src, noise, sigma_i)
        z_edit += (sigma_{i+1} - sigma_i) * V
    then, when n_min > 0, plain sampling with the target prompt from the noised edit.

The loop (`flowedit_latents`) is a pure function of a k-diffusion-style `denoise(x, sigma, cond)`
returning dx/dsigma. How a branch is guided is the adapter's choice, read by `guidance_mode`:

* "cfg" (a plain `denoise`): classifier-free guidance, one call on (uncond, cond) rows per branch,
  combined by `guide` with the branch's scale (SD3, SD1.5, SDXL).
* "embedded" (`EmbeddedGuidance`): the guidance scale is an input of the model (guidance-distilled
  FLUX.1-dev, FLUX.2): one conditional call per branch with that branch's scale, no unconditional
  rows, as the official FlowEdit edits FLUX (`FlowEditFLUX`: source guidance 1.5, target 5.5).

The rectified-flow and DDPM adapters:

* rectified flow (SD3): x = (1 - sigma) x0 + sigma eps, dx/dsigma = the model's velocity;
  sigmas from the pipeline's own scheduler.
* DDPM eps / v models (SD1.5, SDXL): the probability-flow ODE in the variance-exploding
  parameterisation x = x0 + sigma eps (sigma = sqrt((1 - a) / a), EulerDiscrete sigmas from
  alphas_cumprod), where dx/dsigma = eps(x / sqrt(1 + sigma^2), t(sigma)); the same loop applies.

This module is the pure part: the loop, guidance, the forward processes and the two adapters
(by prediction type, not by model: each family's `edit_model` picks one). Model calls, prompt
encoding, images and files live in `softrepa.edit`. Soft tokens need nothing here: attached to the
pipeline (`softrepa.load_into`), they are used by every model call, on both CFG branches of the
source and of the target (as the paper does).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .errors import UsageError

#: (x (N, C, h, w) float32, sigma 0-dim tensor, cond) -> dx/dsigma (N, C, h, w) float32
Denoise = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
#: (x0, noise, sigma) -> x_sigma, the forward process of the ODE's parameterisation
AddNoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
GUIDANCE = ("standard", "authors")
#: how a denoise is guided: "cfg" (two branches combined by `guide`) or "embedded" (a model input)
GUIDANCE_MODES = ("cfg", "embedded")


class EmbeddedGuidance:
    """A denoise whose guidance scale is a model input (guidance-distilled models, e.g. FLUX.1-dev).

    `flowedit_latents` calls it once per branch on conditional rows only, with that branch's scale
    per row; the CFG form (`FlowEditParams.guidance`) does not apply. Models without a guidance
    input may ignore the scale (then both branches are plain conditional velocities, as the
    official FlowEdit runs FLUX.1-schnell).

    Args:
        denoise: (x (N, C, h, w) float32, sigma 0-dim tensor, cond, scale (N,) float32) -> dx/dsigma
            (N, C, h, w) float32.
    """

    guidance_mode = "embedded"

    def __init__(self, denoise: Callable[[torch.Tensor, torch.Tensor, Any, torch.Tensor], torch.Tensor]):
        self.denoise = denoise

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, scale: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, sigma, cond, scale)


def guidance_mode(denoise: Callable) -> str:
    """"embedded" for an `EmbeddedGuidance` denoise, else "cfg" (see `GUIDANCE_MODES`)."""
    return getattr(denoise, "guidance_mode", "cfg")


@dataclass
class FlowEditParams:
    """FlowEdit settings (defaults: the paper's vanilla SD3 setting, 50 steps, n_max 33).

    Args:
        steps: NFE, the number of scheduler steps the sigma grid is built with.
        n_max: edit only over the last `n_max` steps (larger = stronger edits, less faithful).
        n_min: the final `n_min` steps are plain target-prompt sampling from the noised edit.
        n_avg: velocity-difference samples averaged per step.
        src_cfg, tar_cfg: CFG scales of the source and target prompts.
        guidance: "standard" (u + s (c - u) on both branches) or "authors" (the SoftREPA
            authors' target convention c + s (c - u); source stays standard).
        seed: seed of the forward noise (a CPU generator: results do not depend on the device).
    """

    steps: int = 50
    n_max: int = 33
    n_min: int = 0
    n_avg: int = 1
    src_cfg: float = 3.5
    tar_cfg: float = 13.5
    guidance: str = "standard"
    seed: int = 0

    @classmethod
    def preset(cls, family: Any, with_tokens: bool, **overrides: Any) -> "FlowEditParams":
        """The paper's setting of a family (`softrepa.family.EditPresets`), vanilla or with tokens.

        Args:
            family: a registered `Family` (`softrepa.family.family_of(pipe)`).
            with_tokens: pick the SoftREPA setting (n_max 30, target CFG 9) instead of the vanilla one.
            **overrides: fields to set explicitly (None values are ignored).

        Example:
            >>> FlowEditParams.preset(family_of(pipe), with_tokens=True).n_max
            30
        """
        n_max, tar_cfg = family.edit.choose(with_tokens)
        base = cls(steps=family.edit.steps, n_max=n_max, src_cfg=family.edit.src_cfg, tar_cfg=tar_cfg)
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> "FlowEditParams":
        """Raise `UsageError` naming the first invalid field; return self."""
        if self.steps < 1:
            raise UsageError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.n_max <= self.steps:
            raise UsageError(f"n_max must be in [0, steps={self.steps}], got {self.n_max}")
        if not 0 <= self.n_min <= self.n_max:
            raise UsageError(f"n_min must be in [0, n_max={self.n_max}], got {self.n_min}")
        if self.n_avg < 1:
            raise UsageError(f"n_avg must be >= 1, got {self.n_avg}")
        if self.guidance not in GUIDANCE:
            raise UsageError(f"guidance must be one of {GUIDANCE}, got {self.guidance!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EditConds:
    """Conditioning for the edit, opaque to the loop (whatever `denoise` accepts).

    With a "cfg" denoise (`guidance_mode`):

    Args:
        source: rows (uncond, cond) of the source prompt, for 2B latents.
        target: rows (uncond, cond) of the target prompt, for 2B latents.
        joint: optional rows (source uncond, source cond, target uncond, target cond) for 4B latents;
            when given, each FlowEdit step makes one model call instead of two.

    With an "embedded" denoise the rows are conditional only: source and target B rows each,
    joint (source cond, target cond) 2B rows.
    """

    source: Any
    target: Any
    joint: Any = None


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, convention: str = "standard") -> torch.Tensor:
    """Classifier-free guidance: "standard" u + s (c - u); "authors" c + s (c - u) = (1 + s) c - s u."""
    if convention == "authors":
        return cond + scale * (cond - uncond)
    return uncond + scale * (cond - uncond)


def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified flow forward process: (1 - sigma) x0 + sigma noise."""
    return (1 - sigma) * x0 + sigma * noise


def ve_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Variance-exploding form of a DDPM: x0 + sigma noise."""
    return x0 + sigma * noise


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # drawn on the CPU in float32 so that a seed gives the same edit on every device
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device)


def _scales(x: torch.Tensor, *scales: float) -> torch.Tensor:
    """(len(scales) * B,) float32: each branch's guidance scale repeated over its B rows of `x` (B, ...)."""
    return torch.cat([torch.full((x.shape[0],), float(s), dtype=torch.float32, device=x.device) for s in scales])


def _velocity(denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor, cond: Any, scale: float,
              convention: str) -> torch.Tensor:
    """Guided dx/dsigma of one prompt: "cfg", one call on [x, x] (B rows uncond, B rows cond);
    "embedded", one conditional call on x with the scale as the model's guidance input."""
    if guidance_mode(denoise) == "embedded":
        return denoise(x, sigma, cond, _scales(x, scale))  # (B, C, h, w)
    v = denoise(torch.cat([x, x]), sigma, cond)  # (2B, C, h, w)
    u, c = v.chunk(2)
    return guide(u, c, scale, convention)


@torch.no_grad()
def flowedit_latents(
    denoise: Denoise,
    z_src: torch.Tensor,
    sigmas: torch.Tensor,
    conds: EditConds,
    params: FlowEditParams,
    *,
    add_noise: AddNoise = flow_add_noise,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The FlowEdit ODE from a source latent to the edited latent (pure: no model state).

    Args:
        denoise: k-diffusion-style dx/dsigma of the ODE (see `Denoise`), or an `EmbeddedGuidance`
            (the model takes the guidance scale; one conditional call per branch).
        z_src: (B, C, h, w) clean source latents.
        sigmas: (steps + 1,) decreasing noise levels ending with 0 (the scheduler's grid).
        conds: conditioning (see `EditConds`).
        params: FlowEdit settings (validated here).
        add_noise: the forward process matching `denoise`'s parameterisation.
        generator: source of the forward noise (default: a CPU generator seeded with params.seed).
        progress: show a progress bar over the steps.
    Returns:
        (B, C, h, w) float32 edited latents; exactly `z_src` when n_max == 0.
    """
    from tqdm.auto import tqdm

    p = params.validate()
    embedded = guidance_mode(denoise) == "embedded"
    if embedded and p.guidance != "standard":
        raise UsageError(f"guidance {p.guidance!r} is a CFG form; this model's guidance is an embedding "
                         "(one conditional branch), use guidance='standard'")
    if len(sigmas) != p.steps + 1:
        raise ValueError(f"sigmas: expected steps + 1 = {p.steps + 1} values, got {len(sigmas)}")
    gen = generator if generator is not None else torch.Generator().manual_seed(p.seed)
    sigmas = sigmas.float().to(z_src.device)
    x_src = z_src.float()
    z_edit = x_src.clone()  # (B, C, h, w): the ODE starts at the source image
    x_tar = None  # the sampling state of the n_min branch
    first, stop = p.steps - p.n_max, p.steps - p.n_min
    for i in tqdm(range(first, p.steps), desc="flowedit", disable=not progress):
        s, s_next = sigmas[i], sigmas[i + 1]
        if i < stop:
            v_delta = torch.zeros_like(x_src)
            for _ in range(p.n_avg):
                x_src_t = add_noise(x_src, _randn(x_src, gen), s)  # noised source
                # the edit shifted by the same noise, z_edit + (x_src_t - x_src), grouped so that
                # z_edit == x_src gives x_tar_t == x_src_t bit for bit (no edit => exactly no change)
                x_tar_t = x_src_t + (z_edit - x_src)
                if conds.joint is not None and embedded:
                    # one call on (source, target) conditional rows, each with its branch's scale
                    v = denoise(torch.cat([x_src_t, x_tar_t]), s, conds.joint,
                                _scales(x_src, p.src_cfg, p.tar_cfg))  # (2B, C, h, w)
                    v_src, v_tar = v.chunk(2)
                elif conds.joint is not None:
                    v = denoise(torch.cat([x_src_t, x_src_t, x_tar_t, x_tar_t]), s, conds.joint)  # (4B, ...)
                    su, sc, tu, tc = v.chunk(4)
                    v_src = guide(su, sc, p.src_cfg, "standard")
                    v_tar = guide(tu, tc, p.tar_cfg, p.guidance)
                else:
                    v_src = _velocity(denoise, x_src_t, s, conds.source, p.src_cfg, "standard")
                    v_tar = _velocity(denoise, x_tar_t, s, conds.target, p.tar_cfg, p.guidance)
                v_delta += (v_tar - v_src) / p.n_avg
            z_edit = z_edit + (s_next - s) * v_delta
        else:
            if x_tar is None:
                # FlowEdit's n_min phase: noise the edit the same way once, then sample normally
                x_src_t = add_noise(x_src, _randn(x_src, gen), s)
                x_tar = x_src_t + (z_edit - x_src)
            v = _velocity(denoise, x_tar, s, conds.target, p.tar_cfg, p.guidance)
            x_tar = x_tar + (s_next - s) * v
    return z_edit if x_tar is None else x_tar


# --------------------------------------------------------------------------- model adapters
def flow_sigmas(scheduler: Any, steps: int, image_seq_len: int | None = None, *,
                base_sigmas: Any = None, mu: float | None = None) -> torch.Tensor:
    """(steps + 1,) sigmas of a flow-matching scheduler (a copy: the pipeline's stays untouched).

    Args:
        scheduler: e.g. the SD3 pipeline's `FlowMatchEulerDiscreteScheduler`.
        steps: NFE.
        image_seq_len: latent tokens, for schedulers with resolution-dependent shifting.
        base_sigmas: (steps,) unshifted sigmas handed to the scheduler, as pipelines that pass
            `sigmas=` do (FLUX: linspace(1, 1 / steps, steps)); default: the scheduler's own grid.
        mu: the shift of dynamic shifting, for pipelines with their own formula (FLUX.2);
            default: SD3's / FLUX.1's `calculate_shift` of `image_seq_len`.
    """
    sched = type(scheduler).from_config(scheduler.config)
    kw: dict[str, Any] = {}
    if base_sigmas is not None:
        kw["sigmas"] = np.asarray(base_sigmas, dtype=np.float64)
    cfg = sched.config
    if cfg.get("use_dynamic_shifting", False) and mu is not None:
        kw["mu"] = float(mu)
    elif cfg.get("use_dynamic_shifting", False):  # as the SD3 pipeline computes mu
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        kw["mu"] = calculate_shift(image_seq_len or cfg.get("base_image_seq_len", 256),
                                   cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                   cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
    if "sigmas" in kw:
        sched.set_timesteps(**kw)
    else:
        sched.set_timesteps(steps, **kw)
    return sched.sigmas.float().cpu()


def embedded_flow_denoiser(backbone: Any, num_train_timesteps: int = 1000) -> EmbeddedGuidance:
    """dx/dsigma of a rectified-flow backbone whose guidance is an embedding: `backbone.denoise`
    takes the scale as its `guidance` keyword (FLUX.1-dev, FLUX.2)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Any, scale: torch.Tensor) -> torch.Tensor:
        t = (sigma * num_train_timesteps).reshape(1).expand(x.shape[0])  # (N,) as scheduler.timesteps
        return backbone.denoise(x.to(backbone.dtype), t, cond, guidance=scale).float()

    return EmbeddedGuidance(denoise)


def eps_sigmas(scheduler_config: Any, steps: int) -> torch.Tensor:
    """(steps + 1,) EulerDiscrete sigmas sqrt((1 - a) / a) of a DDPM model, ending with 0."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    return sched.sigmas.float().cpu()


def flow_denoiser(backbone: Any, num_train_timesteps: int = 1000) -> Denoise:
    """dx/dsigma of a rectified-flow backbone: the model's velocity at timestep sigma * 1000."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        t = (sigma * num_train_timesteps).reshape(1).expand(x.shape[0])  # (N,) as scheduler.timesteps
        return backbone.denoise(x.to(backbone.dtype), t, cond).float()

    return denoise


def eps_denoiser(backbone: Any) -> Denoise:
    """dx/dsigma = eps of a DDPM backbone (epsilon or v prediction) in the form x = x0 + sigma eps."""
    a = backbone.alphas_cumprod.double()
    log_sigmas = (((1 - a) / a).sqrt()).log().numpy()  # (T,) increasing with t

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        s = float(sigma)
        c_in = 1.0 / math.sqrt(s * s + 1.0)  # x_vp = x c_in = sqrt(a) x0 + sqrt(1 - a) eps
        # sigma -> fractional training timestep (log-linear, as k-diffusion / EulerDiscrete)
        t = float(np.interp(math.log(max(s, 1e-10)), log_sigmas, np.arange(len(log_sigmas))))
        if abs(t - round(t)) < 1e-3:
            t = float(round(t))
        tt = torch.full((x.shape[0],), t, device=x.device)
        out = backbone.denoise((x * c_in).to(backbone.dtype), tt, cond).float()
        if backbone.prediction == "v_prediction":  # eps = sqrt(1 - a) x_vp + sqrt(a) v
            return s * c_in * c_in * x + c_in * out
        return out

    return denoise
