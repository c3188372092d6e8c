"""SD1.5 and SDXL (`UNet2DConditionModel`): tokens right after BOS of the cross-attention context.

The selected block groups (down / mid / up) receive `[BOS, s_1..s_m, rest of the context]` as
`encoder_hidden_states`; the other groups keep the plain context, as in the authors' forward. One
token set is shared by the groups (the authors' layout). Training: DDPM noise, epsilon or
v-prediction read from the scheduler; SDXL adds its pooled embedding and size micro-conditioning.
Both families live in this module because they share the denoiser class and the hooks; they are
told apart by SDXL's `addition_embed_type == "text_time"`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from ..hooks import AttachHandle, model_pre_hook
from ..backbone import Backbone, TextCond
from ..errors import SoftTokensError
from ..family import EditPresets, Family, ModelInfo, SamplingDefaults, register_family
from ..flowedit import eps_denoiser, eps_sigmas, ve_add_noise
from ..tokens import UNET_BLOCK_GROUPS, SoftTokensConfig, TokenLayout


class SD15Backbone(Backbone):
    """SD1.5-type UNets: DDPM noise, epsilon (or v) prediction read from the scheduler config."""

    family = "sd15"

    def __init__(self, pipe: Any, max_sequence_length: int | None = None):
        super().__init__(pipe, max_sequence_length)
        cfg = pipe.scheduler.config
        self.prediction = cfg.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction!r} is not supported (epsilon, v_prediction)")
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
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        out = self.encode_prompt(prompts)
        return TextCond(out[0].to(self.dtype))

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


class SDXLBackbone(SD15Backbone):
    """SDXL: UNet with two text encoders, pooled embedding and size/crop micro-conditioning."""

    family = "sdxl"

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | tuple[int, int] | None = None) -> TextCond:
        """Prompts -> TextCond with SDXL's micro-conditioning in `extra["time_ids"]` (N, 6).

        Args:
            prompts: N prompts.
            resolution: the image size the model works at: a side (square) or (H, W); default the
                native square. Used as both original and target size (as the SDXL pipeline does).
        """
        out = self.encode_prompt(prompts)
        if resolution is None:
            resolution = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        pair = isinstance(resolution, (tuple, list))
        h, w = (int(resolution[0]), int(resolution[1])) if pair else (int(resolution), int(resolution))
        # (original H, W, crop top, left, target H, W), the order of the pipeline's _get_add_time_ids:
        # a non-square image must not be conditioned as a square one
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
        return TextCond(out[0].to(self.dtype), out[2].to(self.dtype), {"time_ids": time_ids.repeat(len(prompts), 1)})


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


def insert_after_bos(context: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
    """[BOS, toks, rest]: (B, n_txt, D), (B, m, D) -> (B, n_txt + m, D)."""
    return torch.cat([context[:, :1], toks.to(context.dtype), context[:, 1:]], dim=1)


def insert_hook(handle: AttachHandle):
    """Block pre-hook: the tokens after BOS of the context (and of its additive mask)."""

    def hook(block: nn.Module, args: tuple, kwargs: dict) -> Any:
        toks = handle.current
        if toks is None:
            return None
        if "encoder_hidden_states" not in kwargs:
            # diffusers' UNet passes the context by keyword to every cross-attention block.
            raise SoftTokensError(f"{type(block).__name__} was called without encoder_hidden_states by keyword")
        kwargs = dict(kwargs)
        ctx = kwargs["encoder_hidden_states"]
        if isinstance(ctx, tuple):  # IP-Adapter: (text context, image embeds); tokens go to the text part
            kwargs["encoder_hidden_states"] = (insert_after_bos(ctx[0], toks[:, 0]),) + tuple(ctx[1:])
        else:
            kwargs["encoder_hidden_states"] = insert_after_bos(ctx, toks[:, 0])
        mask = kwargs.get("encoder_attention_mask")
        if mask is not None:  # additive bias (B, 1, n_txt): the tokens are always attended to
            m = toks.shape[2]
            zeros = mask.new_zeros(mask.shape[:-1] + (m,))
            kwargs["encoder_attention_mask"] = torch.cat([mask[..., :1], zeros, mask[..., 1:]], dim=-1)
        return args, kwargs

    return hook


class SD15Family(Family):
    name = "sd15"
    title = "SD1.5"
    denoiser_class = "UNet2DConditionModel"
    sampling = SamplingDefaults(steps=30, cfg=7.0)  # paper Table 4
    edit = EditPresets(steps=50, src_cfg=3.5, vanilla=(33, 13.5), tokens=(30, 9.0),
                       source="FlowEdit's defaults (vanilla); SoftREPA Tables 5-6 (tokens)")

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, UNet2DConditionModel) and denoiser.config.addition_embed_type != "text_time"

    def describe(self, denoiser: nn.Module) -> ModelInfo:
        width = denoiser.config.cross_attention_dim
        if isinstance(width, (list, tuple)):
            if len(set(width)) != 1:
                raise SoftTokensError(f"UNets with per-block cross_attention_dim {list(width)} are not supported")
            width = width[0]
        return ModelInfo(self.name, int(width), int(width), 0)

    def layout_for(self, denoiser: nn.Module, config: SoftTokensConfig) -> TokenLayout:
        width = self.describe(denoiser).model_dim
        return TokenLayout(self.name, width, width, config.num_tokens, config.time_buckets, "block", (),
                           config.blocks, 0)

    def check_layout(self, layout: TokenLayout) -> None:
        if layout.token_space != "block" or layout.token_dim != layout.model_dim:
            raise SoftTokensError("UNet tokens live in the cross-attention width: token_space must be "
                                  "'block' and token_dim == model_dim")
        bad = [b for b in layout.blocks if b not in UNET_BLOCK_GROUPS]
        if bad or not layout.blocks:
            raise SoftTokensError(f"blocks must be a non-empty subset of {UNET_BLOCK_GROUPS}, got {list(layout.blocks)}")

    def check_fits(self, layout: TokenLayout, denoiser: nn.Module) -> None:
        info = self.describe(denoiser)
        if layout.family != info.family:
            raise SoftTokensError(f"family: tokens are for '{layout.family}', the model is '{info.family}'")
        if layout.model_dim != info.model_dim:
            raise SoftTokensError(f"model_dim: tokens have width {layout.model_dim}, the model's "
                                  f"cross_attention_dim is {info.model_dim}")

    def install_hooks(self, denoiser: nn.Module, handle: AttachHandle) -> None:
        blocks = selected_blocks(denoiser, handle.tokens.layout.blocks)
        if not blocks:
            raise SoftTokensError(f"blocks: the groups {list(handle.tokens.layout.blocks)} of this UNet have no "
                                  "cross-attention blocks")
        handle.add(denoiser.register_forward_pre_hook(model_pre_hook(handle, None, "sample"), with_kwargs=True))
        for block in blocks:
            handle.add(block.register_forward_pre_hook(insert_hook(handle), with_kwargs=True))

    def backbone(self, pipe: Any, **kwargs: Any) -> SD15Backbone:
        return SD15Backbone(pipe, **kwargs)

    def edit_model(self, backbone: Backbone, steps: int, latent_shape: tuple[int, ...]):
        return eps_denoiser(backbone), eps_sigmas(backbone.pipe.scheduler.config, steps), ve_add_noise


class SDXLFamily(SD15Family):
    name = "sdxl"
    title = "SDXL"

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, UNet2DConditionModel) and denoiser.config.addition_embed_type == "text_time"

    def backbone(self, pipe: Any, **kwargs: Any) -> SDXLBackbone:
        return SDXLBackbone(pipe, **kwargs)

    def run_settings(self) -> dict[str, Any]:
        # SDXL's added time ids: "hw" = the real (H, W) of the input since softrepa 0.1.0's edit fix;
        # folders edited before it carry no such key and are not resumed into (outputs would mix).
        return {"size_conditioning": "hw"}


register_family(SD15Family())
register_family(SDXLFamily())
