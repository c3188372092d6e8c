"""Qwen-Image (`QwenImageTransformer2DModel`, MM-DiT with 60 dual-stream blocks): Algorithm 1 on the
dual-stream blocks, with the text mask and the rotary rows following the extra text positions.

At each selected block k the block's m tokens are prepended to the text stream and dropped from the
block's text output, as for SD3 (the layout, checks and token spaces are SD3's, so
`QwenImageFamily` derives from `SD3Family`). Qwen-Image adds two position-dependent inputs that a
block reads besides the text itself, and both must grow by m entries:

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

from ..backbone import Backbone, TextCond
from ..errors import SoftTokensError
from ..family import EditPresets, ModelInfo, SamplingDefaults, register_family
from ..flowedit import flow_add_noise, flow_denoiser
from ..hooks import AttachHandle, call_argument, model_pre_hook, replace_argument
from .sd3 import SD3Family, drop_hook

#: mask key of `TextCond.extra`: 1 for prompt tokens, 0 for padding
MASK = "mask"


class QwenImageBackbone(Backbone):
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

    family = "qwenimage"
    prediction = "flow"

    def __init__(self, pipe: Any, max_sequence_length: int | None = None):
        super().__init__(pipe, max_sequence_length)

    # ---------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        """N prompts -> embeds (N, max_sequence_length, D_text) and extra["mask"] (N, max_sequence_length).

        Args:
            prompts: N prompts (the stock `encode_prompt` wraps each in the chat template).
            resolution: unused (Qwen-Image has no size conditioning).
        Raises:
            SoftTokensError: the pipeline has no text encoder or tokenizer.
        """
        if getattr(self.pipe, "text_encoder", None) is None or getattr(self.pipe, "tokenizer", None) is None:
            raise SoftTokensError("the Qwen-Image pipeline has no text_encoder / tokenizer: prompts cannot be "
                                  "encoded (load the pipeline with its Qwen2.5-VL text encoder)")
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

    # ---------------------------------------------------------------- latents
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)  # (1, C, 1, 1)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor,
                      generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f), a posterior sample.

        Args:
            pixels: images in [-1, 1].
            generator: one generator for the batch, or one per image (an image's latent then does not
                depend on its batch or rank).
        """
        vae = self.vae
        x = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)  # (B, 3, 1, H, W): one-frame clips
        post = vae.encode(x).latent_dist
        if isinstance(generator, (list, tuple)):
            eps = torch.stack([torch.randn(post.mean.shape[1:], generator=g) for g in generator])
            z = post.mean + post.std * eps.to(post.mean.device, post.mean.dtype)
        else:
            z = post.sample(generator)  # (B, C, 1, h, w)
        z = z[:, :, 0]  # (B, C, h, w)
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).to(self.dtype)

    @torch.no_grad()
    def encode_source(self, pixels: torch.Tensor) -> torch.Tensor:
        """FlowEdit's source: (B, 3, H, W) in [-1, 1] -> float32 latents (B, C, H/f, W/f) from the posterior
        *mode* (deterministic), normalised as `encode_images`.

        `softrepa.edit.encode_source` feeds 4-D pixels to the VAE, which Qwen-Image's 3-D VAE refuses;
        this is the family's version of it (see docs/design-notes.md, Qwen-Image).

        Args:
            pixels: (B, 3, H, W) images in [-1, 1], sides multiples of twice the VAE factor (16 for Qwen-Image).
        """
        vae = self.vae
        z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)).latent_dist.mode()[:, :, 0]
        mean, std = self._latent_stats(z)  # (1, C, 1, 1) each
        return ((z - mean) / std).float()  # (B, C, h, w)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode_images`: (B, C, h, w) latents -> (B, 3, H, W) in [-1, 1]."""
        vae = self.vae
        z = latents.to(vae.dtype)
        mean, std = self._latent_stats(z)
        z = (z * std + mean).unsqueeze(2)  # (B, C, 1, h, w)
        return vae.decode(z, return_dict=False)[0][:, :, 0].clamp(-1, 1)  # (B, 3, H, W)

    # ---------------------------------------------------------------- flow
    def add_noise(self, x0, noise, t):
        sigma = (t.to(x0.device, torch.float32) / 1000.0).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0, noise, t):
        return noise.float() - x0.float()

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


def prepend_text_position_hook(handle: AttachHandle, set_index: int):
    """Dual-stream block pre-hook: [s_1..s_m, text], m mask entries 1 and m rotary rows of the first
    text position (see the module docstring for why these)."""

    def hook(block: nn.Module, args: tuple, kwargs: dict) -> Any:
        toks = handle.current
        if toks is None:
            return None
        ehs = call_argument(block, args, kwargs, "encoder_hidden_states")  # (B | 1, n_txt, D)
        mask = call_argument(block, args, kwargs, "encoder_hidden_states_mask")  # (B | 1, n_txt) bool, or None
        b = toks.shape[0]
        if ehs.shape[0] == 1 and b > 1:
            # one prompt for a batch of latents (the stock pipeline with a single string negative
            # prompt and several prompts): the model broadcasts the text over the batch, so do we
            ehs = ehs.expand(b, -1, -1)  # (B, n_txt, D)
            mask = None if mask is None else mask.expand(b, -1)
        if ehs.shape[0] != b:
            raise RuntimeError(f"soft tokens were computed for a batch of {b} but block received {ehs.shape[0]}")
        m = toks.shape[2]
        args, kwargs = replace_argument(block, args, kwargs, "encoder_hidden_states",
                                        torch.cat([toks[:, set_index].to(ehs.dtype), ehs], dim=1))  # (B, m + n_txt, D)
        if mask is not None:
            # the tokens are real keys: mask 1 (a 0 would hide them from every query)
            args, kwargs = replace_argument(block, args, kwargs, "encoder_hidden_states_mask",
                                            torch.cat([mask.new_ones(b, m), mask], dim=1))  # (B, m + n_txt)
        rotary = call_argument(block, args, kwargs, "image_rotary_emb")  # (img (n_img, d/2), txt (n_txt, d/2))
        if rotary is not None:
            img, txt = rotary
            txt = torch.cat([txt[:1].expand(m, -1), txt], dim=0)  # (m + n_txt, d/2): the first text position
            args, kwargs = replace_argument(block, args, kwargs, "image_rotary_emb", (img, txt))
        return args, kwargs

    return hook


class QwenImageFamily(SD3Family):
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
    width_names = ("inner_dim (num_attention_heads x attention_head_dim)", "joint_attention_dim")

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, QwenImageTransformer2DModel)

    def describe(self, denoiser: nn.Module) -> ModelInfo:
        cfg = denoiser.config
        return ModelInfo(self.name, int(cfg.num_attention_heads * cfg.attention_head_dim),
                         int(cfg.joint_attention_dim), len(denoiser.transformer_blocks))

    def projection(self, denoiser: nn.Module) -> nn.Module:
        """The prompt's own way in: RMS-normalised (`txt_norm`), then `txt_in` to the block width.

        A new container of the model's own modules (nothing is added to the model)."""
        return nn.Sequential(denoiser.txt_norm, denoiser.txt_in)

    def install_hooks(self, denoiser: nn.Module, handle: AttachHandle) -> None:
        layout = handle.tokens.layout
        projection = self.projection(denoiser) if layout.token_space == "text" else None
        handle.add(denoiser.register_forward_pre_hook(
            model_pre_hook(handle, projection, "hidden_states", timestep_scale=1000.0), with_kwargs=True))
        for set_index, block_index in enumerate(layout.layers):
            block = denoiser.transformer_blocks[block_index]
            handle.add(block.register_forward_pre_hook(prepend_text_position_hook(handle, set_index),
                                                       with_kwargs=True))
            handle.add(block.register_forward_hook(drop_hook(handle)))

    def guidance_kwargs(self, cfg: float) -> dict[str, Any]:
        """True CFG: `true_cfg_scale` needs a negative prompt to run the second branch; " " is the model
        card's negative when there is no concept to remove. cfg <= 1: conditional branch only."""
        if cfg > 1:
            return {"true_cfg_scale": cfg, "negative_prompt": " "}
        return {"true_cfg_scale": cfg}

    def backbone(self, pipe: Any, **kwargs: Any) -> QwenImageBackbone:
        return QwenImageBackbone(pipe, **kwargs)

    def edit_model(self, backbone: Backbone, steps: int, latent_shape: tuple[int, ...]):
        seq = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)  # packed latent tokens, for the shift
        scheduler = backbone.pipe.scheduler
        ntt = scheduler.config.get("num_train_timesteps", 1000)
        return flow_denoiser(backbone, ntt), qwen_sigmas(scheduler, steps, seq), flow_add_noise


register_family(QwenImageFamily())
