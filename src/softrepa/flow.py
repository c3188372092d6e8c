"""The one backbone of the flow-matching families (SD3, FLUX.1, FLUX.2, Qwen-Image, ...).

Rectified flow on the 0..1000 training scale: sigma = t / 1000, x_t = (1 - sigma) x0 + sigma eps,
target = eps - x0 (the velocity the models predict). A flow family's backbone derives from
`FlowBackbone` and adds only what is its own: prompt encoding, the call of its denoiser (packing,
ids, the timestep it expects) and, where its latent is not the VAE's, the latent maps of
`softrepa.backbone.Backbone`. `flow_edit_model` assembles FlowEdit's (denoise, sigmas, add_noise)
for any of them.
"""

from __future__ import annotations

from typing import Any

import torch

from .backbone import Backbone
from .family import EditPresets
from .flowedit import embedded_flow_denoiser, flow_add_noise, flow_denoiser


#: FlowEdit's published FLUX.1-dev setting (fallenshock/FlowEdit, FLUX_exp.yaml at 457f402: T_steps 28, n_avg 1,
#: src_guidance_scale 1.5, tar_guidance_scale 5.5, n_min 0, n_max 24), the scales being guidance-embedding
#: values (FlowEdit_utils.FlowEditFLUX). No SoftREPA preset exists for FLUX: with tokens the vanilla
#: numbers are kept, so that a with / without comparison changes only the tokens.
FLOWEDIT_FLUX_DEV = EditPresets(steps=28, src_cfg=1.5, vanilla=(24, 5.5), tokens=(24, 5.5),
                                source="FlowEdit's FLUX.1-dev setting (Kulikov et al. 2024, fallenshock/FlowEdit "
                                       "FLUX_exp.yaml: 28 steps, n_max 24, guidance 1.5 -> 5.5); with tokens the "
                                       "same (no SoftREPA FLUX preset)")


class FlowBackbone(Backbone):
    """Rectified-flow backbone: noise, target and the guidance embedding of guidance-distilled models.

    Args:
        pipe: a loaded pipeline of a flow family.
        max_sequence_length: text length (default: the family's `text_length`).
        guidance: guidance-embedding scale of guidance-distilled models (default `default_guidance`);
            models without the embedding ignore it.
    """

    prediction = "flow"
    default_guidance: float | None = None  # FLUX.1-dev's 3.5, FLUX.2-dev's 4.0

    def __init__(self, pipe: Any, max_sequence_length: int | None = None, guidance: float | None = None):
        super().__init__(pipe, max_sequence_length)
        guidance = self.default_guidance if guidance is None else guidance
        self.guidance = None if guidance is None else float(guidance)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (t.to(x0.device, torch.float32) / 1000.0).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise.float() - x0.float()

    def guidance_vector(self, b: int, device: torch.device,
                        guidance: float | torch.Tensor | None = None) -> torch.Tensor | None:
        """(B,) guidance-embedding values for a call, or None for a model without the embedding.

        Args:
            b: batch size.
            device: where the model runs.
            guidance: a float or (B,) per sample (FlowEdit's branches); default `self.guidance`.
        """
        if not getattr(self.denoiser.config, "guidance_embeds", False):
            return None
        scale = self.guidance if guidance is None else guidance
        return torch.as_tensor(scale, dtype=torch.float32, device=device).expand(b)  # (B,)


def flow_edit_model(backbone: Backbone, sigmas: torch.Tensor, *, embedded: bool = False) -> tuple[Any, Any, Any]:
    """FlowEdit's (denoise, sigmas, add_noise) of a flow family.

    Args:
        backbone: the family's backbone.
        sigmas: (steps + 1,) the family's sigma grid (its pipeline's).
        embedded: guide through the guidance embedding, one conditional call per branch (FLUX-style
            guidance-distilled or step-distilled models), instead of two CFG branches.
    """
    ntt = backbone.pipe.scheduler.config.get("num_train_timesteps", 1000)
    denoise = embedded_flow_denoiser(backbone, ntt) if embedded else flow_denoiser(backbone, ntt)
    return denoise, sigmas, flow_add_noise


def latent_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (1, C, 1, 1) of a video VAE's latents (`latents_mean` /
    `latents_std` in its config: Qwen-Image's, Wan's), in `like`'s dtype and device; the families
    that train on one-frame clips normalise with them as their pipelines decode.

    Example:
        >>> mean, std = latent_stats(pipe.vae, z)   # z: (B, C, h, w)
        >>> x = (z - mean) / std
    """
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)  # (1, C, 1, 1)
    std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    return mean, std


def batch_norm_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (1, 4C, 1, 1) of the latent batch norm of FLUX.2's VAE (`AutoencoderKLFlux2.bn`, over
    2 x 2 latent patches), in `like`'s dtype and device; FLUX.2 and FLUX.3 normalise their patch latents
    with them as their pipelines encode and decode.

    Example:
        >>> mean, std = batch_norm_stats(pipe.vae, patches)   # patches: (B, 4C, h, w)
        >>> x = (patches - mean) / std
    """
    bn = vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


__all__ = ["FLOWEDIT_FLUX_DEV", "FlowBackbone", "batch_norm_stats", "flow_edit_model", "latent_stats"]
