"""The registry of model families: `register_family`, `family_names`, `get_family`, `family_of`.

Apart from the `Family` base class (`softrepa.family`), so that every module can look a family up
(tokens, the attach plumbing, the trainer) without importing the contract's signatures, and the
contract can name `TokenLayout`, `AttachHandle` and `Backbone` without an import cycle. The built-in
families register when `softrepa` is imported (`softrepa/__init__` imports `softrepa.families`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import SoftTokensError

if TYPE_CHECKING:
    from .family import Family, ModelInfo


_FAMILIES: dict[str, "Family"] = {}


def register_family(family: "Family") -> "Family":
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


def get_family(name: str) -> "Family":
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


def family_of(model_or_pipeline: Any) -> "Family":
    """The family of a model or pipeline, found by asking each registered family.

    Raises:
        SoftTokensError: no registered family recognises the model.
    """
    denoiser = resolve_denoiser(model_or_pipeline)
    for family in _FAMILIES.values():
        if family.matches(denoiser):
            return family
    raise SoftTokensError(f"unsupported model {type(denoiser).__name__}: soft tokens attach to {supported()}")


def describe_model(model_or_pipeline: Any) -> "ModelInfo":
    """Family and widths of a supported model or pipeline."""
    denoiser = resolve_denoiser(model_or_pipeline)
    return family_of(denoiser).describe(denoiser)


__all__ = ["describe_model", "family_names", "family_of", "get_family", "register_family", "resolve_denoiser",
           "supported"]
