"""SD3 / SD3.5 (`SD3Transformer2DModel`, MM-DiT): Algorithm 1 on the joint blocks, dual-stream template.

At each selected joint block k the block's m tokens are prepended to the text hidden states
entering the block, and the first m positions are dropped from the block's text output, so the
next block sees the plain text stream again (and, if selected, its own fresh tokens). SD3 has no
positional embedding on the text stream and no text mask, so nothing else has to follow the
m extra positions. Training and sampling: rectified flow (`softrepa.flow.FlowBackbone`), the
transformer called with t on the 0..1000 scale.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import SD3Transformer2DModel
from torch import nn

from ..backbone import TextCond
from ..family import EditPresets, Family, SamplingDefaults, register_family
from ..flow import FlowBackbone, flow_edit_model
from ..flowedit import flow_sigmas
from ..templates import DUAL_STREAM, Placement


class SD3Backbone(FlowBackbone):
    """SD3 / SD3.5: CLIP-L + CLIP-G + T5 prompts (pooled vector and sequence), latents (B, C, h, w).
    T5 may be absent (the pipeline then feeds zeros, as SD3 allows); the two CLIPs may not."""

    text_parts = (("text_encoder", "CLIP-L"), ("text_encoder_2", "CLIP-G"))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        out = self.encode_prompt(prompts)  # (embeds, negative, pooled, negative pooled)
        return TextCond(out[0].to(self.dtype), out[2].to(self.dtype))

    def denoise(self, x_t, t, cond):
        return self.denoiser(hidden_states=x_t, timestep=t.to(x_t.device), encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.pooled, return_dict=False)[0]


class SD3Family(Family):
    name = "sd3"
    title = "SD3 / SD3.5"
    denoiser_class = "SD3Transformer2DModel"
    sampling = SamplingDefaults(steps=28, cfg=4.0)  # paper Table 4
    edit = EditPresets(steps=50, src_cfg=3.5, vanilla=(33, 13.5), tokens=(30, 9.0),
                       source="FlowEdit's SD3 setting (vanilla); SoftREPA Tables 5-6 (tokens)")
    cfg_branches = "batch"  # the stock pipeline runs CFG as one call on [uncond; cond] rows
    text_length = 512  # the recipe's T5 length (the authors' SD3 training); the pipeline's own default is 256
    repeated_blocks = ("JointTransformerBlock",)  # SD3Transformer2DModel declares no `_repeated_blocks`
    placement = Placement(DUAL_STREAM)  # no text positions, no text mask
    width_names = ("caption_projection_dim", "joint_attention_dim")

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, SD3Transformer2DModel)

    def widths(self, denoiser: nn.Module) -> tuple[int, int]:
        return int(denoiser.config.caption_projection_dim), int(denoiser.config.joint_attention_dim)

    def backbone(self, pipe: Any, **kwargs: Any) -> SD3Backbone:
        return SD3Backbone(pipe, **kwargs)

    def edit_model(self, backbone, steps: int, latent_shape: tuple[int, ...]):
        patch = getattr(backbone.denoiser.config, "patch_size", 1) or 1
        seq = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)  # latent tokens, for dynamic shifting
        return flow_edit_model(backbone, flow_sigmas(backbone.pipe.scheduler, steps, seq))


register_family(SD3Family())
