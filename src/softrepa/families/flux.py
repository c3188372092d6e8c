"""FLUX.1 (`FluxTransformer2DModel`, schnell- and dev-style): Algorithm 1 on the dual-stream blocks.

At each selected dual-stream (joint) block k the block's m tokens are prepended to the text stream
and dropped from the block's text output, as for SD3 (the layout, checks and token spaces are
SD3's, so `FluxFamily` derives from `SD3Family`). What FLUX adds is position: the model computes
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

from ..backbone import Backbone, TextCond
from ..errors import SoftrepaError
from ..family import EditPresets, ModelInfo, SamplingDefaults, register_family
from ..flowedit import embedded_flow_denoiser, flow_add_noise, flow_sigmas
from ..hooks import AttachHandle, model_pre_hook
from .sd3 import SD3Family, drop_hook, prepend_hook


class FluxBackbone(Backbone):
    """FLUX.1: rectified flow on packed 2x2 latent patches, velocity target eps - x0.

    Args:
        pipe: a `FluxPipeline`.
        max_sequence_length: T5 length (FLUX: 512 for dev, 256 for schnell).
        guidance: the guidance-embedding scale of guidance-distilled models (FLUX.1-dev's 3.5).
    """

    family = "flux"
    prediction = "flow"

    def __init__(self, pipe: Any, max_sequence_length: int | None = None, guidance: float = 3.5):
        super().__init__(pipe, max_sequence_length)
        self.guidance = float(guidance)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        for name, what in (("text_encoder", "CLIP, the pooled prompt"), ("text_encoder_2", "T5, the prompt tokens")):
            if getattr(self.pipe, name, None) is None:
                raise SoftrepaError(f"FLUX.1 prompts need the pipeline's {name} ({what}), which is missing: "
                                    "load the pipeline with its text encoders")
        embeds, pooled, _ = self.encode_prompt(prompts)  # (N, n_txt, 4096), (N, 768), text ids
        return TextCond(embeds.to(self.dtype), pooled.to(self.dtype))

    def add_noise(self, x0, noise, t):
        sigma = (t.to(x0.device, torch.float32) / 1000.0).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0, noise, t):
        return noise.float() - x0.float()

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
        if self.denoiser.config.guidance_embeds:
            scale = self.guidance if guidance is None else guidance
            guidance = torch.as_tensor(scale, dtype=torch.float32, device=device).expand(b)  # (B,)
        else:
            guidance = None
        out = self.denoiser(hidden_states=packed, timestep=t.to(device) / 1000.0, guidance=guidance,
                            pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
                            img_ids=img_ids, return_dict=False)[0]  # (B, h/2 * w/2, 4C)
        f = int(pipe.vae_scale_factor)
        return pipe._unpack_latents(out, h * f, w * f, f)  # (B, C, h, w)


def first_text_rows(rotary: tuple, m: int) -> tuple:
    """The tokens' rotary rows: m copies of the first text position's (FLUX.1's text ids are all zero,
    so that is the position of every text token)."""
    return tuple(r[:1].expand(m, -1) for r in rotary)  # (cos, sin), each (m, d)


class FluxFamily(SD3Family):
    name = "flux"
    title = "FLUX.1 (dev / schnell)"
    denoiser_class = "FluxTransformer2DModel"
    # FLUX.1-dev's model-card setting (28 steps, guidance 3.5); schnell users pass --steps 4 --cfg 0
    sampling = SamplingDefaults(steps=28, cfg=3.5)
    # FlowEdit's published FLUX.1-dev setting (fallenshock/FlowEdit, FLUX_exp.yaml at 457f402: T_steps 28,
    # n_avg 1, src_guidance_scale 1.5, tar_guidance_scale 5.5, n_min 0, n_max 24), the scales being
    # guidance-embedding values (FlowEdit_utils.FlowEditFLUX). No SoftREPA preset exists for FLUX: with
    # tokens the vanilla numbers are kept, so that a with/without comparison changes only the tokens.
    edit = EditPresets(steps=28, src_cfg=1.5, vanilla=(24, 5.5), tokens=(24, 5.5),
                       source="FlowEdit's FLUX.1-dev setting (Kulikov et al. 2024, fallenshock/FlowEdit "
                              "FLUX_exp.yaml: 28 steps, n_max 24, guidance 1.5 -> 5.5); with tokens the same "
                              "(no SoftREPA FLUX preset)")
    width_names = ("inner_dim (num_attention_heads x attention_head_dim)", "joint_attention_dim")

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, FluxTransformer2DModel)

    def describe(self, denoiser: nn.Module) -> ModelInfo:
        cfg = denoiser.config
        return ModelInfo(self.name, int(cfg.num_attention_heads * cfg.attention_head_dim),
                         int(cfg.joint_attention_dim), len(denoiser.transformer_blocks))

    def install_hooks(self, denoiser: nn.Module, handle: AttachHandle) -> None:
        layout = handle.tokens.layout
        projection = denoiser.context_embedder if layout.token_space == "text" else None
        handle.add(denoiser.register_forward_pre_hook(
            model_pre_hook(handle, projection, "hidden_states", timestep_scale=1000.0), with_kwargs=True))
        for set_index, block_index in enumerate(layout.layers):
            block = denoiser.transformer_blocks[block_index]
            hook = prepend_hook(handle, set_index, rotary_rows=first_text_rows)
            handle.add(block.register_forward_pre_hook(hook, with_kwargs=True))
            handle.add(block.register_forward_hook(drop_hook(handle)))

    def backbone(self, pipe: Any, **kwargs: Any) -> FluxBackbone:
        return FluxBackbone(pipe, **kwargs)

    def edit_model(self, backbone: Backbone, steps: int, latent_shape: tuple[int, ...]):
        """FlowEdit as the official `FlowEditFLUX`: guidance through the embedding, one conditional
        call per branch (`EmbeddedGuidance`; schnell-style models ignore the scale, as there); the
        pipeline's sigma grid linspace(1, 1 / steps, steps), shifted by `calculate_shift` of the
        packed sequence length when the scheduler shifts dynamically (FLUX.1-dev's does)."""
        seq = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)  # packed 2 x 2 latent tokens
        scheduler = backbone.pipe.scheduler
        ntt = scheduler.config.get("num_train_timesteps", 1000)
        sigmas = flow_sigmas(scheduler, steps, seq, base_sigmas=np.linspace(1.0, 1.0 / steps, steps))
        return embedded_flow_denoiser(backbone, ntt), sigmas, flow_add_noise


register_family(FluxFamily())
