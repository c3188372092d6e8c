"""SD3 / SD3.5 (`SD3Transformer2DModel`, MM-DiT): Algorithm 1 through hooks on the stock blocks.

At each selected joint block k the block's m tokens are prepended to the text hidden states
entering the block, and the first m positions are dropped from the block's text output, so the
next block sees the plain text stream again (and, if selected, its own fresh tokens). SD3 has no
positional embedding on the text stream and no text mask, so nothing else has to follow the
m extra positions. Training and sampling: rectified flow, sigma = t / 1000,
x_t = (1 - sigma) x0 + sigma eps, target = eps - x0.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import SD3Transformer2DModel
from torch import nn

from ..hooks import AttachHandle, call_argument, model_pre_hook, replace_argument
from ..backbone import Backbone, TextCond
from ..errors import SoftTokensError
from ..family import EditPresets, Family, ModelInfo, SamplingDefaults, register_family
from ..flowedit import flow_add_noise, flow_denoiser, flow_sigmas
from ..tokens import SoftTokensConfig, TokenLayout


class SD3Backbone(Backbone):
    """SD3 / SD3.5: rectified flow, velocity target eps - x0."""

    family = "sd3"
    prediction = "flow"

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> TextCond:
        out = self.encode_prompt(prompts)  # (embeds, negative, pooled, negative pooled)
        return TextCond(out[0].to(self.dtype), out[2].to(self.dtype))

    def add_noise(self, x0, noise, t):
        sigma = (t.to(x0.device, torch.float32) / 1000.0).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0, noise, t):
        return noise.float() - x0.float()

    def denoise(self, x_t, t, cond):
        return self.denoiser(hidden_states=x_t, timestep=t.to(x_t.device), encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.pooled, return_dict=False)[0]


def prepend_hook(handle: AttachHandle, set_index: int, rotary_rows: Callable | None = None):
    """Block pre-hook: [s_1..s_m, text] as the block's `encoder_hidden_states`.

    Args:
        handle: the attachment whose tokens (computed by the denoiser pre-hook) to insert.
        set_index: which of the layout's token sets this block gets.
        rotary_rows: for families whose rotary embedding runs over (text, image) positions (FLUX.1,
            FLUX.2): `rotary_rows(rotary, m)` returns the m rows (cos, sin), each (m, d), placed
            before the text's in `image_rotary_emb`; the family decides which positions the tokens
            take. None (SD3): the text stream has no positions.
    """

    def hook(block: nn.Module, args: tuple, kwargs: dict) -> Any:
        toks = handle.current
        if toks is None:
            return None
        ehs = call_argument(block, args, kwargs, "encoder_hidden_states")  # (B, n_txt, D)
        if ehs.shape[0] != toks.shape[0]:
            raise RuntimeError(
                f"soft tokens were computed for a batch of {toks.shape[0]} but block received {ehs.shape[0]}"
            )
        new = torch.cat([toks[:, set_index].to(ehs.dtype), ehs], dim=1)  # (B, m + n_txt, D)
        args, kwargs = replace_argument(block, args, kwargs, "encoder_hidden_states", new)
        rotary = call_argument(block, args, kwargs, "image_rotary_emb") if rotary_rows is not None else None
        if rotary is not None:  # (cos, sin), each (n_txt + n_img, d)
            rows = rotary_rows(rotary, toks.shape[2])  # (cos, sin), each (m, d)
            rotary = tuple(torch.cat([t.to(r.device, r.dtype), r], dim=0)
                           for t, r in zip(rows, rotary))  # (m + n_txt + n_img, d)
            args, kwargs = replace_argument(block, args, kwargs, "image_rotary_emb", rotary)
        return args, kwargs

    return hook


def drop_hook(handle: AttachHandle):
    """Block post-hook: the first m text positions removed from the block's text output."""
    m = handle.tokens.layout.num_tokens

    def hook(block: nn.Module, args: tuple, output: Any) -> Any:
        if handle.current is None:
            return None
        ehs_out, hs = output
        if ehs_out is None:  # context_pre_only (last) block: no text output to trim
            return None
        return ehs_out[:, m:], hs  # (B, n_txt, D)

    return hook


class SD3Family(Family):
    name = "sd3"
    title = "SD3 / SD3.5"
    denoiser_class = "SD3Transformer2DModel"
    sampling = SamplingDefaults(steps=28, cfg=4.0)  # paper Table 4
    edit = EditPresets(steps=50, src_cfg=3.5, vanilla=(33, 13.5), tokens=(30, 9.0),
                       source="FlowEdit's SD3 setting (vanilla); SoftREPA Tables 5-6 (tokens)")
    text_length = 512  # the recipe's T5 length (authors' SD3 training); the pipeline's own default is 256
    repeated_blocks = ("JointTransformerBlock",)  # SD3Transformer2DModel declares no `_repeated_blocks`
    #: config names of the block width and the text width, for error messages
    width_names = ("caption_projection_dim", "joint_attention_dim")

    def matches(self, denoiser: nn.Module) -> bool:
        return isinstance(denoiser, SD3Transformer2DModel)

    def describe(self, denoiser: nn.Module) -> ModelInfo:
        cfg = denoiser.config
        return ModelInfo("sd3", int(cfg.caption_projection_dim), int(cfg.joint_attention_dim),
                         len(denoiser.transformer_blocks))

    def layout_for(self, denoiser: nn.Module, config: SoftTokensConfig) -> TokenLayout:
        info = self.describe(denoiser)
        layers = config.layers if config.layers is not None else tuple(range(config.num_layers))
        if max(layers) >= info.depth:
            raise SoftTokensError(f"layers {list(layers)} go beyond the model depth: it has {info.depth} transformer "
                                  f"blocks (num_layers must be <= {info.depth})")
        token_dim = info.text_dim if config.token_space == "text" else info.model_dim
        return TokenLayout(self.name, token_dim, info.model_dim, config.num_tokens, config.time_buckets,
                           config.token_space, layers, (), info.depth)

    def check_layout(self, layout: TokenLayout) -> None:
        if not layout.layers:
            raise SoftTokensError(f"layers must not be empty for an MM-DiT ({self.name}) layout")

    def check_fits(self, layout: TokenLayout, denoiser: nn.Module) -> None:
        info = self.describe(denoiser)
        if layout.family != info.family:
            raise SoftTokensError(f"family: tokens are for '{layout.family}', the model is '{info.family}'")
        block, text = self.width_names
        if layout.model_dim != info.model_dim:
            raise SoftTokensError(f"model_dim: tokens have width {layout.model_dim}, the model's "
                                  f"{block} is {info.model_dim}")
        if layout.token_space == "text" and layout.token_dim != info.text_dim:
            raise SoftTokensError(f"token_dim: text-space tokens have width {layout.token_dim}, the model's "
                                  f"{text} is {info.text_dim}")
        if layout.token_space == "block" and layout.token_dim != info.model_dim:
            raise SoftTokensError(f"token_dim: block-space tokens have width {layout.token_dim}, "
                                  f"the model's {block} is {info.model_dim}")
        if max(layout.layers) >= info.depth:
            raise SoftTokensError(f"layers: tokens use blocks {list(layout.layers)}, the model has only "
                                  f"{info.depth} transformer blocks")

    def projection(self, denoiser: nn.Module):
        return denoiser.context_embedder

    def install_hooks(self, denoiser: nn.Module, handle: AttachHandle) -> None:
        layout = handle.tokens.layout
        projection = denoiser.context_embedder if layout.token_space == "text" else None
        handle.add(denoiser.register_forward_pre_hook(model_pre_hook(handle, projection, "hidden_states"),
                                                      with_kwargs=True))
        for set_index, block_index in enumerate(layout.layers):
            block = denoiser.transformer_blocks[block_index]
            handle.add(block.register_forward_pre_hook(prepend_hook(handle, set_index), with_kwargs=True))
            handle.add(block.register_forward_hook(drop_hook(handle)))

    def backbone(self, pipe: Any, **kwargs: Any) -> SD3Backbone:
        return SD3Backbone(pipe, **kwargs)

    def edit_model(self, backbone: Backbone, steps: int, latent_shape: tuple[int, ...]):
        patch = getattr(backbone.denoiser.config, "patch_size", 1) or 1
        seq = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)  # latent tokens, for dynamic shifting
        scheduler = backbone.pipe.scheduler
        ntt = scheduler.config.get("num_train_timesteps", 1000)
        return flow_denoiser(backbone, ntt), flow_sigmas(scheduler, steps, seq), flow_add_noise


register_family(SD3Family())
