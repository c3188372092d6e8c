"""SANA (`SanaTransformer2DModel`, `SanaPipeline`): a cross-attention DiT, tokens inserted into the
caption context of the first L blocks, the text-mask bias growing with zeros.

SANA's blocks read text only through cross-attention (`attn2`); self-attention is linear over the
image tokens and never sees text. The model projects the Gemma-2 hidden states once, before the
blocks (`caption_projection`, then the per-token `caption_norm` RMS norm), and hands every block the
same context (B, n_txt, D). Each selected block k gets `[s_1..s_m, context]` as its
`encoder_hidden_states` (the cross-attention template at position 0, one token set per block of
`transformer_blocks`); nothing is dropped because a cross-attention block never returns its context.

The text mask. The pipeline pads every prompt to `max_sequence_length` (mask 0 there); the model
turns the (B, n_txt) mask into an additive bias `(1 - mask) * -10000`, shape (B, 1, n_txt), *before*
the blocks, and each block's `SanaAttnProcessor2_0` adds it to the cross-attention logits. A
selected block therefore receives a (B, 1, n_txt) bias that must grow by m columns: the tokens get
**0** (`mask_kind="bias"`), i.e. every image query attends to them, which is what the tokens are for
(a -10000 would hide them). The template's mask insertion works on the last axis, so the bias needs
no SANA-specific code.

Prompts. The stock `SanaPipeline.__call__` prepends its long "complex human instruction" (CHI) to
every prompt and keeps `[BOS] + the last max_sequence_length - 1` positions; `encode_prompt` alone
does not (its default is no CHI). Training must see the conditioning that sampling sees, so the
backbone passes the pipeline call's own default CHI to `encode_prompt`. The negative prompt of CFG
is encoded without CHI, as the pipeline does; the tokens are on both branches.

Latents. `AutoencoderDC` is deterministic (no posterior): `encode` returns the latent itself, so a
training latent and FlowEdit's source are both `latent * scaling_factor` (the pipeline decodes
`latent / scaling_factor`). Training: rectified flow (`FlowBackbone`), the transformer called with
t on the 0..1000 scale times the model's `timestep_scale` (the pipeline's call).

Not supported: SANA-Sprint (`guidance_embeds=True`, SCM / TrigFlow sampling through
`SanaSprintPipeline`): another parameterisation than the flow one trained here (refused by name).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from diffusers import SanaTransformer2DModel
from torch import nn

from ..backbone import TextCond
from ..errors import SoftrepaError, SoftTokensError
from ..family import EditPresets, Family, SamplingDefaults, register_family
from ..flow import FlowBackbone, flow_edit_model
from ..flowedit import flow_sigmas
from ..templates import CROSS_ATTENTION, Placement, per_layer
from ..tokens import TokenLayout

#: key of `TextCond.extra`: the (N, L) text mask, 1 for prompt tokens, 0 for padding
MASK = "mask"


class SanaBackbone(FlowBackbone):
    """SANA: rectified flow on `AutoencoderDC` latents, velocity target eps - x0.

    Args:
        pipe: a `SanaPipeline`.
        max_sequence_length: Gemma positions per prompt (the pipeline's default 300).
    """

    text_parts = (("text_encoder", "Gemma-2, the prompt tokens"), ("tokenizer", "its tokenizer"))

    def _instruction(self) -> list[str] | None:
        """The complex human instruction the stock pipeline call prepends by default (None: none)."""
        param = inspect.signature(type(self.pipe).__call__).parameters.get("complex_human_instruction")
        return None if param is None else param.default

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        """N prompts -> embeds (N, L, D_text) and extra["mask"] (N, L), as the pipeline call encodes them.

        Args:
            prompts: N prompts.
            resolution: unused (SANA has no size conditioning).
        Raises:
            SoftrepaError: the pipeline has no text encoder or tokenizer.
        """
        missing = [name for name, _ in self.text_parts if getattr(self.pipe, name, None) is None]
        if missing:
            raise SoftrepaError(f"{self._family.title}: the pipeline has no {', '.join(missing)} (Gemma-2 and its "
                                "tokenizer), which prompts need: load the pipeline with its text encoders")
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.max_sequence_length, complex_human_instruction=self._instruction())
        return TextCond(embeds.to(self.dtype), None, {MASK: mask})  # (N, L, D), (N, L)

    # ------------------------------------------------------------- a deterministic autoencoder
    def _latent(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        return vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent  # (B, C, H/f, W/f)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: Any = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> model latents (B, C, h, w); DC-AE has no posterior to sample,
        so `generator` is not used (the latent of an image is the same in every batch and rank)."""
        return self.latents_from_vae(self._latent(pixels)).to(self.dtype)

    @torch.no_grad()
    def encode_source(self, pixels: torch.Tensor) -> torch.Tensor:
        """FlowEdit's source: the (deterministic) latent in float32."""
        return self.latents_from_vae(self._latent(pixels)).float()

    # ------------------------------------------------------------- the model call
    def denoise(self, x_t, t, cond):
        """Velocity for (B, C, h, w) latents; t (B,) on the 0..1000 scale."""
        cfg = self.denoiser.config
        mask = cond.extra.get(MASK)
        out = self.denoiser(x_t, encoder_hidden_states=cond.embeds, timestep=t.to(x_t.device) * cfg.timestep_scale,
                            encoder_attention_mask=None if mask is None else mask.to(x_t.device),
                            return_dict=False)[0]  # (B, C_out, h, w)
        if cfg.out_channels // 2 == cfg.in_channels:  # learned sigma: the pipeline keeps the first half
            out = out.chunk(2, dim=1)[0]
        return out


def per_call_timestep(denoiser: nn.Module, timestep: torch.Tensor) -> torch.Tensor:
    """The pipeline calls the transformer with t x `timestep_scale`: back onto the 0..1000 scale."""
    return torch.as_tensor(timestep) / float(denoiser.config.timestep_scale)


class SanaFamily(Family):
    name = "sana"
    title = "SANA"
    denoiser_class = "SanaTransformer2DModel"
    # `SanaPipeline.__call__`'s defaults (the model cards' setting): 20 steps, CFG 4.5
    sampling = SamplingDefaults(steps=20, cfg=4.5)
    # No published FlowEdit setting exists for SANA. Its sigma grid (DPM-Solver++ flow sigmas, flow_shift 3)
    # is SD3's to within 0.004 at every step of 50 (sigma 0.853 at 33 of 50 vs SD3's 0.850; 0.818 at 30 vs
    # 0.814), and it guides with two CFG branches like SD3, so SD3's presets start at the same noise level.
    edit = EditPresets(steps=50, src_cfg=3.5, vanilla=(33, 13.5), tokens=(30, 9.0),
                       source="chosen for softrepa, no official SANA FlowEdit setting: SD3's (FlowEdit; SoftREPA "
                              "Tables 5-6), whose noise levels SANA's flow_shift-3 grid matches")
    cfg_branches = "batch"  # the stock pipeline runs CFG as one call on [uncond; cond] rows
    text_length = 300  # the pipeline's default max_sequence_length (after the CHI prefix)
    repeated_blocks = ("SanaTransformerBlock",)
    # [s_1..s_m, caption] into the cross-attention context; the additive mask bias (B, 1, n) gets 0s
    placement = Placement(CROSS_ATTENTION, select=per_layer("transformer_blocks"), position=0,
                          mask_arg="encoder_attention_mask", mask_kind="bias", timestep_rule=per_call_timestep)
    width_names = ("inner_dim (num_attention_heads x attention_head_dim)", "caption_channels")
    projection_modules = ("caption_projection", "caption_norm")  # the caption's own way into the blocks

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, SanaTransformer2DModel)

    def widths(self, denoiser: nn.Module) -> tuple[int, int]:
        cfg = denoiser.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim), int(cfg.caption_channels)

    def check_fits(self, layout: TokenLayout, denoiser: nn.Module) -> None:
        if denoiser.config.guidance_embeds:
            raise SoftTokensError("SANA-Sprint models (guidance_embeds=True, SCM sampling) are not supported: "
                                  "expected a SanaPipeline model")
        super().check_fits(layout, denoiser)

    def guidance_kwargs(self, cfg: float) -> dict[str, Any]:
        """CFG scale, and no resolution binning: the pipeline would otherwise render at the nearest size
        of its aspect-ratio table (1024-px class for a 1024 model) and resize, while softrepa trains,
        generates and edits at the size asked for."""
        return {"guidance_scale": cfg, "use_resolution_binning": False}

    def backbone(self, pipe: Any, **kwargs: Any) -> SanaBackbone:
        return SanaBackbone(pipe, **kwargs)

    def edit_model(self, backbone, steps: int, latent_shape: tuple[int, ...]):
        """FlowEdit on the pipeline's own sigma grid (its scheduler's `set_timesteps`; no dynamic shift)."""
        return flow_edit_model(backbone, flow_sigmas(backbone.pipe.scheduler, steps))


register_family(SanaFamily())
