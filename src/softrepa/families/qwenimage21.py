"""Qwen-Image 2.1 (`QwenImage21Transformer2DModel`, `QwenImage21Pipeline`): Algorithm 1 on the
single-stream template, with the model's block-causal structure and its prefix KV cache followed.

How the model reads text (diffusers 0.42.1, `transformer_qwenimage21.py`): the projected prompt
(`txt_in`) and the target image's latent tokens form one joint sequence `[text, target image]`
(condition images sit inside the text, at the vision slots). Every block sees the whole sequence and
returns it. Attention is block-causal: text rows are causal, each image block is bidirectional; the
SDPA processor gets this as `segments` (runs of `(start, end, is_text)` over the prefix), the key mask
as `key_valid` (B, L). Modulation is per row: `target_token_mask` (L,) picks the sampled timestep's
row for target tokens and the t = 0 row for the prefix (`causal_condition`). The rotary table
`rotary_emb` (L, d/2) has no batch axis.

Placement (single-stream template, one token set per selected block of `transformer_blocks`): the m
tokens are inserted at row 0 — before the prompt, so that (text being causal) every prompt row and
every image row can attend to them, as a prefix does — and removed from the block's output. What
follows the m rows:
* `key_valid` (B, L): 1 for the tokens (attended by every later query);
* `rotary_emb`: m copies of the first text row (position 0 on all three axes) — a text position,
  independent of the prompt's length; the choice FLUX.1, Qwen-Image and Z-Image make too;
* `target_token_mask`: False — the tokens are modulated like the text they stand before (t = 0 row);
* `segments`: every run shifted by m, the first text run starting at row 0 (the tokens are text:
  causal among themselves, seen by the prompt).
The flex processors' precomputed `BlockMask` cannot grow by m rows: a block called with one is refused
(the default SDPA processor is what the model installs).

The KV cache: the pipeline (`use_kv_cache=True`, its default) runs the full sequence at step 0 and
stores each block's prefix keys / values, then feeds only the target rows. Tokens inserted at step 0
would stay in the cache with step 0's time bucket for every later step. While tokens are on, the hooks
therefore turn the cache off for the call (`kv_cache=None`): every step runs the whole prefix with the
step's own tokens — exact, at the prefix's cost per step (the prompt is short next to the image). With
the handle disabled or removed the pipeline's cache works as before.

Timesteps: the model is called with t / 1000 (scale 1000). Guidance: `true_cfg_scale` with a negative
prompt; the pipeline samples without guidance by default (1.0). Text-space tokens go through `txt_in`
(zero-centred RMS norm, MLP), the prompt's own way in.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from diffusers import QwenImage21Transformer2DModel
from torch import nn

from ..backbone import TextCond
from ..errors import SoftrepaError, SoftTokensError
from ..family import EditPresets, Family, SamplingDefaults, register_family
from ..flow import FlowBackbone, flow_edit_model, latent_stats
from ..flowedit import flow_sigmas
from ..templates import SINGLE_STREAM, Placement, insert_rows, per_layer

#: mask key of `TextCond.extra`: 1 for prompt rows, 0 for padding
MASK = "mask"
PAD_TO = "pad_to"  # (N,): the padded text length of the call that encoded each row


class QwenImage21Backbone(FlowBackbone):
    """Qwen-Image 2.1: rectified flow on unpatched latents of a 16x VAE, velocity target eps - x0.

    Prompts: the stock `encode_prompt` (raw chat template, Qwen3-VL's last decoder layer before its norm,
    the system part dropped), padded with zeros to `text_positions` rows and a mask, so that every
    `TextCond` of a run has one shape. `denoise` hands the model the rows up to the longest prompt of the
    call that encoded them (`extra["pad_to"]`), as the pipeline pads a batch: the model attends to no
    padding, but the image's rotary frame follows the padded text length, so a sample's prediction
    depends on that length. Padding every chunk of a step's pairs as the whole step keeps chunked
    training exact (found by the AGSM conformance test: padding to each chunk's own longest prompt
    changed the loss by 4e-5 and the gradients by up to 70%).

    Latents: the VAE encodes (B, C, 1, H, W) clips (an RGBA VAE gets an opaque alpha channel, as the
    pipeline's image processor gives it); x0 is (B, C, H/16, W/16), normalised per channel with the VAE's
    `latents_mean` / `latents_std`. Sides must be multiples of 32 (each vision slot covers 2 x 2 latents).

    Args:
        pipe: a `QwenImage21Pipeline`.
        max_sequence_length: unused (the pipeline takes no text length; prompts are not truncated).
    """

    #: rows a prompt is padded to in a `TextCond` (the model sees only the batch's longest prompt)
    text_positions = 512
    text_parts = (("text_encoder", "Qwen3-VL"), ("processor", "its processor"))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        """N prompts -> embeds (N, 512, D_text), extra["mask"] (N, 512).

        Raises:
            SoftrepaError: a prompt longer than `text_positions` rows after the template.
        """
        embeds, mask, _ = self.encode_prompt(prompts)  # (N, n, D), (N, n) or None, image slots (none: text only)
        n, length, width = embeds.shape
        if length > self.text_positions:
            raise SoftrepaError(f"Qwen-Image 2.1: a prompt is {length} text rows, at most {self.text_positions} "
                                "are supported for training; shorten it")
        if mask is None:
            mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
        padded = embeds.new_zeros(n, self.text_positions, width)  # (N, L, D)
        padded[:, :length] = embeds
        full = torch.zeros(n, self.text_positions, dtype=torch.long, device=embeds.device)  # (N, L)
        full[:, :length] = mask.long()
        # every row remembers the padded length of the call that encoded it: a training step's
        # prompts are encoded together, so any chunk of its pairs is padded as the whole step is
        # (the image's rotary frame follows the padded text length: chunked == plain stays exact)
        pad_to = torch.full((n,), length, dtype=torch.long, device=embeds.device)  # (N,)
        return TextCond(padded.to(self.dtype), None, {MASK: full, PAD_TO: pad_to})

    # ---------------------------------------------------------------- latents: one-frame clips, normalised
    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C_in, 1, H, W): one-frame clips; an RGBA VAE gets alpha 1 (opaque)."""
        if int(self.vae.config.in_channels) == 4:
            pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)  # (B, 4, H, W)
        return pixels.unsqueeze(2)

    def latents_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = latent_stats(self.vae, z[:, :, 0])
        return (z[:, :, 0] - mean) / std  # (B, C, h, w)

    def vae_from_latents(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = latent_stats(self.vae, x)
        return (x * std + mean).unsqueeze(2)  # (B, C, 1, h, w)

    def vae_output(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded[:, :3, 0]  # (B, 3, H, W): RGB (an RGBA VAE's alpha dropped)

    # ---------------------------------------------------------------- the model call
    def denoise(self, x_t, t, cond):
        b, c, h, w = x_t.shape
        if (h * w) % 4:
            raise SoftrepaError(f"Qwen-Image 2.1 latents need an even number of 2 x 2 groups, got {h} x {w}: "
                                "use image sides that are multiples of 32")
        pipe, device = self.pipe, x_t.device
        mask = cond.extra[MASK].to(device)
        # the encoding call's padded length (the pipeline pads a batch to its longest prompt);
        # conditions made elsewhere: the rows' own longest prompt
        n = int(cond.extra[PAD_TO].max()) if PAD_TO in cond.extra else int(mask.sum(dim=1).max())
        mask = mask[:, :n]
        packed = pipe._pack_latents(x_t, b, c, h, w)  # (B, h * w, C): 2.1 takes latents unpatched
        slots = torch.cat([torch.zeros(b, n, dtype=torch.bool, device=device),
                           torch.ones(b, h * w // 4, dtype=torch.bool, device=device)], dim=1)  # (B, n + hw/4)
        out = self.denoiser(hidden_states=packed, timestep=t.to(device) / 1000.0,
                            encoder_hidden_states=cond.embeds[:, :n].to(device),
                            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                            img_shapes=[[(1, h, w)]] * b, img_mask=slots, return_dict=False)[0]  # (B, L | hw, C)
        f = int(pipe.vae_scale_factor)
        return pipe._unpack_latents(out[:, -h * w:], h * f, w * f, f)[:, :, 0]  # (B, C, h, w)


# ------------------------------------------------------------------------------ the placement's rules
def first_text_row(rotary: torch.Tensor, m: int, at: int, state: dict) -> torch.Tensor:
    """(L, d/2) rotary with m copies of the first text row inserted at `at` (row 0)."""
    return insert_rows(rotary, rotary[at:at + 1].expand(m, -1), at, dim=0)  # (L + m, d/2)


def prefix_rows(target_mask: torch.Tensor, m: int, at: int, state: dict) -> torch.Tensor:
    """(L,) target-token mask with m False rows: the tokens are modulated from t = 0, as the text."""
    return insert_rows(target_mask, target_mask.new_zeros(m), at, dim=0)  # (L + m,)


def text_segments(segments: list, m: int, at: int, state: dict) -> list:
    """The prefix runs `(start, end, is_text)` with m text rows at row 0: every run shifted by m and the
    first text run starting at 0 (one causal text run, as the model would build it)."""
    shifted = [(s + m, e + m, is_text) for s, e, is_text in segments]
    if shifted and shifted[0][2] and shifted[0][0] == m:
        return [(0, shifted[0][1], True)] + shifted[1:]
    return [(0, m, True)] + shifted


def no_block_mask(mask: Any, m: int, at: int, state: dict) -> Any:
    """A dense (B, 1, 1, L) key mask grows by m ones; a flex `BlockMask` cannot grow and is refused."""
    if isinstance(mask, torch.Tensor):
        return insert_rows(mask, mask.new_ones(mask.shape[:-1] + (m,)), at, dim=mask.ndim - 1)
    raise SoftTokensError("Qwen-Image 2.1 with soft tokens needs the SDPA attention processor "
                          "(QwenImage21AttnProcessor, the model's default); expected no flex BlockMask")


def without_kv_cache(denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call without the prefix KV cache (see the module docstring): the pipeline passes it by keyword."""
    if kwargs.get("kv_cache") is None and kwargs.get("kv_cache_mode") is None:
        return args, kwargs
    return args, {**kwargs, "kv_cache": None, "kv_cache_mode": None}


def text_start(block: nn.Module, args: tuple, kwargs: dict) -> int:
    """The joint sequence is [text, target image]: the tokens go first (row 0)."""
    return 0


class QwenImage21Family(Family):
    name = "qwenimage21"
    title = "Qwen-Image 2.1"
    denoiser_class = "QwenImage21Transformer2DModel"
    # the pipeline's defaults: 40 steps, no guidance (true_cfg_scale 1: "meant to be sampled without guidance")
    sampling = SamplingDefaults(steps=40, cfg=1.0)
    # No published FlowEdit setting for Qwen-Image 2.1: SD3's FlowEdit / SoftREPA numbers in the standard CFG
    # form FlowEdit uses, on the pipeline's 50-step grid. Not measured (docs/families.md).
    edit = EditPresets(steps=50, src_cfg=3.5, vanilla=(33, 13.5), tokens=(30, 9.0),
                       source="chosen for softrepa, no official Qwen-Image 2.1 FlowEdit setting: SD3's FlowEdit / "
                              "SoftREPA numbers on Qwen-Image 2.1's sigma grid")
    text_length = None  # the pipeline takes no text length (prompts are not truncated)
    native_size = 1024  # the pipeline's output_resolution (it declares no default_sample_size)
    repeated_blocks = ("QwenImage21TransformerBlock",)
    placement = Placement(
        SINGLE_STREAM, select=per_layer("transformer_blocks"), timestep_scale=1000.0, text_arg="hidden_states",
        text_start=text_start, mask_arg="key_valid", mask_kind="keep", rotary_arg="rotary_emb",
        rotary=first_text_row,
        grow=(("target_token_mask", prefix_rows), ("segments", text_segments), ("attention_mask", no_block_mask)),
        rewrite_call=without_kv_cache)
    width_names = ("num_attention_heads x attention_head_dim", "context_in_dim")
    projection_modules = ("txt_in",)  # the prompt's own way in: zero-centred RMS norm, then an MLP

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, QwenImage21Transformer2DModel)

    def widths(self, denoiser: nn.Module) -> tuple[int, int]:
        cfg = denoiser.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim), int(cfg.context_in_dim)

    def guidance_kwargs(self, cfg: float) -> dict[str, Any]:
        """True CFG: `true_cfg_scale` runs the second branch only with a negative prompt (" ", one per
        prompt: the 2.1 pipeline does not broadcast one negative over a batch, so generate one prompt per
        call with CFG); cfg <= 1 (the default): the conditional branch only."""
        if cfg > 1:
            return {"true_cfg_scale": cfg, "negative_prompt": " "}
        return {"true_cfg_scale": cfg}

    def backbone(self, pipe: Any, **kwargs: Any) -> QwenImage21Backbone:
        return QwenImage21Backbone(pipe, **kwargs)

    def edit_model(self, backbone, steps: int, latent_shape: tuple[int, ...]):
        """The pipeline's grid: its configured `sample_sigmas` when they have `steps` entries, else
        linspace(1, 1 / steps, steps); shifted by mu of the latent token count, as the pipeline does."""
        from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

        pipe = backbone.pipe
        seq = latent_shape[-2] * latent_shape[-1]  # unpatched latent tokens
        cfg = pipe.scheduler.config
        mu = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        own = pipe.config.get("sample_sigmas") if hasattr(pipe, "config") else None
        base = own if own is not None and len(own) == steps else np.linspace(1.0, 1.0 / steps, steps)
        return flow_edit_model(backbone, flow_sigmas(pipe.scheduler, steps, seq, base_sigmas=base, mu=mu))


register_family(QwenImage21Family())
