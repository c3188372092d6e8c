"""SD1.5 and SDXL (`UNet2DConditionModel`): tokens right after BOS of the cross-attention context.

The selected block groups (down / mid / up) receive `[BOS, s_1..s_m, rest of the context]` as
`encoder_hidden_states`; the other groups keep the plain context, as in the authors' forward. One
token set is shared by the groups (the authors' layout). Training: DDPM noise, epsilon or
v-prediction read from the scheduler; SDXL adds its pooled embedding and size micro-conditioning.
Both families live in this module because they share the denoiser class, the placement (the
cross-attention template, after BOS) and the backbone: they are two instances of `UNetFamily`, told
apart by SDXL's `addition_embed_type == "text_time"`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from ..backbone import Backbone, TextCond
from ..errors import SoftTokensError
from ..family import EditPresets, Family, ModelInfo, SamplingDefaults, register_family
from ..flowedit import eps_denoiser, eps_sigmas, ve_add_noise
from ..templates import CROSS_ATTENTION, Placement
from ..tokens import SoftTokensConfig, TokenLayout

#: the UNet block groups a token set can be shared by (`SoftTokensConfig.blocks`)
BLOCK_GROUPS = ("down", "mid", "up")


class UNetBackbone(Backbone):
    """SD1.5 / SDXL UNets: DDPM noise, epsilon (or v) prediction read from the scheduler config; SDXL's
    pooled embedding and size micro-conditioning when the UNet takes them (`addition_embed_type == "text_time"`)."""

    def __init__(self, pipe: Any, max_sequence_length: int | None = None):
        super().__init__(pipe, max_sequence_length)
        cfg = pipe.scheduler.config
        self.prediction = cfg.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise SoftTokensError(f"scheduler prediction_type {self.prediction!r} is not supported "
                                  "(epsilon, v_prediction)")
        self.text_time = self.denoiser.config.addition_embed_type == "text_time"
        if self.text_time:  # SDXL reads both CLIPs
            self.text_parts = self.text_parts + (("text_encoder_2", "the second CLIP"), ("tokenizer_2", "its tokenizer"))
        # The training noise schedule of the model, whatever sampler the pipeline ships with.
        ddpm = DDPMScheduler.from_config(cfg)
        self.alphas_cumprod = ddpm.alphas_cumprod.float()  # (1000,)

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device).clamp(0, len(self.alphas_cumprod) - 1)]
        a = a.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def sample_timesteps(self, n, generator=None, shared=True, t_min=0, t_max=1000):
        return super().sample_timesteps(n, generator, shared, t_min, min(t_max, len(self.alphas_cumprod)))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | tuple[int, int] | None = None) -> TextCond:
        """Prompts -> TextCond; SDXL adds its pooled embedding and micro-conditioning `extra["time_ids"]` (N, 6).

        Args:
            prompts: N prompts.
            resolution: SDXL: the image size the model works at, a side (square) or (H, W); default the
                native square. Used as both original and target size (as the SDXL pipeline does).
        """
        out = self.encode_prompt(prompts)
        if not self.text_time:
            return TextCond(out[0].to(self.dtype))
        if resolution is None:
            resolution = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        pair = isinstance(resolution, (tuple, list))
        h, w = (int(resolution[0]), int(resolution[1])) if pair else (int(resolution), int(resolution))
        # (original H, W, crop top, left, target H, W), the order of the pipeline's _get_add_time_ids:
        # a non-square image must not be conditioned as a square one
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
        return TextCond(out[0].to(self.dtype), out[2].to(self.dtype), {"time_ids": time_ids.repeat(len(prompts), 1)})

    def add_noise(self, x0, noise, t):
        sa, s1a = self._alpha(t, x0)
        return (sa * x0.float() + s1a * noise.float()).to(x0.dtype)

    def target(self, x0, noise, t):
        if self.prediction == "epsilon":
            return noise.float()
        sa, s1a = self._alpha(t, x0)
        return sa * noise.float() - s1a * x0.float()

    def denoise(self, x_t, t, cond):
        kw = {}
        if cond.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
        return self.denoiser(x_t, t.to(x_t.device), encoder_hidden_states=cond.embeds, return_dict=False, **kw)[0]


def selected_blocks(model: nn.Module, groups: tuple[str, ...]) -> list[nn.Module]:
    """The cross-attention blocks of the chosen groups (blocks without cross-attention are skipped)."""
    blocks: list[nn.Module] = []
    if "down" in groups:
        blocks += list(model.down_blocks)
    if "mid" in groups and model.mid_block is not None:
        blocks.append(model.mid_block)
    if "up" in groups:
        blocks += list(model.up_blocks)
    return [b for b in blocks if getattr(b, "has_cross_attention", False)]


def shared_set(model: nn.Module, layout: TokenLayout) -> list[tuple[int, nn.Module]]:
    """Every cross-attention block of the layout's groups gets token set 0 (the authors' layout)."""
    blocks = selected_blocks(model, layout.blocks)
    if not blocks:
        raise SoftTokensError(f"blocks: the groups {list(layout.blocks)} of this UNet have no cross-attention blocks")
    return [(0, b) for b in blocks]


def _check_groups(blocks: Sequence[str]) -> None:
    bad = [b for b in blocks if b not in BLOCK_GROUPS]
    if bad or not blocks:
        raise SoftTokensError(f"blocks must be a non-empty subset of {BLOCK_GROUPS}, got {list(blocks)}")


class UNetFamily(Family):
    """SD1.5-type (`text_time=False`) or SDXL-type (`text_time=True`) UNets: one class, two registered instances."""

    denoiser_class = "UNet2DConditionModel"
    cfg_branches = "batch"  # the stock pipelines run CFG as one call on [uncond; cond] rows
    sampling = SamplingDefaults(steps=30, cfg=7.0)  # paper Table 4
    edit = EditPresets(steps=50, src_cfg=3.5, vanilla=(33, 13.5), tokens=(30, 9.0),
                       source="FlowEdit's defaults (vanilla); SoftREPA Tables 5-6 (tokens)")
    # [BOS, s_1..s_m, rest of the context] into the selected groups' blocks; an additive mask gets 0s
    placement = Placement(CROSS_ATTENTION, select=shared_set, sample_arg="sample", position=1,
                          mask_arg="encoder_attention_mask", mask_kind="bias")
    block_list = "down_blocks"
    projection_modules = ()  # tokens live in the cross-attention width

    def __init__(self, name: str, title: str, text_time: bool):
        self.name, self.title, self.text_time = name, title, text_time

    def matches(self, denoiser: nn.Module) -> bool:
        return (isinstance(denoiser, UNet2DConditionModel)
                and (denoiser.config.addition_embed_type == "text_time") == self.text_time)

    def describe(self, denoiser: nn.Module) -> ModelInfo:
        width = denoiser.config.cross_attention_dim
        if isinstance(width, (list, tuple)):
            if len(set(width)) != 1:
                raise SoftTokensError(f"UNets with per-block cross_attention_dim {list(width)} are not supported")
            width = width[0]
        return ModelInfo(self.name, int(width), int(width), 0)

    def layout_for(self, denoiser: nn.Module, config: SoftTokensConfig) -> TokenLayout:
        _check_groups(config.blocks)
        width = self.describe(denoiser).model_dim
        return TokenLayout(self.name, width, width, config.num_tokens, config.time_buckets, "block", (),
                           config.blocks, 0)

    def check_layout(self, layout: TokenLayout) -> None:
        if layout.token_space != "block" or layout.token_dim != layout.model_dim:
            raise SoftTokensError("UNet tokens live in the cross-attention width: token_space must be "
                                  "'block' and token_dim == model_dim")
        _check_groups(layout.blocks)

    def check_fits(self, layout: TokenLayout, denoiser: nn.Module) -> None:
        info = self.describe(denoiser)
        if layout.family != info.family:
            raise SoftTokensError(f"family: tokens are for '{layout.family}', the model is '{info.family}'")
        if layout.model_dim != info.model_dim:
            raise SoftTokensError(f"model_dim: tokens have width {layout.model_dim}, the model's "
                                  f"cross_attention_dim is {info.model_dim}")

    def backbone(self, pipe: Any, **kwargs: Any) -> UNetBackbone:
        return UNetBackbone(pipe, **kwargs)

    def edit_model(self, backbone, steps: int, latent_shape: tuple[int, ...]):
        return eps_denoiser(backbone), eps_sigmas(backbone.pipe.scheduler.config, steps), ve_add_noise

    def run_settings(self) -> dict[str, Any]:
        # SDXL's added time ids: "hw" = the real (H, W) of the input since softrepa 0.1.0's edit fix;
        # folders edited before it carry no such key and are not resumed into (outputs would mix).
        return {"size_conditioning": "hw"} if self.text_time else {}


register_family(UNetFamily("sd15", "SD1.5", text_time=False))
register_family(UNetFamily("sdxl", "SDXL", text_time=True))
