"""The `Backbone` interface: encode prompts / images, noise, target, denoise — one per model family.

The loss, trainer, samplers and editor only talk to a `Backbone`; they never branch on the family.
Each family module (`softrepa/families/`) subclasses it; `backbone_for(pipe)` asks the pipeline's
family for its backbone.

Conventions (all families): timesteps `t` are floats on the 0..1000 training scale, one per sample.
* MM-DiT (SD3 / SD3.5, rectified flow): sigma = t / 1000, x_t = (1 - sigma) x0 + sigma eps,
  target = eps - x0 (the velocity the model predicts).
* UNet (SD1.5 / SDXL, DDPM): integer t, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, target = eps, or
  the velocity sqrt(a_t) eps - sqrt(1 - a_t) x0 for v-prediction models (read from the scheduler).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import SoftrepaError
from .registry import family_of, resolve_denoiser


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


def encode_prompt(pipe: Any, prompts: Sequence[str], *, device: Any = None,
                  max_sequence_length: int | None = None) -> tuple:
    """Call a stock pipeline's `encode_prompt` for the conditional branch only, whatever its signature.

    The one place that knows the keyword differences between pipelines: options a pipeline's
    `encode_prompt` lacks are not passed (FLUX has no `do_classifier_free_guidance`, SD1.5 no
    `prompt_2`), extra text-encoder prompts default to the main one (None).

    Args:
        pipe: a diffusers pipeline.
        prompts: N prompts.
        device: where the embeddings go (default: the pipeline's execution device).
        max_sequence_length: T5 length, for pipelines that take it.
    Returns:
        The pipeline's own tuple (embeddings first).
    """
    params = inspect.signature(pipe.encode_prompt).parameters
    wanted: dict[str, Any] = {"prompt": list(prompts), "num_images_per_prompt": 1,
                              "do_classifier_free_guidance": False, "prompt_2": None, "prompt_3": None,
                              "device": device or getattr(pipe, "_execution_device", None),
                              "max_sequence_length": max_sequence_length}
    kw = {k: v for k, v in wanted.items() if k in params and not (k == "max_sequence_length" and v is None)}
    with torch.no_grad():
        return pipe.encode_prompt(**kw)


class Backbone:
    """Family interface over a stock diffusers pipeline (whose denoiser may carry soft tokens).

    Args:
        pipe: a loaded `StableDiffusion3Pipeline`, `StableDiffusionPipeline` or
            `StableDiffusionXLPipeline` (or compatible).
        max_sequence_length: text positions of a prompt, for families that take a length (default:
            the family's `text_length`, the one train, generate and edit share).
    """

    prediction: str = ""  # "flow", "epsilon" or "v_prediction": what `target` returns
    #: (pipeline component, what it gives) that prompts cannot be encoded without
    text_parts: tuple[tuple[str, str], ...] = (("text_encoder", "the text encoder"), ("tokenizer", "its tokenizer"))

    def __init__(self, pipe: Any, max_sequence_length: int | None = None):
        self.pipe = pipe
        self.denoiser = resolve_denoiser(pipe)
        self.vae = pipe.vae
        self._family = family_of(pipe)
        # a length given for a family that takes none is ignored here (configs written before the
        # family contract carried 512 for every family); the CLI refuses it with a message
        length = max_sequence_length if self._family.text_length else None
        self.max_sequence_length = self._family.resolve_text_length(length)

    @property
    def family(self) -> str:
        """The registered name of the pipeline's family."""
        return self._family.name

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

    # ---------------------------------------------------------------- latents: VAE <-> model space
    # A family whose model latent is not the VAE's shifted / scaled one (FLUX.2: 2 x 2 patches,
    # batch-normed; Qwen-Image: one-frame clips of a 3-D VAE) overrides these four maps; sampling,
    # the deterministic FlowEdit source and decoding are written once, here.
    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> what the VAE's `encode` takes (already on its device and dtype)."""
        return pixels

    def latents_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """A VAE latent (posterior sample or mode) -> the model's latent (B, C, h, w)."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def vae_from_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `latents_from_vae` (x already in the VAE's dtype)."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return x / vae.config.scaling_factor + shift

    def vae_output(self, decoded: torch.Tensor) -> torch.Tensor:
        """What the VAE's `decode` returns -> (B, 3, H, W) pixels."""
        return decoded

    def _posterior(self, pixels: torch.Tensor) -> Any:
        vae = self.vae
        return vae.encode(self.vae_input(pixels.to(device=vae.device, dtype=vae.dtype))).latent_dist

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor,
                      generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> model latents (B, C, h, w): a sample of the VAE posterior.

        Args:
            pixels: images in [-1, 1].
            generator: one generator for the batch, or one per image (so that an image's latent
                does not depend on which batch or rank it is encoded in).
        """
        post = self._posterior(pixels)
        if isinstance(generator, (list, tuple)):
            eps = torch.stack([torch.randn(post.mean.shape[1:], generator=g) for g in generator])
            z = post.mean + post.std * eps.to(post.mean.device, post.mean.dtype)
        else:
            z = post.sample(generator)
        return self.latents_from_vae(z).to(self.dtype)

    @torch.no_grad()
    def encode_source(self, pixels: torch.Tensor) -> torch.Tensor:
        """FlowEdit's source: (B, 3, H, W) in [-1, 1] -> float32 model latents from the VAE posterior
        *mode* (deterministic, as FlowEdit does), so that an edit with n_max = 0 returns exactly
        decode(encode(x))."""
        return self.latents_from_vae(self._posterior(pixels).mode()).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode_images`: model latents -> (B, 3, H, W) in [-1, 1]."""
        z = self.vae_from_latents(latents.to(self.vae.dtype))
        return self.vae_output(self.vae.decode(z, return_dict=False)[0]).clamp(-1, 1)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, shared: bool = True,
                         t_min: int = 0, t_max: int = 1000) -> torch.Tensor:
        """Integer training timesteps, uniform in [t_min, t_max) (authors), one shared by default.

        Returns:
            (n,) float tensor on the CPU.
        """
        k = 1 if shared else n
        t = torch.randint(t_min, t_max, (k,), generator=generator)
        return t.expand(n).float().clone()

    def encode_prompt(self, prompts: Sequence[str]) -> tuple:
        """The stock pipeline's `encode_prompt` output for `prompts` (conditional branch only).

        Raises:
            SoftrepaError: the pipeline lacks a component of `text_parts` (one message for every family).
        """
        self.require_text_parts()
        return encode_prompt(self.pipe, prompts, device=self.device, max_sequence_length=self.max_sequence_length)

    def require_text_parts(self) -> None:
        """Raise `SoftrepaError` naming the components of `text_parts` the pipeline lacks."""
        missing = [(name, what) for name, what in self.text_parts if getattr(self.pipe, name, None) is None]
        if missing:
            raise SoftrepaError(f"{self._family.title}: the pipeline has no {', '.join(n for n, _ in missing)} "
                                f"({', '.join(w for _, w in missing)}), which prompts need: load the pipeline with "
                                "its text encoders")

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


def backbone_for(pipe: Any, **kwargs: Any) -> Backbone:
    """The `Backbone` of a loaded pipeline, built by the family of its denoiser.

    Args:
        pipe: a loaded pipeline of a registered family.
        **kwargs: backbone options (e.g. `max_sequence_length`).

    Example:
        >>> bb = backbone_for(pipe, max_sequence_length=256)
        >>> cond = bb.encode_prompts(["a red circle"])
        >>> v = bb.denoise(bb.add_noise(x0, noise, t), t, cond)   # same parameterisation as bb.target
    """
    return family_of(pipe).backbone(pipe, **kwargs)


__all__ = ["Backbone", "TextCond", "backbone_for", "encode_prompt"]
