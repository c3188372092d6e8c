"""What a model family is, and the registry of the supported ones.

A *family* is everything softrepa knows about one kind of diffusers denoiser: how to recognise it,
its widths, where the soft tokens enter (hooks), how to train and sample through it (the
`Backbone`), its paper sampling settings and its FlowEdit adapter and presets. Each family is one
module under `softrepa/families/` that subclasses `Family` and ends with one line,
`register_family(MyFamily())` — the pattern of peft's `register_peft_method`. Nothing outside those
modules names a diffusers model class or branches on a family.

This module knows no concrete family (so that `tokens.py`, the attach plumbing and the trainer can
import it without importing diffusers). The built-in families register when `softrepa` is imported
(`softrepa/__init__` imports `softrepa.families`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from .errors import SoftTokensError

if TYPE_CHECKING:  # annotations only: these modules import this one
    from .hooks import AttachHandle
    from .backbone import Backbone
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
        repeated_blocks: class names of the blocks `compile_blocks` compiles when the diffusers
            model does not declare them itself (its `_repeated_blocks`).
    """

    name: str = ""
    title: str = ""
    denoiser_class: str = ""
    sampling: SamplingDefaults = SamplingDefaults(30, 7.0)
    edit: EditPresets = EditPresets(50, 3.5, (33, 13.5), (30, 9.0))
    text_length: int | None = None
    repeated_blocks: tuple[str, ...] = ()

    # ----------------------------------------------------------------- recognition and widths
    def matches(self, denoiser: nn.Module) -> bool:
        """Whether `denoiser` is a model of this family."""
        raise NotImplementedError

    def describe(self, denoiser: nn.Module) -> ModelInfo:
        raise NotImplementedError

    # ----------------------------------------------------------------- tokens
    def layout_for(self, denoiser: nn.Module, config: "SoftTokensConfig") -> "TokenLayout":
        """The `TokenLayout` of tokens built with `config` for `denoiser` (errors name the field)."""
        raise NotImplementedError

    def check_layout(self, layout: "TokenLayout") -> None:
        """Family rules a layout must follow on its own (raise `SoftTokensError` naming the field)."""

    def check_fits(self, layout: "TokenLayout", denoiser: nn.Module) -> None:
        """Raise `SoftTokensError` naming the first field of `layout` that does not fit `denoiser`."""
        raise NotImplementedError

    def projection(self, denoiser: nn.Module) -> Callable | None:
        """The model's own map from the text-encoder width to the block width (MM-DiT:
        `context_embedder`), or None when tokens enter at the text width (UNets)."""
        return None

    def install_hooks(self, denoiser: nn.Module, handle: "AttachHandle") -> None:
        """Register on `denoiser` the hooks that carry `handle.tokens` (each added with `handle.add`)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- training, sampling, editing
    def backbone(self, pipe: Any, **kwargs: Any) -> "Backbone":
        """The `Backbone` (encode prompts, noise, target, denoise) over a loaded pipeline."""
        raise NotImplementedError

    def edit_model(self, backbone: "Backbone", steps: int, latent_shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
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


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family to the registry (one line at the end of its module).

    Raises:
        ValueError: a family of that name is already registered.
    """
    if not family.name:
        raise ValueError(f"{type(family).__name__} has no name")
    if family.name in _FAMILIES:
        raise ValueError(f"a family named {family.name!r} is already registered ({_FAMILIES[family.name]!r})")
    _FAMILIES[family.name] = family
    return family


def family_names() -> tuple[str, ...]:
    """Registered family names, in registration order."""
    return tuple(_FAMILIES)


def get_family(name: str) -> Family:
    """The registered family called `name`.

    Raises:
        SoftTokensError: no such family (the message lists the known ones).
    """
    try:
        return _FAMILIES[name]
    except KeyError:
        raise SoftTokensError(f"family must be one of {sorted(_FAMILIES)}, got {name!r}") from None


def resolve_denoiser(model_or_pipeline: Any) -> nn.Module:
    """The denoising network of a pipeline (`.transformer` / `.unet`), or the model itself."""
    for attr in ("transformer", "unet"):
        sub = getattr(model_or_pipeline, attr, None)
        if isinstance(sub, nn.Module):
            return sub
    if isinstance(model_or_pipeline, nn.Module):
        return model_or_pipeline
    raise SoftTokensError(f"cannot find a denoiser in {type(model_or_pipeline).__name__}: expected one of "
                          f"{supported()} or a pipeline with .transformer / .unet")


def supported() -> str:
    return ", ".join(f"{f.denoiser_class} ({f.title})" for f in _FAMILIES.values())


def family_of(model_or_pipeline: Any) -> Family:
    """The family of a model or pipeline, found by asking each registered family.

    Raises:
        SoftTokensError: no registered family recognises the model.
    """
    denoiser = resolve_denoiser(model_or_pipeline)
    for family in _FAMILIES.values():
        if family.matches(denoiser):
            return family
    raise SoftTokensError(f"unsupported model {type(denoiser).__name__}: soft tokens attach to {supported()}")


def describe_model(model_or_pipeline: Any) -> ModelInfo:
    """Family and widths of a supported model or pipeline."""
    denoiser = resolve_denoiser(model_or_pipeline)
    return family_of(denoiser).describe(denoiser)


__all__ = ["EditPresets", "Family", "ModelInfo", "SamplingDefaults", "describe_model", "family_names", "family_of",
           "get_family", "register_family", "resolve_denoiser"]
