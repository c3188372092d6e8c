"""FLUX.1 (`FluxTransformer2DModel`, schnell- and dev-style): Algorithm 1 on the dual-stream blocks.

At each selected dual-stream (joint) block k the block's m tokens are prepended to the text stream
and dropped from the block's text output, as for SD3 (the dual-stream template, one token set per
selected block of `transformer_blocks`). What FLUX adds is position: the model computes
rotary embeddings once, before the blocks, over the concatenated (text ids, image ids), and hands
them to every block. A selected block sees m + n_txt text positions, so its pre-hook also prepends
m rows to the rotary (cos, sin): the rows of the first text position. FLUX's text ids are all zero
(the pipeline's `text_ids`), so the tokens get exactly the position of every text token — they are
text to the model — and a text id layout with other values still gives the tokens a text position.
The single-stream blocks get no tokens: the tokens have left the text stream before them, so the
rotary there is the model's own (n_txt + n_img rows) and needs no change.

Timesteps: the pipeline calls the transformer with t / 1000 (it multiplies by 1000 inside), so the
token pre-hook rescales by 1000 onto the tokens' bucket scale. Guidance-distilled models
(FLUX.1-dev, `guidance_embeds=True`) get their guidance scale through the embedding, one
conditional branch (the tokens are on it); the stock pipeline's `true_cfg_scale` with a negative
prompt runs two branches, both with tokens. FlowEdit follows the official `FlowEditFLUX`: each
branch (source, target) is one conditional call with its own guidance-embedding value
(`softrepa.flowedit.EmbeddedGuidance`), tokens (when attached) on both.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from ..backbone import TextCond
from ..family import Family, SamplingDefaults, register_family
from ..flow import FLOWEDIT_FLUX_DEV, FlowBackbone, flow_edit_model
from ..flowedit import flow_sigmas
from ..rotary import first_text_rows
from ..templates import DUAL_STREAM, Placement


class FluxBackbone(FlowBackbone):
    """FLUX.1: rectified flow on packed 2x2 latent patches, velocity target eps - x0.

    Args:
        pipe: a `FluxPipeline`.
        max_sequence_length: T5 length (FLUX: 512 for dev, 256 for schnell; default the family's 512).
        guidance: the guidance-embedding scale of guidance-distilled models (FLUX.1-dev's 3.5).
    """

    default_guidance = 3.5
    text_parts = (("text_encoder", "CLIP, the pooled prompt"), ("text_encoder_2", "T5, the prompt tokens"))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        embeds, pooled, _ = self.encode_prompt(prompts)  # (N, n_txt, 4096), (N, 768), text ids
        return TextCond(embeds.to(self.dtype), pooled.to(self.dtype))

    def denoise(self, x_t, t, cond, guidance: float | torch.Tensor | None = None):
        """Velocity for (B, C, h, w) latents.

        Args:
            x_t: (B, C, h, w) noised latents.
            t: (B,) timesteps on the 0..1000 scale.
            cond: the prompts' `TextCond` (T5 embeds, CLIP pooled).
            guidance: guidance-embedding scale, a float or (B,) per sample (FlowEdit's branches);
                default `self.guidance`. Ignored by models without a guidance embedding (schnell).
        """
        b, c, h, w = x_t.shape
        pipe, device = self.pipe, x_t.device
        packed = pipe._pack_latents(x_t, b, c, h, w)  # (B, h/2 * w/2, 4C)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, x_t.dtype)  # (h/2 * w/2, 3)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=device, dtype=x_t.dtype)  # FLUX: all zero
        out = self.denoiser(hidden_states=packed, timestep=t.to(device) / 1000.0,
                            guidance=self.guidance_vector(b, device, guidance),
                            pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
                            img_ids=img_ids, return_dict=False)[0]  # (B, h/2 * w/2, 4C)
        f = int(pipe.vae_scale_factor)
        return pipe._unpack_latents(out, h * f, w * f, f)  # (B, C, h, w)


class FluxFamily(Family):
    name = "flux"
    title = "FLUX.1 (dev / schnell)"
    denoiser_class = "FluxTransformer2DModel"
    sampling = SamplingDefaults(steps=28, cfg=3.5)  # FLUX.1-dev's model card; schnell: --steps 4 --cfg 0
    edit = FLOWEDIT_FLUX_DEV
    cfg_branches = "calls"  # true CFG: one call per branch, inside transformer.cache_context("cond" / "uncond")
    text_length = 512  # FLUX.1-dev's T5 length (schnell's 256 is an explicit --max-sequence-length)
    # the pipeline calls the transformer with t / 1000; the tokens' buckets are on the 0..1000 scale
    placement = Placement(DUAL_STREAM, timestep_scale=1000.0, rotary_arg="image_rotary_emb", rotary=first_text_rows)

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, FluxTransformer2DModel)

    def backbone(self, pipe: Any, **kwargs: Any) -> FluxBackbone:
        return FluxBackbone(pipe, **kwargs)

    def edit_model(self, backbone, steps: int, latent_shape: tuple[int, ...]):
        """FlowEdit as the official `FlowEditFLUX`: guidance through the embedding, one conditional
        call per branch (`EmbeddedGuidance`; schnell-style models ignore the scale, as there); the
        pipeline's sigma grid linspace(1, 1 / steps, steps), shifted by `calculate_shift` of the
        packed sequence length when the scheduler shifts dynamically (FLUX.1-dev's does)."""
        seq = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)  # packed 2 x 2 latent tokens
        sigmas = flow_sigmas(backbone.pipe.scheduler, steps, seq, base_sigmas=np.linspace(1.0, 1.0 / steps, steps))
        return flow_edit_model(backbone, sigmas, embedded=True)


register_family(FluxFamily())
