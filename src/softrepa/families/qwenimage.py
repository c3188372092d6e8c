"""Qwen-Image (`QwenImageTransformer2DModel`, MM-DiT with 60 dual-stream blocks): Algorithm 1 on the
dual-stream blocks, with the text mask and the rotary rows following the extra text positions.

At each selected block k the block's m tokens are prepended to the text stream and dropped from the
block's text output, as for SD3 (the dual-stream template, one token set per selected block).
Qwen-Image adds two position-dependent inputs that a block reads besides the text itself, and both
must grow by m entries (the placement's `mask_arg` and `rotary`):

* **The text mask** `encoder_hidden_states_mask` (B, n_txt): the pipeline pads a batch's prompts to
  the longest one and marks padding 0; the attention processor turns it into a key mask over
  [text, image]. The tokens get **1**: they are keys every image and text query may attend to, which
  is what Algorithm 1 asks (a mask 0 would hide them from the image stream, so they could change
  nothing). When the model is called without a mask (the pipeline passes None when no prompt of the
  batch is padded) there is nothing to extend.
* **The rotary rows.** `QwenEmbedRope` (MSRoPE) places the image on a grid centred at 0
  (rows and columns -h/2 .. h/2 - 1, frame 0) and text token k on the diagonal (p, p, p),
  p = max(h/2, w/2) + k, i.e. just past the image's extent, and returns (image rows, text rows);
  every block applies them. A selected block gets m text rows prepended: **copies of the row of the
  first text position**, p0 = max(h/2, w/2). Why this row and not others:
  - the prompt's own rows stay untouched in every block (tokens on some blocks only must not move
    the text that all blocks see, and "with tokens" must differ from "without" by the tokens only);
  - the row is a genuine text position of the model (on the text diagonal), never an image
    position. Rows just before the text (p0 - m .. p0 - 1) reach the image grid's axes, and at small
    resolutions (p0 < m) land on the centre image token (0, 0, 0) itself;
  - it does not depend on the prompt's length, on padding or on the other prompts of the batch
    (rows after the text, p0 + n_txt ..., would move with the padded length, so a sample's result
    would depend on its batch); and its offset to the image is the prompt start's at every
    resolution — where a prefix belongs;
  - it is FLUX.1's choice too (there every text id is 0, so "the first text position" is every
    text position), so the two families read the same.
  The m tokens then share one position with each other and with the first prompt token: rotary
  cannot tell them apart, their content (what SoftREPA trains) does.

Timesteps: the pipeline calls the transformer with t / 1000 (its time projection multiplies by
1000), so the token pre-hook rescales by 1000 onto the tokens' bucket scale. Text-space tokens pass
through the model's own text input, `txt_in(txt_norm(.))`, like the prompt's hidden states.

Guidance: Qwen-Image is not guidance-distilled; the stock pipeline's `true_cfg_scale` with a
`negative_prompt` runs two transformer calls per step (conditional, negative) — both with the
tokens — and rescales the guided velocity to the conditional one's norm per latent patch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from diffusers import QwenImageTransformer2DModel
from torch import nn

from ..backbone import TextCond
from ..family import EditPresets, Family, SamplingDefaults, register_family
from ..flow import FlowBackbone, flow_edit_model, latent_stats
from ..templates import DUAL_STREAM, Placement

#: mask key of `TextCond.extra`: 1 for prompt tokens, 0 for padding
MASK = "mask"


class QwenImageBackbone(FlowBackbone):
    """Qwen-Image: rectified flow on packed 2 x 2 latent patches of a 3-D VAE, velocity target eps - x0.

    Prompts are encoded by the stock `encode_prompt` (the chat template, the Qwen2.5-VL last hidden
    state, the template's system prefix dropped) and padded with zeros to exactly
    `max_sequence_length` positions, mask 0 there. A fixed length keeps every `TextCond` of a run the
    same shape, so prompts encoded apart (hard negatives, other ranks' prompts gathered for the
    loss) concatenate, and a sample's prediction does not depend on the batch it is in: padding is
    masked out as keys and its rotary rows come after every prompt position.

    Latents: the VAE encodes (B, 3, 1, H, W) clips; the backbone's x0 is (B, C, H/f, W/f), the frame
    axis dropped, normalised per channel with the VAE's `latents_mean` / `latents_std` (as the
    pipeline decodes); sigma = t / 1000, x_t = (1 - sigma) x0 + sigma eps, target = eps - x0.

    Args:
        pipe: a `QwenImagePipeline`.
        max_sequence_length: text positions per prompt (the pipeline's default 512, at most 1024).
    """

    # ---------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        """N prompts -> embeds (N, max_sequence_length, D_text) and extra["mask"] (N, max_sequence_length).

        Args:
            prompts: N prompts (the stock `encode_prompt` wraps each in the chat template).
            resolution: unused (Qwen-Image has no size conditioning).
        Raises:
            SoftrepaError: the pipeline has no text encoder or tokenizer (`Backbone.encode_prompt`).
        """
        embeds, mask = self.encode_prompt(prompts)  # (N, n, D), (N, n) or None when nothing is padded
        n_pos = self.max_sequence_length
        n, length, width = embeds.shape
        length = min(length, n_pos)  # encode_prompt already truncates at max_sequence_length
        if mask is None:
            mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
        padded = embeds.new_zeros(n, n_pos, width)  # (N, L, D): zero padding, as the pipeline pads
        padded[:, :length] = embeds[:, :length]
        full = mask.new_zeros(n, n_pos)  # (N, L)
        full[:, :length] = mask[:, :length]
        return TextCond(padded.to(self.dtype), None, {MASK: full})

    # ---------------------------------------------------------------- latents: one-frame clips, normalised
    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, 1, H, W): one-frame clips for the 3-D VAE (sides multiples of 16)."""
        return pixels.unsqueeze(2)

    def latents_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, h, w) VAE latent -> (B, C, h, w), normalised per channel (as the pipeline decodes)."""
        z = z[:, :, 0]  # (B, C, h, w)
        mean, std = latent_stats(self.vae, z)
        return (z - mean) / std

    def vae_from_latents(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = latent_stats(self.vae, x)
        return (x * std + mean).unsqueeze(2)  # (B, C, 1, h, w)

    def vae_output(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded[:, :, 0]  # (B, 3, H, W)

    # ---------------------------------------------------------------- the model call
    def denoise(self, x_t, t, cond):
        b, c, h, w = x_t.shape
        pipe, device = self.pipe, x_t.device
        packed = pipe._pack_latents(x_t, b, c, h, w)  # (B, h/2 * w/2, 4C)
        img_shapes = [[(1, h // 2, w // 2)]] * b  # one frame of h/2 x w/2 patches per sample
        mask = cond.extra.get(MASK)
        out = self.denoiser(hidden_states=packed, timestep=t.to(device) / 1000.0,
                            encoder_hidden_states=cond.embeds,
                            encoder_hidden_states_mask=None if mask is None else mask.to(device),
                            img_shapes=img_shapes, return_dict=False)[0]  # (B, h/2 * w/2, 4C)
        f = int(pipe.vae_scale_factor)
        return pipe._unpack_latents(out, h * f, w * f, f)[:, :, 0]  # (B, C, h, w)


def qwen_sigmas(scheduler: Any, steps: int, image_seq_len: int) -> torch.Tensor:
    """(steps + 1,) sigmas exactly as `QwenImagePipeline` sets them (a scheduler copy is used).

    The pipeline passes its own grid linspace(1, 1 / steps, steps) and the resolution shift
    mu(image_seq_len) (its `calculate_shift`, with the scheduler config's base / max shift); the
    scheduler then applies the exponential time shift and `shift_terminal`.

    Args:
        scheduler: the pipeline's `FlowMatchEulerDiscreteScheduler`.
        steps: NFE.
        image_seq_len: packed latent tokens, (h / 2) * (w / 2).
    """
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    sched = type(scheduler).from_config(scheduler.config)
    cfg = sched.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    kw = {"mu": mu} if cfg.get("use_dynamic_shifting", False) else {}
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **kw)
    return sched.sigmas.float().cpu()


def first_text_rows(rotary: tuple, m: int, at: int, state: dict) -> tuple:
    """(image rows, text rows) with m copies of the first text position's row before the text's
    (see the module docstring for why these)."""
    img, txt = rotary  # (n_img, d/2), (n_txt, d/2)
    return img, torch.cat([txt[:1].expand(m, -1), txt], dim=0)  # text (m + n_txt, d/2)


class QwenImageFamily(Family):
    name = "qwenimage"
    title = "Qwen-Image"
    denoiser_class = "QwenImageTransformer2DModel"
    # the model card's setting: 50 steps, true CFG 4.0 (with a negative prompt, " " by default)
    sampling = SamplingDefaults(steps=50, cfg=4.0)
    # No published FlowEdit setting exists for Qwen-Image. It guides like SD3 (two CFG branches, default
    # scale 4 = SoftREPA's SD3 sampling scale), so SD3's CFGs are kept (FlowEdit 3.5 -> 13.5; SoftREPA
    # Tables 5-6: target 9 with tokens); n_max is re-derived so that the edit starts at SD3's noise level
    # under Qwen-Image's schedule at 1024 px (sigma 0.848 at 37 of 50 vs SD3's 0.850 at 33; 0.820 at 35
    # vs 0.814 at 30). Not measured; see docs/design-notes.md.
    edit = EditPresets(steps=50, src_cfg=3.5, vanilla=(37, 13.5), tokens=(35, 9.0),
                       source="chosen for softrepa, no official Qwen-Image FlowEdit setting: SD3's CFGs, n_max "
                              "matching SD3's starting noise level under Qwen-Image's schedule")
    cfg_branches = "calls"  # true CFG: one call per branch, inside transformer.cache_context("cond" / "uncond")
    text_length = 512  # the pipeline's default (prompts are padded with mask 0; recipes may choose less)
    # the tokens are real keys: mask 1 (a 0 would hide them from every query); the pipeline may hand one
    # negative prompt to a batch of latents, which the model broadcasts
    placement = Placement(DUAL_STREAM, timestep_scale=1000.0, mask_arg="encoder_hidden_states_mask",
                          mask_kind="keep", rotary_arg="image_rotary_emb", rotary=first_text_rows,
                          broadcast_text=True)
    projection_modules = ("txt_norm", "txt_in")  # the prompt's own way in: RMS-normalised, then to the block width

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, QwenImageTransformer2DModel)

    def guidance_kwargs(self, cfg: float) -> dict[str, Any]:
        """True CFG: `true_cfg_scale` needs a negative prompt to run the second branch; " " is the model
        card's negative when there is no concept to remove. cfg <= 1: conditional branch only."""
        if cfg > 1:
            return {"true_cfg_scale": cfg, "negative_prompt": " "}
        return {"true_cfg_scale": cfg}

    def backbone(self, pipe: Any, **kwargs: Any) -> QwenImageBackbone:
        return QwenImageBackbone(pipe, **kwargs)

    def edit_model(self, backbone, steps: int, latent_shape: tuple[int, ...]):
        seq = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)  # packed latent tokens, for the shift
        return flow_edit_model(backbone, qwen_sigmas(backbone.pipe.scheduler, steps, seq))


register_family(QwenImageFamily())
