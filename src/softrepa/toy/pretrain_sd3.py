"""Stage 2a of the miniature pretraining: a tiny `StableDiffusion3Pipeline` trained from scratch.

Components are the stock SD3 ones at miniature scale: two `CLIPTextModelWithProjection`
encoders with character-level tokenizers, the shared VAE, an `SD3Transformer2DModel` (MM-DiT)
and `FlowMatchEulerDiscreteScheduler`. The text encoders are trained jointly with the
transformer (rectified-flow loss, logit-normal noise levels, 10% caption dropout for
classifier-free guidance).

T5 is omitted in substance: SD3 without T5 feeds all-zero "T5" embeddings. Saved with
`text_encoder_3=None`, though, a folder does not load with a plain
`StableDiffusion3Pipeline.from_pretrained(path)` in diffusers 0.42 (the loader insists the null
component be passed explicitly). So by default the folder carries a *null T5*
(`null_t5_encoder`): a zero-layer `T5EncoderModel` whose embeddings and final norm are zero, so
it outputs exact zeros, the very tensor the pipeline builds when T5 is absent (12k parameters,
all zero). `assemble_sd3(..., null_t5=False)` gives the literal `text_encoder_3=None` variant.

Either way the stock pipeline appends `max_sequence_length` (default 256) all-zero "T5"
tokens to the prompt. They all enter the transformer as the same vector and stay identical in
every block, so together they act like one key/value whose attention logit is raised by
log(count). Training therefore carries a single zero token and adds log(k) to its logit
(`CollapsedNullAttnProcessor`, exact; see tests), with k drawn log-uniformly in 1..512: the
trained model is then right for the pipeline default (256), for SoftREPA's training configs
(512) and for a short, fast `max_sequence_length` alike (measured in benchmarks/
toy_pretrain.md), at the cost of one extra token.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UsageError
from ..tiny import _clip_text_encoder, make_clip_tokenizer
from .pretrain_common import (TOKENIZER_MAX_LENGTH, TokenCache, WorldImages, autocast, diffusion_optimizer,
                              optimizer_step)


class CollapsedNullAttnProcessor:
    """`JointAttnProcessor2_0` where the last context token stands for k identical copies.

    k identical keys/values contribute k * exp(q.k) v to the softmax numerator and k * exp(q.k)
    to its denominator, i.e. exactly one copy with logit q.k + log k. Set `log_k` ((B,) tensor)
    before each forward; None = plain joint attention. Training-time only: the saved model
    uses the stock processor.
    """

    def __init__(self):
        self.log_k: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b = hidden_states.shape[0]
        n_img = hidden_states.shape[1]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        mask = None
        if encoder_hidden_states is not None:
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            if self.log_k is not None:
                mask = torch.zeros(b, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
                mask[:, 0, 0, -1] = self.log_k.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3]).to(q.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](img)), ctx


def build_sd3_components(seed: int = 0, width: int = 64, layers: int = 6, heads: int = 4,
                         text_width: int = 64, text_layers: int = 3, patch_size: int = 2,
                         latent_size: int = 8, latent_channels: int = 4,
                         max_length: int | None = None, tokenizer: str = "char") -> dict:
    """Untrained miniature SD3 components (everything but the VAE and scheduler).

    Args:
        seed: init seed (text encoders use seed+1, seed+2).
        width: transformer width (= heads * head dim = caption projection).
        layers: transformer depth (>= 6 so SoftREPA's 5 token layers fit).
        heads: attention heads.
        text_width: hidden size of each CLIP encoder; the joint context is 2 * text_width wide.
        text_layers: CLIP layers (SD3 reads the penultimate layer, the last one feeds `pooled`).
        patch_size: 2 = one image token per 2x2 latent patch (16 tokens for an 8x8 latent, as
            SD3 itself). Measured against 1 (64 tokens): 1.6x faster per step and better shapes
            on the same wall-clock budget (judge accuracy 0.80 vs 0.34 on one-object prompts).
        latent_size: latent side (image side / VAE factor); the transformer's `sample_size`.
        latent_channels: VAE latent channels.
        max_length: tokenizer length, BOS/EOS included (default: 64 for characters, 16 for words).
        tokenizer: "word" (every world word one token, `pretrain_text.make_word_tokenizer`: the
            second-generation miniature) or "char" (character tokens: the first one).
    Returns:
        dict(tokenizer, tokenizer_2, text_encoder, text_encoder_2, transformer).
    """
    from diffusers import SD3Transformer2DModel

    from .pretrain_text import WORD_MAX_LENGTH, make_word_tokenizer

    if tokenizer not in ("word", "char"):
        raise UsageError(f"tokenizer must be 'word' or 'char', got {tokenizer!r}")
    make = make_word_tokenizer if tokenizer == "word" else make_clip_tokenizer
    max_length = max_length or (WORD_MAX_LENGTH if tokenizer == "word" else TOKENIZER_MAX_LENGTH)
    tok = make(max_length)
    te1 = _clip_text_encoder(text_width, text_layers, len(tok), max_length, seed + 1, True)
    te2 = _clip_text_encoder(text_width, text_layers, len(tok), max_length, seed + 2, True)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=patch_size, in_channels=latent_channels,
        out_channels=latent_channels, num_layers=layers, attention_head_dim=width // heads,
        num_attention_heads=heads, joint_attention_dim=2 * text_width, caption_projection_dim=width,
        pooled_projection_dim=2 * text_width, pos_embed_max_size=latent_size // patch_size,
    )
    return dict(tokenizer=tok, tokenizer_2=make(max_length), text_encoder=te1,
                text_encoder_2=te2, transformer=transformer)


def sd3_text_context(text_encoder, text_encoder_2, ids: torch.Tensor, ids_2: torch.Tensor | None = None):
    """Prompt embeddings as `StableDiffusion3Pipeline.encode_prompt` builds them, minus T5.

    Each CLIP contributes its penultimate hidden states (features concatenated) and its
    projected EOS embedding (`pooled`, concatenated).

    Args:
        text_encoder, text_encoder_2: the two `CLIPTextModelWithProjection`.
        ids, ids_2: token ids from each tokenizer (ids_2 defaults to ids: the two miniature
            tokenizers are identical).
    Returns:
        (context (B, L, 2 * text_width), pooled (B, 2 * projection_dim)).
    """
    o1 = text_encoder(ids, output_hidden_states=True)
    o2 = text_encoder_2(ids if ids_2 is None else ids_2, output_hidden_states=True)
    ctx = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    return ctx, torch.cat([o1[0], o2[0]], dim=-1)


def sample_null_counts(n: int, g: torch.Generator, k_max: int = 512) -> torch.Tensor:
    """log k for n samples, k log-uniform in [1, k_max] (the pipeline's zero "T5" token count)."""
    return torch.rand(n, generator=g) * math.log(k_max)


def train_sd3(parts: dict, latents: tuple[torch.Tensor, torch.Tensor], data: WorldImages,
              scale: float, shift: float, steps: int, batch_size: int = 32, lr: float = 5e-4,
              caption_dropout: float = 0.1, seed: int = 0, amp: bool = False, freeze_text: bool = False,
              pooled_drop: float = 0.0, caption_omit: float = 0.0, snapshot_steps: tuple[int, ...] = (),
              on_snapshot=None) -> dict:
    """Rectified-flow training of the transformer (and the text encoders unless frozen), in place.

    Per step: x0 = (posterior sample - shift) * scale, s ~ logit-normal(0, 1) (SD3's default
    weighting of noise levels), x_s = (1 - s) x0 + s eps, target eps - x0, timestep 1000 s
    (`FlowMatchEulerDiscreteScheduler` with shift 1 uses exactly these sigmas / timesteps).
    EMA weights are written back at the end.

    Args:
        parts: output of `build_sd3_components`.
        latents: (mean, std) posteriors of `data`'s images (`encode_posteriors`).
        data: the training scenes (captions are redrawn every step).
        scale, shift: the VAE's scaling / shift factors.
        steps: optimiser steps.
        batch_size: samples per step.
        lr: peak AdamW learning rate.
        caption_dropout: probability of training on the empty prompt instead.
        seed: seed of batches, captions, noise and noise levels.
        amp: bf16 autocast (off by default: for models this small the casts cost more than
            the faster bf16 matmuls save on a CPU; measured 1.6x slower).
        freeze_text: keep the text encoders fixed (pretrained apart, as real models' are).
        pooled_drop: share of samples whose pooled vector is the empty prompt's while the
            sequence keeps the caption: the denoiser must then read the detail from the
            sequence (where soft tokens act), not from the adaLN path.
        caption_omit: share of captions with an attribute or the relation left out
            (`pretrain_common.omit`).
        snapshot_steps, on_snapshot: after each of these steps `on_snapshot(step)` is called
            with the EMA weights swapped into the modules (then swapped back): one run gives
            the model at several training lengths of the same schedule.
    Returns:
        {"steps", "seconds", "loss"} (loss: mean of the last 100 steps).
    """
    tr, te1, te2 = parts["transformer"], parts["text_encoder"], parts["text_encoder_2"]
    modules = [tr] if freeze_text else [tr, te1, te2]
    for m in modules:
        m.train().requires_grad_(True)
    proc = CollapsedNullAttnProcessor()
    tr.set_attn_processor(proc)
    tokens = TokenCache(parts["tokenizer"])
    params, opt, sched, ema = diffusion_optimizer(modules, lr, steps)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 3])
    mean, std = latents
    empty = None
    if pooled_drop and freeze_text:  # a frozen encoder's empty-prompt pooled vector is a constant
        with torch.no_grad(), autocast(amp):
            _, empty = sd3_text_context(te1, te2, tokens([""]))
    losses, t0 = [], time.perf_counter()
    for step in tqdm(range(steps), desc="sd3", mininterval=5):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g) - shift) * scale
        eps = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(batch_size, generator=g)).view(-1, 1, 1, 1)
        x_s = (1 - s) * x0 + s * eps
        ids = tokens(data.captions(idx, rng, caption_dropout, omit_share=caption_omit))
        proc.log_k = sample_null_counts(batch_size, g)
        with autocast(amp):
            with torch.set_grad_enabled(not freeze_text):
                ctx, pooled = sd3_text_context(te1, te2, ids)
            if pooled_drop:
                keep = torch.rand(batch_size, generator=g) >= pooled_drop
                if not freeze_text:  # trained encoders: the empty prompt's pooled vector moves each step
                    _, empty = sd3_text_context(te1, te2, tokens([""]))
                pooled = torch.where(keep[:, None], pooled, empty.expand_as(pooled))
            ctx = torch.cat([ctx, ctx.new_zeros(batch_size, 1, ctx.shape[-1])], dim=1)  # the null token
            pred = tr(hidden_states=x_s, encoder_hidden_states=ctx, pooled_projections=pooled,
                      timestep=s.flatten() * 1000).sample
        loss = F.mse_loss(pred.float(), eps - x0)
        losses.append(optimizer_step(loss, opt, params, sched, ema))
        if step + 1 in snapshot_steps and on_snapshot is not None:
            ema.swap()
            try:
                on_snapshot(step + 1)
            finally:
                ema.swap()
    ema.copy_to()
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    tr.set_attn_processor(JointAttnProcessor2_0())  # back to the stock processor
    for m in (tr, te1, te2):
        m.eval().requires_grad_(False)
    return {"steps": steps, "seconds": time.perf_counter() - t0, "loss": float(np.mean(losses[-100:]))}


def null_t5_encoder(width: int):
    """A T5 encoder that outputs exact zeros, and its tokenizer (see the module docstring).

    Zero layers, zero token embeddings and a zero final RMS-norm weight: whatever the prompt,
    the output is (B, max_sequence_length, width) zeros, exactly what
    `StableDiffusion3Pipeline` substitutes when `text_encoder_3` is None.

    Args:
        width: T5 d_model = the transformer's `joint_attention_dim`.
    Returns:
        (T5EncoderModel, T5TokenizerFast).
    """
    from transformers import T5Config, T5EncoderModel

    from ..tiny import make_t5_tokenizer

    tok = make_t5_tokenizer(512)
    te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=width, d_kv=8, d_ff=8, num_layers=0, num_heads=1))
    torch.nn.init.zeros_(te.shared.weight)
    torch.nn.init.zeros_(te.encoder.final_layer_norm.weight)
    return te.eval().requires_grad_(False), tok


def assemble_sd3(parts: dict, vae, flow_shift: float = 1.0, null_t5: bool = True):
    """The stock `StableDiffusion3Pipeline` from trained parts (no image encoder).

    Args:
        parts: output of `build_sd3_components` (trained).
        vae: the shared VAE.
        flow_shift: `FlowMatchEulerDiscreteScheduler` shift. SD3's 3.0 compensates for the
            high redundancy of 128x128 latents; an 8x8 latent needs none (1.0), which also
            matches the plain logit-normal levels used in training.
        null_t5: carry the zero-output T5 (`null_t5_encoder`) so that a plain
            `from_pretrained(path)` loads the saved folder; False = `text_encoder_3=None`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    te3, tok3 = null_t5_encoder(parts["transformer"].config.joint_attention_dim) if null_t5 else (None, None)
    return StableDiffusion3Pipeline(
        transformer=parts["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=flow_shift),
        vae=vae, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"],
        text_encoder_3=te3, tokenizer_3=tok3,
    )


__all__ = ["CollapsedNullAttnProcessor", "assemble_sd3", "build_sd3_components", "null_t5_encoder",
           "sample_null_counts", "sd3_text_context", "train_sd3"]
