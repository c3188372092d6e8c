"""Wan text-to-video (`WanTransformer3DModel`, `WanPipeline`): a cross-attention DiT, tokens inserted
into the text context of the first L blocks — of both experts of Wan 2.2 A14B.

Wan's blocks read text only through cross-attention (`attn2`, no rotary on the text, no mask). The
pipeline encodes the prompt with umT5, cuts it at its true length and **zero-pads it to
`max_sequence_length`** (512 in the pipeline call); the model projects it once
(`condition_embedder.text_embedder`, Linear-GELU-Linear, so the padding becomes a constant vector
every query may attend to: Wan has no text mask) and hands every block the same context
(B, 512, D). Each selected block k gets `[s_1..s_m, context]` (the cross-attention template at
position 0, one token set per block of `blocks`); nothing is dropped. Text-space tokens pass
through the expert's own `text_embedder`, as the prompt does.

Timesteps. Wan 2.1 and Wan 2.2 A14B are called with one timestep per sample (B,) on the 0..1000
scale. Wan 2.2 TI2V (`expand_timesteps=True` in the pipeline) is called with **one per latent
token** (B, n_tokens): all equal to t for text-to-video, 0 on the first frame's tokens when that
frame is a given image. The tokens' time bucket is the sample's noise level, the **maximum** over its
tokens (the placement's `timestep_rule`): t in both cases, never the clean first frame's 0.

Two experts. Wan 2.2 A14B pipelines hold `transformer` (high noise, t >= boundary_ratio x 1000) and
`transformer_2` (low noise). The family declares both as the pipeline's denoisers
(`Family.denoisers`), so `attach(pipe, tokens)` checks the tokens against both and installs the
same tokens' hooks on both (one handle; `remove()` restores both); the backbone sends each training
sample to the expert the pipeline would use at its t, and freezes both.

What is supported:
* text-to-video: Wan 2.1 T2V, Wan 2.2 T2V A14B (both experts), Wan 2.2 TI2V 5B — attach, generation
  through `WanPipeline` (tokens on both CFG branches; `softrepa generate` writes mp4 + frames),
  training on images as one-frame clips (the trainer's data are images; Wan trains on images so too).
* image-to-video, attach and generation only: pipelines whose transformer has no image context
  (Wan 2.2 I2V A14B, Wan 2.2 TI2V 5B with an image through `WanImageToVideoPipeline`): the text
  context is the prompt alone, so inserting works as for T2V.
* refused (by name): Wan 2.1 I2V / FLF2V, whose transformer has an image context
  (`added_kv_proj_dim`): its attention processor takes the **last 512 context rows** as the text and
  the rows before as the CLIP image embedding, so any inserted row would be read as image context.
  Training an image-to-video model (latents concatenated with an image condition) is refused too.
  FlowEdit (image editing) does not apply to a video family and is refused.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from ..backbone import TextCond
from ..errors import SoftTokensError, UsageError
from ..family import EditPresets, Family, SamplingDefaults, register_family
from ..flow import FlowBackbone, latent_stats
from ..templates import CROSS_ATTENTION, Placement, per_layer
from ..tokens import TokenLayout

_NO_EDIT = ("FlowEdit: Wan is a video family and softrepa edits images only; expected an image model "
            "(SD3, FLUX, SANA, ...)")


class WanBackbone(FlowBackbone):
    """Wan: rectified flow on one-frame clips of the 3-D Wan VAE, velocity target eps - x0.

    x0 is (B, C, H/f, W/f), the frame axis dropped, normalised per channel with the VAE's
    `latents_mean` / `latents_std` (as the pipeline decodes); sigma = t / 1000,
    x_t = (1 - sigma) x0 + sigma eps. Prompts: the stock `encode_prompt`, zero-padded to
    `max_sequence_length` by the pipeline itself (no mask: Wan has none).

    Args:
        pipe: a `WanPipeline` (text-to-video).
        max_sequence_length: umT5 positions per prompt (default 512, the pipeline call's).
    Raises:
        SoftTokensError: an image-to-video transformer (its input has more channels than the VAE latent).
    """

    def __init__(self, pipe: Any, max_sequence_length: int | None = None, guidance: float | None = None):
        super().__init__(pipe, max_sequence_length, guidance)
        if self.denoiser.config.in_channels != self.vae.config.z_dim:
            raise SoftTokensError(f"Wan training needs a text-to-video transformer: in_channels "
                                  f"{self.denoiser.config.in_channels} != the VAE's z_dim {self.vae.config.z_dim} "
                                  "(an image-to-video model)")
        self.experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
        ratio = pipe.config.get("boundary_ratio") if len(self.experts) > 1 else None
        ntt = pipe.scheduler.config.get("num_train_timesteps", 1000)
        self.boundary = None if ratio is None else float(ratio) * ntt  # t >= boundary: transformer

    def freeze(self) -> None:
        super().freeze()
        for expert in self.experts:
            expert.requires_grad_(False)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        """N prompts -> embeds (N, max_sequence_length, D_text), zero-padded by the pipeline."""
        embeds = self.encode_prompt(prompts)[0]  # (N, L, D)
        return TextCond(embeds.to(self.dtype))

    # ---------------------------------------------------------------- latents: one-frame clips, normalised
    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.unsqueeze(2)  # (B, 3, 1, H, W)

    def latents_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = latent_stats(self.vae, z)
        return (z[:, :, 0] - mean) / std  # (B, C, h, w)

    def vae_from_latents(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = latent_stats(self.vae, x)
        return (x * std + mean).unsqueeze(2)  # (B, C, 1, h, w)

    def vae_output(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded[:, :, 0]  # (B, 3, H, W)

    # ---------------------------------------------------------------- the model call
    def _call(self, expert: nn.Module, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        clip = x.unsqueeze(2)  # (B, C, 1, h, w)
        timestep = t.to(x.device)
        if self.pipe.config.get("expand_timesteps", False):  # TI2V: the pipeline's one timestep per latent token
            _, p_h, p_w = expert.config.patch_size
            n = (x.shape[-2] // p_h) * (x.shape[-1] // p_w)
            timestep = timestep[:, None].expand(-1, n)  # (B, n_tokens)
        out = expert(hidden_states=clip, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        return out[:, :, 0]  # (B, C, h, w)

    def denoise(self, x_t, t, cond):
        """Velocity for (B, C, h, w) latents, each sample through the expert the pipeline uses at its t."""
        t = t.to(x_t.device).float()
        if self.boundary is None:
            return self._call(self.experts[0], x_t, t, cond.embeds)
        high = t >= self.boundary  # (B,)
        out = None
        for expert, rows in ((self.experts[0], high), (self.experts[1], ~high)):
            if rows.any():
                part = self._call(expert, x_t[rows], t[rows], cond.embeds[rows])  # (b, C, h, w)
                out = part.new_zeros(x_t.shape[:1] + part.shape[1:]) if out is None else out
                out = out.index_put((rows.nonzero().flatten(),), part)
        return out


def noise_level(denoiser: nn.Module, timestep: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, n_tokens) timesteps -> (B,): a sample's noise level is its largest token timestep
    (TI2V gives a conditioning first frame timestep 0)."""
    t = torch.as_tensor(timestep)
    return t.amax(dim=1) if t.ndim == 2 else t


class WanFamily(Family):
    name = "wan"
    title = "Wan (text-to-video)"
    denoiser_class = "WanTransformer3DModel"
    # `WanPipeline.__call__`'s defaults (Wan 2.1 T2V model card): 50 steps, CFG 5.0
    sampling = SamplingDefaults(steps=50, cfg=5.0)
    cfg_branches = "calls"  # one call per branch inside cache_context("cond" / "uncond"), on either expert
    text_length = 512  # the pipeline call's max_sequence_length (the I2V processor's fixed 512 text rows too)
    video_fps = 16  # Wan 2.1 / 2.2 A14B model cards export at 16 fps (TI2V 5B's cards: 24; `generate` takes fps)
    repeated_blocks = ("WanTransformerBlock",)
    placement = Placement(CROSS_ATTENTION, select=per_layer("blocks"), position=0, timestep_rule=noise_level)
    block_list = "blocks"
    width_names = ("inner_dim (num_attention_heads x attention_head_dim)", "text_dim")

    @property
    def edit(self) -> EditPresets:
        """Refused: FlowEdit edits images (no preset for a video family)."""
        raise UsageError(_NO_EDIT)

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, WanTransformer3DModel)

    def widths(self, denoiser: nn.Module) -> tuple[int, int]:
        cfg = denoiser.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim), int(cfg.text_dim)

    def projection(self, denoiser: nn.Module) -> nn.Module:
        """The prompt's own way into the blocks: `condition_embedder.text_embedder`."""
        return denoiser.condition_embedder.text_embedder

    def denoisers(self, model_or_pipeline: Any, denoiser: nn.Module) -> list[nn.Module]:
        """Both experts of a Wan 2.2 A14B pipeline (`transformer_2` serves the low-noise steps)."""
        second = getattr(model_or_pipeline, "transformer_2", None)
        return [denoiser] if not isinstance(second, nn.Module) or second is denoiser else [denoiser, second]

    def check_fits(self, layout: TokenLayout, denoiser: nn.Module) -> None:
        if denoiser.config.added_kv_proj_dim is not None:
            raise SoftTokensError("Wan image-to-video models with an image context (added_kv_proj_dim: Wan 2.1 I2V / "
                                  "FLF2V) are not supported: their attention reads the text as the last 512 context "
                                  "rows; expected a Wan T2V, Wan 2.2 I2V A14B or TI2V model")
        super().check_fits(layout, denoiser)

    def backbone(self, pipe: Any, **kwargs: Any) -> WanBackbone:
        return WanBackbone(pipe, **kwargs)

    def edit_model(self, backbone, steps: int, latent_shape: tuple[int, ...]):
        raise UsageError(_NO_EDIT)


register_family(WanFamily())
