"""Z-Image (`ZImageTransformer2DModel`, `ZImagePipeline`): Algorithm 1 on the single-stream template.

How the model reads text (diffusers 0.42.1, `transformer_z_image.py`): the latents and the caption
run apart first (`noise_refiner` blocks on the image patches, `context_refiner` blocks on the caption
features after `cap_embedder`), each padded to a multiple of 32 rows with a *learned, unmasked* pad
token (`x_pad_token`, `cap_pad_token`); then every sample becomes one sequence `[image, caption]`
(image first), samples padded to the batch's longest with a boolean key mask (None when all are equally
long), and the main `layers` run over it. Each main block is called positionally
`(x, attn_mask, freqs_cis, adaln_input, ...)` and returns the whole sequence.

Placement (single-stream template, one token set per selected block of `layers`): at a selected block
the m tokens are inserted where the caption starts — after the (padded) image rows, before the first
caption row — and removed from the block's output, so the next block sees the model's own sequence.
What follows the tokens:
* the key mask grows by m ones (the tokens are attended by every query, as Algorithm 1 asks);
* the rotary rows (`freqs_cis`, (B, L, d/2) complex) grow by m copies of the first caption row. The
  caption's positions are (1 + k, 0, 0) (its pad rows continue that sequence), the image's
  (cap_len + 1, h, w), the image's pad rows (0, 0, 0): copying the first caption position gives the
  tokens a genuine text position, never an image or a pad position, independent of the prompt's
  length — the choice FLUX.1 and Qwen-Image make too.
The image length (where the caption starts) is known only to the denoiser call (the per-sample list
`x`, the patch size): `call_state` computes it once per call, and it must be the same for every sample
(pipelines sample one size; a batch of several sizes is refused, as is the Omni mode's nested lists,
whose order is `[caption, image, siglip]`).

Timesteps: the pipeline calls the model with `t = (1000 - timestep) / 1000 = 1 - sigma` (argument `t`)
and negates its output (the model predicts x0 - eps). The token pre-hook maps t back onto 0..1000
(`1000 (1 - t)`), and the backbone negates the output, so its prediction is the velocity eps - x0 of
`FlowBackbone`. Guidance: the pipeline's `guidance_scale` g forms `pos + g (pos - neg)` (g = 0: one
conditional branch, Z-Image-Turbo's setting); both branches are one batched model call, and the tokens
are on every sample of it. Text-space tokens go through `cap_embedder` (RMS norm, linear), the
caption's own way into the block width; the caption's `context_refiner` blocks are not applied to them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from diffusers import ZImageTransformer2DModel
from torch import nn

from ..backbone import TextCond
from ..errors import SoftTokensError
from ..family import EditPresets, Family, SamplingDefaults, register_family
from ..flow import FlowBackbone, flow_edit_model
from ..flowedit import flow_sigmas
from ..hooks import call_argument
from ..templates import SINGLE_STREAM, Placement, per_layer

#: mask key of `TextCond.extra`: 1 for prompt tokens, 0 for the padding added here
MASK = "mask"
#: Z-Image pads each part of the joint sequence to a multiple of this many rows (`SEQ_MULTI_OF`)
SEQ_MULTIPLE = 32


class ZImageBackbone(FlowBackbone):
    """Z-Image: rectified flow on 2 x 2 latent patches, velocity target eps - x0.

    Prompts: the stock `encode_prompt` (chat template, `enable_thinking`, the text encoder's second-to-last
    hidden state) returns one (n_i, D) tensor per prompt without its padding; they are zero-padded here to
    `max_sequence_length` rows with a mask, so that every `TextCond` of a run has one shape and
    concatenates, and `denoise` hands the model each prompt's own rows again (as the pipeline does).

    Args:
        pipe: a `ZImagePipeline`.
        max_sequence_length: text positions per prompt (the pipeline's default 512).
    """

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        """N prompts -> embeds (N, max_sequence_length, D_text), extra["mask"] (N, max_sequence_length)."""
        embeds, _ = self.encode_prompt(prompts)  # N tensors (n_i, D), padding already dropped
        n_pos, width = self.max_sequence_length, embeds[0].shape[-1]
        padded = embeds[0].new_zeros(len(embeds), n_pos, width)  # (N, L, D)
        mask = torch.zeros(len(embeds), n_pos, dtype=torch.long, device=padded.device)  # (N, L)
        for i, e in enumerate(embeds):
            k = min(e.shape[0], n_pos)
            padded[i, :k] = e[:k]
            mask[i, :k] = 1
        return TextCond(padded.to(self.dtype), None, {MASK: mask})

    def denoise(self, x_t, t, cond):
        """Velocity eps - x0 for (B, C, h, w) latents at (B,) timesteps on the 0..1000 scale."""
        device = x_t.device
        lengths = cond.extra[MASK].sum(dim=1).tolist()
        caps = [e[:int(k)] for e, k in zip(cond.embeds.to(device), lengths)]  # B x (n_i, D)
        frames = list(x_t.unsqueeze(2).unbind(0))  # B x (C, 1, h, w): the model's per-sample list
        t_model = (1000.0 - t.to(device, torch.float32)) / 1000.0  # (B,) 1 - sigma, as the pipeline calls
        out = self.denoiser(frames, t_model, caps, return_dict=False)[0]  # B x (C, 1, h, w): x0 - eps
        return -torch.stack(out, dim=0)[:, :, 0]  # (B, C, h, w)


def image_rows(denoiser: nn.Module, args: tuple, kwargs: dict, m: int) -> dict:
    """Per call: the rows the (padded) image takes before the caption in the joint sequence.

    Raises:
        SoftTokensError: the Omni mode (nested lists), or images of several sizes in one call.
    """
    x = call_argument(denoiser, args, kwargs, "x")
    if isinstance(x[0], (list, tuple)):
        raise SoftTokensError("Z-Image Omni calls ([caption, image, siglip] sequences) are not supported by the "
                              "soft tokens; expected the text-to-image call with one latent per sample")
    p = call_argument(denoiser, args, kwargs, "patch_size") or 2
    pf = call_argument(denoiser, args, kwargs, "f_patch_size") or 1
    counts = {(f // pf) * (h // p) * (w // p) for f, h, w in (tuple(xi.shape[1:]) for xi in x)}
    if len(counts) != 1:
        raise SoftTokensError(f"soft tokens need one image size per Z-Image call, got {len(counts)} sizes")
    n = counts.pop()
    return {"image_rows": n + (-n) % SEQ_MULTIPLE}  # padded to a multiple of 32, as the model pads


def caption_start(block: nn.Module, args: tuple, kwargs: dict, state: dict) -> int:
    """The joint sequence is [image, caption]: the caption starts after the padded image rows."""
    return state["image_rows"]


def first_caption_row(rotary: torch.Tensor, m: int, at: int, state: dict) -> torch.Tensor:
    """(B, L, d/2) rotary with m copies of the first caption row inserted before it."""
    first = rotary[:, at:at + 1].expand(-1, m, -1)  # (B, m, d/2)
    return torch.cat([rotary[:, :at], first, rotary[:, at:]], dim=1)  # (B, L + m, d/2)


def t_to_buckets(t: torch.Tensor) -> torch.Tensor:
    """Z-Image's `t` = 1 - sigma -> the tokens' 0..1000 scale; rounded to 1e-3 so that a timestep that
    went through the pipeline's float32 (1000 - t) / 1000 lands in its own bucket (t = 10 stays 10)."""
    return torch.round((1.0 - t.float()) * 1e6) / 1e3  # float32 (no float64 on every device): exact enough here


class ZImageFamily(Family):
    name = "zimage"
    title = "Z-Image"
    denoiser_class = "ZImageTransformer2DModel"
    # the pipeline's own example (Z-Image-Turbo): 8 steps, guidance_scale 0 (one conditional branch); an
    # undistilled Z-Image checkpoint is sampled with CFG: --cfg (the pipeline's guidance_scale g)
    sampling = SamplingDefaults(steps=8, cfg=0.0)
    # No published FlowEdit setting for Z-Image. FlowEdit's CFG is the standard form (neg + c (pos - neg)),
    # so SD3's numbers are kept (3.5 -> 13.5; SoftREPA Tables 5-6 with tokens: n_max 30, target 9) on the
    # pipeline's own 50-step grid; not measured (docs/families.md).
    edit = EditPresets(steps=50, src_cfg=3.5, vanilla=(33, 13.5), tokens=(30, 9.0),
                       source="chosen for softrepa, no official Z-Image FlowEdit setting: SD3's FlowEdit / SoftREPA "
                              "numbers on Z-Image's sigma grid")
    text_length = 512  # the pipeline's default max_sequence_length
    native_size = 1024  # the pipeline's default height / width (it declares no default_sample_size)
    block_list = "layers"
    repeated_blocks = ("ZImageTransformerBlock",)
    placement = Placement(SINGLE_STREAM, select=per_layer("layers"), sample_arg="x", timestep_arg="t",
                          timestep_map=t_to_buckets, text_arg="x", text_start=caption_start,
                          call_state=image_rows, mask_arg="attn_mask", mask_kind="keep",
                          rotary_arg="freqs_cis", rotary=first_caption_row)
    width_names = ("dim", "cap_feat_dim")
    projection_modules = ("cap_embedder",)  # the caption's own way in: RMS norm, then to the block width

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, ZImageTransformer2DModel)

    def widths(self, denoiser: nn.Module) -> tuple[int, int]:
        return int(denoiser.config.dim), int(denoiser.config.cap_feat_dim)

    def backbone(self, pipe: Any, **kwargs: Any) -> ZImageBackbone:
        return ZImageBackbone(pipe, **kwargs)

    def edit_model(self, backbone, steps: int, latent_shape: tuple[int, ...]):
        """The pipeline's sigma grid: linspace(1, 1 / steps, steps) through its scheduler (static shift;
        a dynamically shifting scheduler gets the pipeline's mu of the patch count)."""
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        seq = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)  # 2 x 2 patches
        cfg = backbone.pipe.scheduler.config
        mu = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        sigmas = flow_sigmas(backbone.pipe.scheduler, steps, seq, base_sigmas=np.linspace(1.0, 1.0 / steps, steps),
                             mu=mu)
        return flow_edit_model(backbone, sigmas)


register_family(ZImageFamily())
