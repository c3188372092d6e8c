"""What a model family is, and the registry of the supported ones.

A *family* is everything softrepa knows about one kind of diffusers denoiser: how to recognise it,
its widths, where the soft tokens enter (a `softrepa.templates.Placement`: which of the three
templates, the block list, argument names, masks, rotary rows, timestep scale), how to train and
sample through it (its `Backbone`), its text length, its paper sampling settings and its FlowEdit
adapter and presets. Each family is one module under `softrepa/families/` holding one `Family`
subclass (no family class derives from another) and ending with one line,
`register_family(MyFamily())` — the pattern of peft's `register_peft_method`. Nothing outside
those modules names a diffusers model class or branches on a family.

`Family` declares every extension point; the defaults serve the per-block (MM-DiT) layouts, one
token set per selected block. The registry lives apart, in `softrepa.registry` (its names are
re-exported here for existing imports).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from .backbone import Backbone
from .errors import SoftTokensError
from .hooks import AttachHandle
from .registry import describe_model, family_names, family_of, get_family, register_family, resolve_denoiser, supported
from .templates import Placement, install
from .tokens import SoftTokensConfig, TokenLayout


@dataclass(frozen=True)
class ModelInfo:
    """The widths of a supported denoiser.

    Args:
        family: registered family name ("sd3", "sd15", "sdxl", ...).
        model_dim: width at which tokens enter the blocks (MM-DiT block width, UNet cross_attention_dim).
        text_dim: width of the text-encoder output the model reads (== model_dim for UNets).
        depth: number of blocks that can carry a token set each (0: one set shared by block groups).
    """

    family: str
    model_dim: int
    text_dim: int
    depth: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SamplingDefaults:
    """The paper's sampling settings of a family (Table 4); the size is the pipeline's native one."""

    steps: int
    cfg: float


@dataclass(frozen=True)
class EditPresets:
    """FlowEdit settings of a family: (n_max, target CFG) without and with soft tokens.

    Args:
        steps: NFE of the sigma grid.
        src_cfg: source CFG scale.
        vanilla: (n_max, tar_cfg) of the stock model.
        tokens: (n_max, tar_cfg) with soft tokens attached.
        source: where the numbers come from (cited in `softrepa edit --help` and the docs).
    """

    steps: int
    src_cfg: float
    vanilla: tuple[int, float]
    tokens: tuple[int, float]
    source: str = ""

    def choose(self, with_tokens: bool) -> tuple[int, float]:
        return self.tokens if with_tokens else self.vanilla


class Family:
    """Base class of a model family; subclasses fill in the class attributes and methods.

    Class attributes:
        name: registry key, also stored in every tokens file's layout.
        title: human-readable models ("SD3 / SD3.5").
        denoiser_class: the diffusers class name this family attaches to (for messages).
        prediction: "flow" (rectified flow, velocity), or "epsilon" / "v_prediction" (read from the
            scheduler by the backbone).
        sampling: paper sampling defaults.
        edit: FlowEdit presets.
        text_length: the text positions prompts are encoded to when the user gives none (the
            pipeline's `max_sequence_length`: T5 / Mistral / Qwen length, the length the family's
            recipe trains with), used alike by train, generate, edit, diagnose and the page; None
            for families whose pipelines take no text length (UNets: CLIP's fixed 77).
        native_size: the pipeline's default image side in pixels, for families whose pipeline and
            denoiser declare none (`default_sample_size`, `sample_size`; Z-Image: 1024); else None.
        repeated_blocks: class names of the blocks `compile_blocks` compiles when the diffusers
            model does not declare them itself (its `_repeated_blocks`).
        placement: where the tokens enter (`softrepa.templates.Placement`: template + block metadata).
        block_list: the denoiser attribute holding the blocks a per-block layout indexes.
        width_names: config names of the block and text widths, for error messages.
        projection_modules: denoiser attributes that map text-space tokens into the block width.
        cfg_branches: where the stock pipeline's unconditional CFG rows are (`softrepa.branches`):
            "batch" (one call on [uncond; cond]), "calls" (one call per branch inside diffusers'
            `cache_context`), "" (unknown: `--uncond-tokens negative / none` is refused).
        video_fps: frames per second of the videos the family's pipeline returns (None: images).

    Extension points (methods): `matches`, `widths` / `describe`, `layout_for` / `check_layout` /
    `check_fits`, `projection`, `install_hooks`, `backbone`, `edit_model`, `run_settings`,
    `guidance_kwargs`, `render`, `resolve_text_length`; the backbone's `encode_source` is FlowEdit's source.
    """

    name: str = ""
    title: str = ""
    denoiser_class: str = ""
    sampling: SamplingDefaults = SamplingDefaults(30, 7.0)
    edit: EditPresets = EditPresets(50, 3.5, (33, 13.5), (30, 9.0))
    text_length: int | None = None
    native_size: int | None = None
    repeated_blocks: tuple[str, ...] = ()
    placement: Placement
    block_list: str = "transformer_blocks"
    width_names: tuple[str, str] = ("inner_dim (num_attention_heads x attention_head_dim)", "joint_attention_dim")
    projection_modules: tuple[str, ...] = ("context_embedder",)
    cfg_branches: str = ""
    video_fps: int | None = None

    # ----------------------------------------------------------------- recognition and widths
    def matches(self, denoiser: nn.Module) -> bool:
        """Whether `denoiser` is a model of this family (an isinstance check of its diffusers class)."""
        raise NotImplementedError

    def widths(self, denoiser: nn.Module) -> tuple[int, int]:
        """(block width the tokens enter at, text-encoder width the model reads). Default: an MM-DiT's
        `num_attention_heads * attention_head_dim` and `joint_attention_dim`."""
        cfg = denoiser.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim), int(cfg.joint_attention_dim)

    def describe(self, denoiser: nn.Module) -> ModelInfo:
        """Family, widths and depth (the length of the placement's block list) of `denoiser`."""
        model_dim, text_dim = self.widths(denoiser)
        return ModelInfo(self.name, model_dim, text_dim, len(getattr(denoiser, self.block_list)))

    # ----------------------------------------------------------------- tokens
    def layout_for(self, denoiser: nn.Module, config: SoftTokensConfig) -> TokenLayout:
        """The `TokenLayout` of tokens built with `config` for `denoiser` (errors name the field).

        Default: one token set per selected block of `block_list` (`config.layers`, else the first
        `config.num_layers`), base tokens in the text-encoder or the block width (`config.token_space`).
        """
        info = self.describe(denoiser)
        layers = config.layers if config.layers is not None else tuple(range(config.num_layers))
        if max(layers) >= info.depth:
            raise SoftTokensError(f"layers {list(layers)} go beyond the model depth: it has {info.depth} transformer "
                                  f"blocks (num_layers must be <= {info.depth})")
        token_dim = info.text_dim if config.token_space == "text" else info.model_dim
        return TokenLayout(self.name, token_dim, info.model_dim, config.num_tokens, config.time_buckets,
                           config.token_space, layers, (), info.depth)

    def check_layout(self, layout: TokenLayout) -> None:
        """Family rules a layout must follow on its own (raise `SoftTokensError` naming the field)."""
        if not layout.layers:
            raise SoftTokensError(f"layers must not be empty for a per-block ({self.name}) layout")

    def check_fits(self, layout: TokenLayout, denoiser: nn.Module) -> None:
        """Raise `SoftTokensError` naming the first field of `layout` that does not fit `denoiser`."""
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

    def projection(self, denoiser: nn.Module) -> Callable | None:
        """The model's own map from the text-encoder width to the block width (`projection_modules`
        in order: MM-DiT `context_embedder`; Qwen-Image `txt_norm` then `txt_in`), or None (UNets).
        A new container of the model's own modules: nothing is added to the model."""
        mods = [getattr(denoiser, name) for name in self.projection_modules]
        if not mods:
            return None
        return mods[0] if len(mods) == 1 else nn.Sequential(*mods)

    def denoisers(self, model_or_pipeline: Any, denoiser: nn.Module) -> list[nn.Module]:
        """Every denoiser of `model_or_pipeline` the tokens must reach, `denoiser` (the main one) first.
        Default: that one; Wan 2.2 A14B adds its low-noise expert `transformer_2`."""
        return [denoiser]

    def install_hooks(self, denoiser: nn.Module, handle: AttachHandle) -> None:
        """Register the hooks of the family's `placement` that carry `handle.tokens` (through `handle.add`)."""
        projection = self.projection(denoiser) if handle.tokens.layout.token_space == "text" else None
        install(denoiser, handle, self.placement, projection)

    # ----------------------------------------------------------------- training, sampling, editing
    def backbone(self, pipe: Any, **kwargs: Any) -> Backbone:
        """The `Backbone` (encode prompts, noise, target, denoise) over a loaded pipeline."""
        raise NotImplementedError

    def edit_model(self, backbone: Backbone, steps: int, latent_shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        """(denoise, sigmas, add_noise) of FlowEdit for this family (see `softrepa.flowedit`)."""
        raise NotImplementedError

    def run_settings(self) -> dict[str, Any]:
        """Family-specific entries recorded in (and required to match for resuming) an output folder."""
        return {}

    def guidance_kwargs(self, cfg: float) -> dict[str, Any]:
        """Keyword arguments of the stock pipeline's call that sample with CFG scale `cfg`.

        Args:
            cfg: the CFG scale (`softrepa generate --cfg`, the family's `sampling.cfg` by default).
        Returns:
            `{"guidance_scale": cfg}` for most pipelines; a family whose pipeline guides through other
            arguments (Qwen-Image: `true_cfg_scale` and a negative prompt) overrides this.
        """
        return {"guidance_scale": cfg}

    def sampling_for(self, pipe: Any) -> SamplingDefaults:
        """The sampling defaults of this pipeline: the family's `sampling`, unless the pipeline is a variant
        that samples otherwise (FLUX.3's step-distilled pipeline: its 16 steps, no CFG)."""
        return self.sampling

    def applied_cfg(self, pipe: Any, cfg: float) -> float:
        """The CFG scale a sampling call of `pipe` actually uses when asked for `cfg` (recorded in the run's
        metadata): `cfg`, unless the pipeline samples without guidance (FLUX.3's step-distilled one: 1.0,
        with a warning when another scale was asked for)."""
        return float(cfg)

    def render(self, pipe: Any, prompts: Sequence[str], generators: Sequence[Any], *, steps: int, height: int,
               width: int, call_kwargs: dict[str, Any], output_type: str = "pil") -> list:
        """One image per prompt (a video: its list of frames) through the stock pipeline's own call.

        Args:
            pipe: the loaded pipeline (tokens attached or not: the call is the same).
            prompts: the prompts, one image each.
            generators: one `torch.Generator` per prompt.
            steps, height, width: the sampling steps and image size.
            call_kwargs: further arguments of the call (`guidance_kwargs`, a negative prompt, ...).
            output_type: "pil" or "np" (the validation grid takes arrays).
        Returns:
            The pipeline's images (or videos) in prompt order.

        Default: `pipe(prompt=[...], generator=[...], ...)` — a classic diffusers pipeline, one call for
        the batch. A family whose stock pipeline is called differently (FLUX.3's modular pipeline: one
        prompt per call, the CFG scale on its guider) overrides this; callers never branch on it.
        """
        result = pipe(prompt=list(prompts), num_inference_steps=steps, height=height, width=width,
                      generator=list(generators), output_type=output_type, **call_kwargs)
        images = getattr(result, "images", None)
        return list(images) if images is not None else list(result.frames)  # a video pipeline: frames

    @property
    def text_length_option(self) -> bool:
        """Whether `max_sequence_length` applies to this family."""
        return self.text_length is not None

    def resolve_text_length(self, explicit: int | None = None) -> int | None:
        """The text length to use: `explicit` (a user's `--max-sequence-length`) or the family's.

        Raises:
            SoftTokensError: a length given for a family that takes none, or a length < 1.
        """
        if explicit is None:
            return self.text_length
        if self.text_length is None:
            raise SoftTokensError(f"max_sequence_length: {self.title} models take no text length, got {explicit}")
        if int(explicit) < 1:
            raise SoftTokensError(f"max_sequence_length must be >= 1, got {explicit}")
        return int(explicit)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, denoiser={self.denoiser_class})"


__all__ = ["EditPresets", "Family", "ModelInfo", "SamplingDefaults", "describe_model", "family_names", "family_of",
           "get_family", "register_family", "resolve_denoiser", "supported"]
