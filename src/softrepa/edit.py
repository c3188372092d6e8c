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
returning dx/dsigma. Two model adapters provide it:

* rectified flow (SD3): x = (1 - sigma) x0 + sigma eps, dx/dsigma = the model's velocity;
  sigmas from the pipeline's own scheduler.
* DDPM eps / v models (SD1.5, SDXL): the probability-flow ODE in the variance-exploding
  parameterisation x = x0 + sigma eps (sigma = sqrt((1 - a) / a), EulerDiscrete sigmas from
  alphas_cumprod), where dx/dsigma = eps(x / sqrt(1 + sigma^2), t(sigma)); the same loop applies.

Soft tokens need nothing here: attached to the pipeline (`softrepa.load_into`), they are used by
every model call, on both CFG branches of the source and of the target (as the paper does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

#: (x (N, C, h, w) float32, sigma 0-dim tensor, cond) -> dx/dsigma (N, C, h, w) float32
Denoise = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
#: (x0, noise, sigma) -> x_sigma, the forward process of the ODE's parameterisation
AddNoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
GUIDANCE = ("standard", "authors")


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

    def validate(self) -> "FlowEditParams":
        """Raise ValueError naming the first invalid field; return self."""
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.n_max <= self.steps:
            raise ValueError(f"n_max must be in [0, steps={self.steps}], got {self.n_max}")
        if not 0 <= self.n_min <= self.n_max:
            raise ValueError(f"n_min must be in [0, n_max={self.n_max}], got {self.n_min}")
        if self.n_avg < 1:
            raise ValueError(f"n_avg must be >= 1, got {self.n_avg}")
        if self.guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {GUIDANCE}, got {self.guidance!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EditConds:
    """Conditioning for the edit, opaque to the loop (whatever `denoise` accepts).

    Args:
        source: rows (uncond, cond) of the source prompt, for 2B latents.
        target: rows (uncond, cond) of the target prompt, for 2B latents.
        joint: optional rows (source uncond, source cond, target uncond, target cond) for 4B latents;
            when given, each FlowEdit step makes one model call instead of two.
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


def _velocity(denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor, cond: Any, scale: float,
              convention: str) -> torch.Tensor:
    """Guided dx/dsigma of one prompt: one call on [x, x] (B rows uncond, B rows cond)."""
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
        denoise: k-diffusion-style dx/dsigma of the ODE (see `Denoise`).
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
                if conds.joint is not None:
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
def flow_sigmas(scheduler: Any, steps: int, image_seq_len: int | None = None) -> torch.Tensor:
    """(steps + 1,) sigmas of a flow-matching scheduler (a copy: the pipeline's stays untouched).

    Args:
        scheduler: e.g. the SD3 pipeline's `FlowMatchEulerDiscreteScheduler`.
        steps: NFE.
        image_seq_len: latent tokens, for schedulers with resolution-dependent shifting.
    """
    sched = type(scheduler).from_config(scheduler.config)
    kw = {}
    cfg = sched.config
    if cfg.get("use_dynamic_shifting", False):  # as the SD3 pipeline computes mu
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        kw["mu"] = calculate_shift(image_seq_len or cfg.get("base_image_seq_len", 256),
                                   cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                   cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
    sched.set_timesteps(steps, **kw)
    return sched.sigmas.float().cpu()


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


@contextlib.contextmanager
def vae_upcast(vae: Any) -> Iterator[None]:
    """Run an fp16 VAE whose config asks for it (`force_upcast`, e.g. SDXL's) in fp32, as the
    diffusers pipelines do: its fp16 activations overflow to NaN at high resolution."""
    if vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        yield
        return
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(torch.float16)


def encode_source(backbone: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents from the VAE posterior *mode* (deterministic,
    as FlowEdit does), so that n_max = 0 returns exactly decode(encode(x))."""
    vae = backbone.vae
    with vae_upcast(vae):
        post = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((post.mode() - shift) * vae.config.scaling_factor).float()


def model_for_edit(pipe: Any, steps: int, latent_shape: tuple[int, ...]) -> tuple[Any, Denoise, torch.Tensor, AddNoise]:
    """(backbone, denoise, sigmas, add_noise) for a pipeline of any supported family.

    Args:
        pipe: a loaded SD3 / SD1.5 / SDXL pipeline (tokens attached or not).
        steps: NFE.
        latent_shape: (B, C, h, w) of the source latents (resolution-dependent schedules).
    """
    from .backbones import backbone_for

    bb = backbone_for(pipe)
    if bb.prediction == "flow":
        patch = getattr(bb.denoiser.config, "patch_size", 1) or 1
        seq = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
        ntt = pipe.scheduler.config.get("num_train_timesteps", 1000)
        return bb, flow_denoiser(bb, ntt), flow_sigmas(pipe.scheduler, steps, seq), flow_add_noise
    return bb, eps_denoiser(bb), eps_sigmas(pipe.scheduler.config, steps), ve_add_noise


@torch.no_grad()
def edit_latents(pipe: Any, z_src: torch.Tensor, source_prompts: list[str], target_prompts: list[str],
                 params: FlowEditParams, *, resolution: int | tuple[int, int] | None = None,
                 generator: torch.Generator | None = None, max_sequence_length: int = 256, progress: bool = False,
                 warn_long: bool = True) -> torch.Tensor:
    """FlowEdit on latents with a pipeline's model (and whatever tokens are attached to it).

    Args:
        pipe: the pipeline.
        z_src: (B, C, h, w) source latents (`encode_source`).
        source_prompts, target_prompts: B prompts each.
        params: FlowEdit settings.
        resolution: image size, a side or (H, W), for SDXL's size conditioning (default: the pixel
            size of `z_src`, (h, w) times the VAE factor).
        generator: forward-noise generator (default: CPU, seeded with params.seed).
        max_sequence_length: SD3 T5 prompt length (the pipeline's default 256, as FlowEdit).
        progress: progress bar over the steps.
        warn_long: log a warning for prompts the text encoder truncates (as generation does);
            callers that already checked a whole manifest turn it off.
    Returns:
        (B, C, h, w) float32 edited latents.
    """
    from .backbones import TextCond
    from .sample import warn_long_prompts

    params.validate()
    if not (len(source_prompts) == len(target_prompts) == z_src.shape[0]):
        raise ValueError("source_prompts, target_prompts and z_src must have the same batch size")
    if warn_long:
        warn_long_prompts(pipe, list(dict.fromkeys([*source_prompts, *target_prompts])))
    if resolution is None:  # condition on the size actually edited, not the native square
        f = int(pipe.vae_scale_factor)
        resolution = (z_src.shape[-2] * f, z_src.shape[-1] * f)
    bb, denoise, sigmas, add_noise = model_for_edit(pipe, params.steps, tuple(z_src.shape))
    bb.max_sequence_length = max_sequence_length
    b = z_src.shape[0]
    # FlowEdit's negative prompt is "" (encoded like any prompt) for both source and target
    cond = bb.encode_prompts([""] + list(source_prompts) + list(target_prompts), resolution=resolution)
    empty = cond.index([0] * b)
    src, tar = cond.index(range(1, b + 1)), cond.index(range(b + 1, 2 * b + 1))
    conds = EditConds(TextCond.cat([empty, src]), TextCond.cat([empty, tar]), TextCond.cat([empty, src, empty, tar]))
    # the pipeline's execution device: under model CPU offload the weights report "cpu"
    device = getattr(pipe, "_execution_device", None) or bb.device
    return flowedit_latents(denoise, z_src.to(device), sigmas, conds, params, add_noise=add_noise,
                            generator=generator, progress=progress)


# --------------------------------------------------------------------------- images
def load_source_image(path: Any) -> Image.Image:
    """An RGB image from a file (transparency composited on white, not dropped to black).

    Args:
        path: image file.
    Raises:
        FileNotFoundError: no such file; ValueError: a file PIL cannot read as an image.
    """
    from pathlib import Path

    from PIL import UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"source image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image file ({type(e).__name__}: {e})") from e


def size_multiple(pipe: Any) -> int:
    """Image sides must be multiples of this: the VAE factor times the transformer's patch size."""
    from .hooks import resolve_denoiser

    patch = getattr(resolve_denoiser(pipe).config, "patch_size", None) or 1
    return int(pipe.vae_scale_factor) * int(patch)


def working_size(width: int, height: int, multiple: int, size: tuple[int, int] | None = None,
                 max_side: int | None = None) -> tuple[int, int]:
    """(H, W) the model edits at: `size` if given, else the image's own size scaled down so that its
    longer side is at most `max_side`; both rounded to the nearest multiple of `multiple` (>= one).

    Args:
        width, height: the source image size.
        multiple: see `size_multiple`.
        size: explicit (H, W).
        max_side: cap of the longer side (default: none).
    """
    if size is not None:
        h, w = size
    else:
        scale = min(1.0, max_side / max(width, height)) if max_side else 1.0
        h, w = height * scale, width * scale
    return (max(multiple, int(round(h / multiple)) * multiple), max(multiple, int(round(w / multiple)) * multiple))


def image_to_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1] at `size` = (H, W) (bicubic resize when needed)."""
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def pixels_to_image(pixels: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> PIL (the rounding diffusers' image processor uses)."""
    arr = ((pixels[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    return Image.fromarray((arr * 255).round().astype(np.uint8))


@torch.no_grad()
def edit_image(pipe: Any, image: Image.Image | str, source_prompt: str, target_prompt: str,
               params: FlowEditParams | None = None, *, size: tuple[int, int] | None = None,
               max_sequence_length: int = 256, progress: bool = False, warn_long: bool = True) -> Image.Image:
    """Edit one image with FlowEdit; the result has the source image's size.

    The whole image is edited: it is resized (bicubic, never cropped) to a working size the model
    accepts, edited there, and the result is resized back (Lanczos) to the source's exact size. With
    the default size the aspect ratio changes only by the rounding of each side to the size multiple;
    an explicit `size` of another aspect ratio stretches the image and the result is stretched back.
    SDXL is size-conditioned on the working (H, W).

    Args:
        pipe: a loaded SD3 / SD1.5 / SDXL pipeline (attach soft tokens first to edit with them).
        image: a PIL image or an image file path.
        source_prompt: describes the source image.
        target_prompt: describes the wanted edit.
        params: FlowEdit settings (default `FlowEditParams()`).
        size: working (H, W); default: the image's size, longer side capped at the model's native
            resolution, each side rounded to the model's size multiple (`size_multiple`).
        max_sequence_length: SD3 T5 prompt length.
        progress: progress bar over the steps.
        warn_long: log a warning when a prompt is longer than the text encoder reads.
    Returns:
        The edited PIL image, of the source image's size.
    """
    from .backbones import backbone_for
    from .sample import native_resolution

    params = (params or FlowEditParams()).validate()
    src = load_source_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
    h, w = working_size(src.width, src.height, size_multiple(pipe), size, max_side=native_resolution(pipe))
    bb = backbone_for(pipe)
    z_src = encode_source(bb, image_to_pixels(src, (h, w)))  # (1, C, h/f, w/f)
    z = edit_latents(pipe, z_src, [source_prompt], [target_prompt], params, resolution=(h, w),
                     max_sequence_length=max_sequence_length, progress=progress, warn_long=warn_long)
    with vae_upcast(bb.vae):
        out = pixels_to_image(bb.decode_latents(z))  # decode_latents casts to the VAE's dtype
    return out if out.size == src.size else out.resize(src.size, Image.LANCZOS)


__all__ = ["EditConds", "FlowEditParams", "GUIDANCE", "edit_image", "edit_latents", "encode_source", "eps_denoiser",
           "eps_sigmas", "flow_add_noise", "flow_denoiser", "flow_sigmas", "flowedit_latents", "guide",
           "image_to_pixels", "load_source_image", "model_for_edit", "pixels_to_image", "size_multiple", "vae_upcast",
           "ve_add_noise", "working_size"]
