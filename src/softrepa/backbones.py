"""One interface per backbone family: encode prompts / images, noise, target, denoise.

The loss, trainer, samplers and editor only talk to a `Backbone`; they never branch on the
architecture. A registry maps the family ("sd3", "sd15", "sdxl") of a loaded pipeline to its class.

Conventions (all families): timesteps `t` are floats on the 0..1000 training scale, one per sample.
* MM-DiT (SD3 / SD3.5, rectified flow): sigma = t / 1000, x_t = (1 - sigma) x0 + sigma eps,
  target = eps - x0 (the velocity the model predicts).
* UNet (SD1.5 / SDXL, DDPM): integer t, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, target = eps, or
  the velocity sqrt(a_t) eps - sqrt(1 - a_t) x0 for v-prediction models (read from the scheduler).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .hooks import describe_model, resolve_denoiser


@dataclass
class TextCond:
    """Encoded prompts for N samples: a batchable, indexable bundle of tensors.

    Args:
        embeds: (N, S, D) token embeddings (the cross-attention / joint-attention context).
        pooled: (N, P) pooled embedding (SD3, SDXL) or None.
        extra: other per-sample tensors the model needs (SDXL: "time_ids" (N, 6)).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: torch.Tensor | Sequence[int]) -> "TextCond":
        """Select / repeat samples: `cond.index([0, 0, 1])`."""
        idx = torch.as_tensor(idx, device=self.embeds.device, dtype=torch.long)
        return TextCond(self.embeds[idx], None if self.pooled is None else self.pooled[idx],
                        {k: v[idx] for k, v in self.extra.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextCond":
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return TextCond(mv(self.embeds), None if self.pooled is None else mv(self.pooled),
                        {k: mv(v) for k, v in self.extra.items()})

    @staticmethod
    def cat(parts: Sequence["TextCond"]) -> "TextCond":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        extra = {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra}
        return TextCond(torch.cat([p.embeds for p in parts]), pooled, extra)


class Backbone:
    """Family interface over a stock diffusers pipeline (whose denoiser may carry soft tokens).

    Args:
        pipe: a loaded `StableDiffusion3Pipeline`, `StableDiffusionPipeline` or
            `StableDiffusionXLPipeline` (or compatible).
        max_sequence_length: T5 length for SD3 prompts (authors trained with 512).
    """

    family: str = ""
    prediction: str = ""

    def __init__(self, pipe: Any, max_sequence_length: int = 256):
        self.pipe = pipe
        self.denoiser = resolve_denoiser(pipe)
        self.vae = pipe.vae
        self.max_sequence_length = max_sequence_length

    # ---------------------------------------------------------------- shared helpers
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def freeze(self) -> None:
        """Every pretrained parameter frozen (only soft tokens train)."""
        for name in ("denoiser", "vae"):
            getattr(self, name).requires_grad_(False)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            mod = getattr(self.pipe, name, None)
            if mod is not None:
                mod.requires_grad_(False)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor,
                      generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f) (a sample of the VAE posterior).

        Args:
            pixels: images in [-1, 1].
            generator: one generator for the batch, or one per image (so that an image's latent
                does not depend on which batch or rank it is encoded in).
        """
        vae = self.vae
        x = pixels.to(device=vae.device, dtype=vae.dtype)
        post = vae.encode(x).latent_dist
        if isinstance(generator, (list, tuple)):
            eps = torch.stack([torch.randn(post.mean.shape[1:], generator=g) for g in generator])
            z = post.mean + post.std * eps.to(post.mean.device, post.mean.dtype)
        else:
            z = post.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode_images`: latents -> (B, 3, H, W) in [-1, 1]."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, shared: bool = True,
                         t_min: int = 0, t_max: int = 1000) -> torch.Tensor:
        """Integer training timesteps, uniform in [t_min, t_max) (authors), one shared by default.

        Returns:
            (n,) float tensor on the CPU.
        """
        k = 1 if shared else n
        t = torch.randint(t_min, t_max, (k,), generator=generator)
        return t.expand(n).float().clone()

    def _encode_kwargs(self, prompts: Sequence[str]) -> dict[str, Any]:
        params = inspect.signature(self.pipe.encode_prompt).parameters
        kw: dict[str, Any] = {"prompt": list(prompts), "num_images_per_prompt": 1,
                              "do_classifier_free_guidance": False, "device": self.device}
        for name in ("prompt_2", "prompt_3"):
            if name in params:
                kw[name] = None
        if "max_sequence_length" in params:
            kw["max_sequence_length"] = self.max_sequence_length
        return kw

    # ---------------------------------------------------------------- family-specific
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        """The model's prediction (same parameterisation as `target`) for (B, C, h, w) inputs."""
        raise NotImplementedError


class MMDiTBackbone(Backbone):
    """SD3 / SD3.5: rectified flow, velocity target eps - x0."""

    family = "sd3"
    prediction = "flow"

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        out = self.pipe.encode_prompt(**self._encode_kwargs(prompts))
        return TextCond(out[0].to(self.dtype), out[2].to(self.dtype))

    def add_noise(self, x0, noise, t):
        sigma = (t.to(x0.device, torch.float32) / 1000.0).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0, noise, t):
        return noise.float() - x0.float()

    def denoise(self, x_t, t, cond):
        return self.denoiser(hidden_states=x_t, timestep=t.to(x_t.device), encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.pooled, return_dict=False)[0]


class UNetBackbone(Backbone):
    """SD1.5-type UNets: DDPM noise, epsilon (or v) prediction read from the scheduler config."""

    family = "sd15"

    def __init__(self, pipe: Any, max_sequence_length: int = 256):
        super().__init__(pipe, max_sequence_length)
        cfg = pipe.scheduler.config
        self.prediction = cfg.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction!r} is not supported (epsilon, v_prediction)")
        from diffusers import DDPMScheduler

        # The training noise schedule of the model, whatever sampler the pipeline ships with.
        ddpm = DDPMScheduler.from_config(cfg)
        self.alphas_cumprod = ddpm.alphas_cumprod.float()  # (1000,)

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device).clamp(0, len(self.alphas_cumprod) - 1)]
        a = a.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def sample_timesteps(self, n, generator=None, shared=True, t_min=0, t_max=1000):
        return super().sample_timesteps(n, generator, shared, t_min, min(t_max, len(self.alphas_cumprod)))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        out = self.pipe.encode_prompt(**self._encode_kwargs(prompts))
        return TextCond(out[0].to(self.dtype))

    def add_noise(self, x0, noise, t):
        sa, s1a = self._alpha(t, x0)
        return (sa * x0.float() + s1a * noise.float()).to(x0.dtype)

    def target(self, x0, noise, t):
        if self.prediction == "epsilon":
            return noise.float()
        sa, s1a = self._alpha(t, x0)
        return sa * noise.float() - s1a * x0.float()

    def denoise(self, x_t, t, cond):
        kw = {}
        if cond.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
        return self.denoiser(x_t, t.to(x_t.device), encoder_hidden_states=cond.embeds, return_dict=False, **kw)[0]


class SDXLBackbone(UNetBackbone):
    """SDXL: UNet with two text encoders, pooled embedding and size/crop micro-conditioning."""

    family = "sdxl"

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | tuple[int, int] | None = None) -> TextCond:
        """Prompts -> TextCond with SDXL's micro-conditioning in `extra["time_ids"]` (N, 6).

        Args:
            prompts: N prompts.
            resolution: the image size the model works at: a side (square) or (H, W); default the
                native square. Used as both original and target size (as the SDXL pipeline does).
        """
        out = self.pipe.encode_prompt(**self._encode_kwargs(prompts))
        if resolution is None:
            resolution = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        pair = isinstance(resolution, (tuple, list))
        h, w = (int(resolution[0]), int(resolution[1])) if pair else (int(resolution), int(resolution))
        # (original H, W, crop top, left, target H, W), the order of the pipeline's _get_add_time_ids:
        # a non-square image must not be conditioned as a square one
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
        return TextCond(out[0].to(self.dtype), out[2].to(self.dtype), {"time_ids": time_ids.repeat(len(prompts), 1)})


BACKBONES: dict[str, Callable[..., Backbone]] = {"sd3": MMDiTBackbone, "sd15": UNetBackbone, "sdxl": SDXLBackbone}


def backbone_for(pipe: Any, **kwargs: Any) -> Backbone:
    """The `Backbone` of a loaded pipeline, chosen by the registry from its denoiser's family."""
    family = describe_model(resolve_denoiser(pipe))["family"]
    return BACKBONES[family](pipe, **kwargs)


ASSETS_PREFIX = "@assets/"


def resolve_model_path(model: str) -> str:
    """`@assets/toy_sd3` -> the bundled miniature inside the installed package; others unchanged.

    The packaged recipes name the miniatures this way so that they work from any directory and
    from a non-editable install.
    """
    if model.startswith(ASSETS_PREFIX):
        from pathlib import Path

        path = Path(__file__).resolve().parent / "assets" / model[len(ASSETS_PREFIX):]
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"--model {model}: no bundled pipeline at {path}")
        return str(path)
    return model


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  variant: str | None = None) -> Any:
    """`DiffusionPipeline.from_pretrained(hub id or local folder)` with a clear error when missing.

    Safety checkers are not loaded (they are irrelevant to training and scoring).
    """
    import os

    from diffusers import DiffusionPipeline

    from diffusers.utils import deprecation_utils

    # newer diffusers call it `dtype` and warn about `torch_dtype`; older ones know only the latter
    kw: dict[str, Any] = {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}
    if variant:
        kw["variant"] = variant
    model = resolve_model_path(model)
    index = os.path.join(model, "model_index.json")
    # SD1.5-style pipelines would load (and apply) a safety checker; others only warn about the
    # keyword, so a local folder gets it only when its index has one. Hub ids always get it.
    no_checker = dict(safety_checker=None, requires_safety_checker=False)
    if os.path.isfile(index):
        import json

        with open(index) as f:
            entries = json.load(f)
        # Components saved as null (e.g. SD3 without T5) must be passed as None explicitly,
        # otherwise diffusers refuses to load the folder it wrote itself.
        for name, value in entries.items():
            if isinstance(value, list) and value and all(v is None for v in value):
                kw[name] = None
        if "safety_checker" in entries:
            kw.update(no_checker)
    else:
        kw.update(no_checker)
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **kw)
    except OSError as e:
        where = "local folder" if os.path.isdir(model) else "hub id (offline machines need a local folder)"
        raise FileNotFoundError(f"--model {model}: cannot load a diffusers pipeline from this {where}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


__all__ = ["BACKBONES", "Backbone", "MMDiTBackbone", "SDXLBackbone", "TextCond", "UNetBackbone",
           "backbone_for", "load_pipeline"]
