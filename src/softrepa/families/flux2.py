"""FLUX.2 (`Flux2Transformer2DModel`; `Flux2Pipeline`, `Flux2KleinPipeline`): Algorithm 1 on the dual-stream blocks.

FLUX.2 [klein] uses the same transformer class without the guidance embedding and a Qwen3 text
encoder; its pipeline's `encode_prompt` and ids are FLUX.2's, so one family serves both (tested on a
tiny `Flux2KleinPipeline`, base and step-distilled: `tests/test_family_flux2_klein.py`).

As for SD3 and FLUX.1, at each selected dual-stream block k the block's m tokens are prepended to
the text stream and dropped from the block's text output (the single-stream blocks come after every
dual-stream block, so the tokens have left the stream before them): the dual-stream template, one
token set per selected block; what differs from FLUX.1 is position, latents and the text encoder.

Positions. FLUX.2 ids have four axes (T, H, W, L): text (0, 0, 0, l) for l = 0 .. n_txt - 1 — a
*sequence* on the L axis, not FLUX.1's all-zero ids — and image (0, h, w, 0). The m tokens take the
ids of m text positions just before the first text token (`softrepa.rotary` says why, and why FLUX.3
takes another rule). FLUX.2 has no text attention mask (padding is attended to), so nothing else follows.

Latents. The model's latent is the VAE latent in 2 x 2 patches (4C channels, half the side),
normalised by the VAE's batch-norm statistics, then packed to (B, h * w, 4C) with ids (0, h, w, 0).
The backbone works on the unpacked (B, 4C, h, w) patch latent; `encode_images` / `decode_latents`
(and `encode_source`, FlowEdit's deterministic source) include the patching and the
batch norm, so the trainer and FlowEdit see one flow-matching space: x_t = (1 - sigma) x0 +
sigma eps, target eps - x0, sigma = t / 1000 (the pipeline calls the model with t / 1000).

Guidance. FLUX.2-dev is guidance-distilled (`guidance_embeds=True`): one conditional branch with
the guidance embedding, the tokens on it; FlowEdit makes one conditional call per branch with the
branch's guidance value (`softrepa.flowedit.EmbeddedGuidance`), as for FLUX.1-dev. A FLUX.2
transformer without the embedding is edited as its pipeline samples it (`Flux2Family.edit_model`):
true CFG, or no guidance when the pipeline says the model is step-distilled.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import Flux2Transformer2DModel
from torch import nn

from ..backbone import TextCond
from ..family import Family, SamplingDefaults, register_family
from ..flow import FLOWEDIT_FLUX_DEV, FlowBackbone, batch_norm_stats, flow_edit_model
from ..flowedit import flow_sigmas
from ..rotary import prepend_token_rows, token_ids, token_rotary  # noqa: F401  (token_ids: re-exported)
from ..templates import DUAL_STREAM, Placement


class Flux2Backbone(FlowBackbone):
    """FLUX.2: rectified flow on batch-normed 2 x 2 latent patches, velocity target eps - x0.

    Args:
        pipe: a `Flux2Pipeline`.
        max_sequence_length: Mistral prompt length (default the family's 512, the pipeline's).
        guidance: the guidance-embedding scale of guidance-distilled models (the pipeline's 4.0).
    """

    default_guidance = 4.0

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        embeds, _ = self.encode_prompt(prompts)  # (N, n_txt, 3 * hidden), text ids (rebuilt in denoise)
        return TextCond(embeds.to(self.dtype))

    # ---------------------------------------------------------------- latents: patches + batch norm
    def latents_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H/f, W/f) VAE latent -> (B, 4C, H/2f, W/2f) model latent (2 x 2 patches, batch-normed).

        FlowEdit's source (`encode_source`) is the posterior *mode* through this map, as the pipeline
        encodes reference images."""
        patches = self.pipe._patchify_latents(z)  # (B, 4C, H/2f, W/2f)
        mean, std = batch_norm_stats(self.vae, patches)
        return (patches - mean) / std

    def vae_from_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4C, h, w) model latents -> (B, C, 2h, 2w) VAE latents."""
        mean, std = batch_norm_stats(self.vae, x)
        return self.pipe._unpatchify_latents(x * std + mean)

    # ---------------------------------------------------------------- the model call
    def denoise(self, x_t, t, cond, guidance: float | torch.Tensor | None = None):
        """Velocity for (B, 4C, h, w) model latents.

        Args:
            x_t: (B, 4C, h, w) noised latents.
            t: (B,) timesteps on the 0..1000 scale.
            cond: the prompts' `TextCond` (stacked Mistral hidden states).
            guidance: guidance-embedding scale, a float or (B,) per sample (FlowEdit's branches);
                default `self.guidance`. Ignored by models without a guidance embedding.
        """
        b, c, h, w = x_t.shape
        device = x_t.device
        packed = x_t.flatten(2).transpose(1, 2)  # (B, h * w, 4C), as Flux2Pipeline._pack_latents
        img_ids = self.pipe._prepare_latent_ids(x_t).to(device)  # (B, h * w, 4): (0, row, col, 0)
        txt_ids = self.pipe._prepare_text_ids(cond.embeds).to(device)  # (B, n_txt, 4): (0, 0, 0, l)
        out = self.denoiser(hidden_states=packed, timestep=t.to(device) / 1000.0,
                            guidance=self.guidance_vector(b, device, guidance),
                            encoder_hidden_states=cond.embeds, txt_ids=txt_ids, img_ids=img_ids,
                            return_dict=False)[0]  # (B, h * w, 4C)
        return out.transpose(1, 2).reshape(b, c, h, w)  # (B, 4C, h, w)


class Flux2Family(Family):
    name = "flux2"
    title = "FLUX.2 (dev, klein)"
    denoiser_class = "Flux2Transformer2DModel"
    sampling = SamplingDefaults(steps=50, cfg=4.0)  # Flux2Pipeline.__call__'s defaults in diffusers 0.42.1
    # No FlowEdit setting is published for FLUX.2: FLUX.1-dev's is carried over, FLUX.2-dev being
    # guidance-distilled with the embedding on the same scale (its sampling default 4.0, FLUX.1-dev's 3.5)
    edit = replace(FLOWEDIT_FLUX_DEV, source="FlowEdit's FLUX.1-dev setting carried over (fallenshock/FlowEdit "
                   "FLUX_exp.yaml: 28 steps, n_max 24, guidance 1.5 -> 5.5); not tuned for FLUX.2; same with tokens")
    cfg_branches = "calls"  # true CFG: one call per branch, inside transformer.cache_context("cond" / "uncond")
    text_length = 512  # Flux2Pipeline's prompt length (tokenizer_max_length 512)
    placement = Placement(DUAL_STREAM, timestep_scale=1000.0, rotary_arg="image_rotary_emb",
                          rotary=prepend_token_rows, call_state=token_rotary)

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, Flux2Transformer2DModel)

    def backbone(self, pipe: Any, **kwargs: Any) -> Flux2Backbone:
        return Flux2Backbone(pipe, **kwargs)

    def edit_model(self, backbone, steps: int, latent_shape: tuple[int, ...]):
        """FlowEdit guided as the stock pipeline samples the model, on the pipeline's own sigma grid:
        linspace(1, 1 / steps, steps) shifted by FLUX.2's `compute_empirical_mu` of the latent
        sequence length (the (h, w) of the patch latent) and the number of steps.

        Guidance: FLUX.2-dev (`guidance_embeds`) through the embedding, one conditional call per
        branch (`EmbeddedGuidance`); a model without a guidance embedding whose pipeline guides with
        true CFG (`Flux2KleinPipeline` of a base model) through FlowEdit's two CFG branches with the
        empty negative prompt; a step-distilled one (`is_distilled`) takes no guidance, so its scales
        are ignored (plain conditional velocities, as the official FlowEdit runs FLUX.1-schnell).
        """
        # imported here: the pipeline module pulls in transformers' Mistral3, which `import softrepa` need not
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        seq = latent_shape[-2] * latent_shape[-1]  # packed tokens: one per 2 x 2 patch
        scheduler = backbone.pipe.scheduler
        base = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1.0 / steps, steps)
        sigmas = flow_sigmas(scheduler, steps, seq, base_sigmas=base, mu=compute_empirical_mu(seq, steps))
        distilled = bool(getattr(backbone.pipe.config, "is_distilled", False))
        return flow_edit_model(backbone, sigmas, embedded=backbone.denoiser.config.guidance_embeds or distilled)


register_family(Flux2Family())
