"""Stage 2b of the miniature pretraining: a tiny `StableDiffusionPipeline` (SD1.5 layout).

Components are the stock SD1.5 ones at miniature scale: one `CLIPTextModel` with a
character-level tokenizer, the shared 4-channel VAE, a `UNet2DConditionModel` whose down, mid
and up blocks all cross-attend to the text (so SoftREPA's down+mid tokens have somewhere to go)
and a DDIM scheduler for sampling. The text encoder is trained jointly, with 10% caption
dropout for classifier-free guidance.

Parameterisation: v-prediction (SD2.x's; `prediction_type="v_prediction"` in the scheduler
config, which `StableDiffusionPipeline` and softrepa's UNet backbone read), not SD1.5's epsilon.
Where an object goes is decided at high noise, and the epsilon loss weighs the x0 error there
by SNR ~ 0, so an epsilon miniature learns colour and shape but never learns to place objects
from the prompt: measured after 2000 steps, position accuracy 0.12-0.22 (chance 0.25) with
SD1.5's schedule, DDPM's linear schedule, and an x0-floored weighting (which instead
destabilised it), against 1.00 with v-prediction on the same budget (benchmarks/
toy_pretrain.md). v's loss weighs the x0 error by SNR + 1 >= 1 at every noise level, as the
rectified-flow loss of the SD3 miniature does. Architecture, pipeline and sampler are SD1.5's.
Pass prediction_type="epsilon" to train the epsilon variant.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..tiny import _clip_text_encoder, make_clip_tokenizer
from .pretrain_common import (TOKENIZER_MAX_LENGTH, TokenCache, WorldImages, autocast, diffusion_optimizer,
                              optimizer_step)

#: DDPM's linear noise schedule (the one DDPM used for 32x32 CIFAR images, which is what an 8x8x4
#: latent is closer to). SD1.5's scaled-linear schedule leaves sqrt(abar_999) = 0.068 of the signal
#: at the last step; on latents this small the model learns to read the object's *position* from
#: that leftover signal instead of from the prompt, and at sampling time, from pure noise, places
#: objects wherever the noise suggests rather than where the prompt says. Linear betas leave 0.006.
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def build_sd15_components(seed: int = 0, channels: tuple[int, ...] = (32, 64, 64), heads: int = 4,
                          layers_per_block: int = 1, text_width: int = 64, text_layers: int = 3,
                          latent_size: int = 8, latent_channels: int = 4,
                          max_length: int = TOKENIZER_MAX_LENGTH) -> dict:
    """Untrained miniature SD1.5 components (everything but the VAE and scheduler).

    Args:
        seed: init seed (the text encoder uses seed+1).
        channels: UNet block widths; three levels take an 8x8 latent down to 2x2 (whose mid
            block sees the whole image), two levels stop at 4x4.
        heads: attention heads per transformer block (diffusers' `attention_head_dim` is, for
            historical reasons, the head *count* of `UNet2DConditionModel`).
        layers_per_block: resnet+attention layers per down block (up blocks get one more).
        text_width: CLIP hidden size = the UNet's cross-attention width.
        text_layers: CLIP layers (SD1.5 reads the final, layer-normed hidden states).
        latent_size: latent side; the UNet's `sample_size` (image side / VAE factor).
        latent_channels: VAE latent channels.
        max_length: tokenizer length (character tokens, BOS/EOS included).
    Returns:
        dict(tokenizer, text_encoder, unet).
    """
    from diffusers import UNet2DConditionModel

    tok = make_clip_tokenizer(max_length)
    te = _clip_text_encoder(text_width, text_layers, len(tok), max_length, seed + 1, False)
    torch.manual_seed(seed)
    n = len(channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=layers_per_block, block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=text_width,
        attention_head_dim=heads, norm_num_groups=8,
    )
    return dict(tokenizer=tok, text_encoder=te, unet=unet)


def _alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod.float()


def train_sd15(parts: dict, latents: tuple[torch.Tensor, torch.Tensor], data: WorldImages, scale: float,
               steps: int, batch_size: int = 32, lr: float = 5e-4, caption_dropout: float = 0.1,
               min_snr_gamma: float = 5.0, snr_floor: float = 1.0, prediction_type: str = "v_prediction",
               seed: int = 0, amp: bool = False) -> dict:
    """Diffusion training of the UNet and the text encoder (in place).

    Per step: x0 = posterior sample * scale (SD pipelines decode `latents / scaling_factor`
    and ignore any shift), t uniform in 0..999, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, target
    v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (or eps). The loss weight, expressed on the implied x0
    error, is clamp(SNR_t, snr_floor, gamma): min-SNR-gamma (Hang et al. 2023; converges several
    times faster, which matters on a CPU budget) with a floor so high-noise steps, where the
    layout is decided, keep their weight. EMA weights are written back at the end.

    Args:
        parts: output of `build_sd15_components`.
        latents: (mean, std) posteriors of `data`'s images (`encode_posteriors`).
        data: the training scenes (captions are redrawn every step).
        scale: the VAE's scaling factor.
        steps: optimiser steps.
        batch_size: samples per step.
        lr: peak AdamW learning rate.
        caption_dropout: probability of training on the empty prompt instead.
        min_snr_gamma: upper clamp of the x0-error weight (None or 0 = no clamp).
        snr_floor: lower clamp of the x0-error weight (None or 0 = none; plain v loss ~ 1).
        prediction_type: "v_prediction" or "epsilon" (must match `assemble_sd15`).
        seed: seed of batches, captions, noise and timesteps.
        amp: bf16 autocast (off by default: for models this small the casts cost more than
            the faster bf16 matmuls save on a CPU; measured 1.6x slower).
    Returns:
        {"steps", "seconds", "loss"} (loss: mean of the last 100 steps).
    """
    unet, te = parts["unet"], parts["text_encoder"]
    modules = [unet, te]
    for m in modules:
        m.train().requires_grad_(True)
    tokens = TokenCache(parts["tokenizer"])
    params, opt, sched, ema = diffusion_optimizer(modules, lr, steps)
    abar = _alphas_cumprod()
    snr = abar / (1 - abar)
    w_x0 = snr.clamp(min=snr_floor or 0.0, max=min_snr_gamma or float("inf"))
    weight = w_x0 / snr if prediction_type == "epsilon" else w_x0 / (snr + 1)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 15])
    mean, std = latents
    losses, t0 = [], time.perf_counter()
    for _ in tqdm(range(steps), desc="sd15", mininterval=5):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(abar), (batch_size,), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        ids = tokens(data.captions(idx, rng, caption_dropout))
        with autocast(amp):
            ctx = te(ids)[0]  # last_hidden_state: what StableDiffusionPipeline.encode_prompt uses
            pred = unet(x_t, t, encoder_hidden_states=ctx).sample
        target = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (weight[t] * per_sample).mean()
        losses.append(optimizer_step(loss, opt, params, sched, ema))
    ema.copy_to()
    for m in modules:
        m.eval().requires_grad_(False)
    return {"steps": steps, "seconds": time.perf_counter() - t0, "loss": float(np.mean(losses[-100:]))}


def assemble_sd15(parts: dict, vae, prediction_type: str = "v_prediction"):
    """The stock `StableDiffusionPipeline` from trained parts (no safety checker).

    The scheduler is DDIM on the training schedule with "trailing" timestep spacing, so a
    short sampling run starts at t = 999, the noise level the model was trained to start from
    (SD1.5's "leading" spacing starts lower and leaves some noise unexplained).

    Args:
        parts: output of `build_sd15_components` (trained).
        vae: the shared VAE.
        prediction_type: what the UNet was trained to predict.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SD15_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="trailing", prediction_type=prediction_type)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


__all__ = ["SD15_SCHEDULE", "assemble_sd15", "build_sd15_components", "train_sd15"]
