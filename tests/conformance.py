"""The one mapping from registered family name to its tiny pipelines, for the conformance suite
(`tests/test_conformance.py`) and the family-specific tests that need a family's tiny model.

A family may have several variants (layouts and pipelines that take different code paths in the
same family): every conformance test runs once per variant. `variants()` walks
`softrepa.family.family_names()`, so a newly registered family without an entry here still gets a
variant, one whose build fails every conformance test with a message saying to add it here
(and `test_every_registered_family_has_a_tiny_builder` fails too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

from softrepa import tiny, tiny_crossattn, tiny_dit
from softrepa.family import family_names


@dataclass(frozen=True)
class Variant:
    """One tiny pipeline of a family and what its stock call needs.

    Args:
        id: pytest id (unique over all variants).
        family: the registered family name the pipeline's denoiser belongs to.
        build: a complete tiny pipeline with random weights (a fresh one each call).
        text_length: `max_sequence_length` for pipelines that take one (the family's
            `text_length_option`); None for those that take none.
        call_kw: further arguments of the stock pipeline's call (guidance, true CFG).
        edit_size: (width, height) of FlowEdit source images: at most the pipeline's native size
            and a multiple of its size unit, so that nothing is resized.
        loss_kw: further `contrastive_backward` loss arguments.
        cli: whether the train / generate / edit CLI runs on a folder saved from this variant (one
            variant per family and per distinct pipeline class; the CLI is the slow part).
        video: the pipeline returns videos (`.frames`, no `.images`) and the family does no editing:
            the image-only tests (stock images, FlowEdit, the generate / edit CLI) skip it; the
            family's own tests check the same properties on videos.
    """

    id: str
    family: str
    build: Callable[[], Any]
    text_length: int | None = 16
    call_kw: dict[str, Any] = field(default_factory=dict)
    edit_size: tuple[int, int] = (32, 24)
    loss_kw: dict[str, Any] = field(default_factory=dict)
    cli: bool = False
    video: bool = False

    @property
    def text_kw(self) -> dict[str, int]:
        """`{"max_sequence_length": n}` where the pipeline takes a text length, else `{}`."""
        return {} if self.text_length is None else {"max_sequence_length": self.text_length}

    def cli_text_args(self, flag: str = "--max-sequence-length") -> list[str]:
        return [] if self.text_length is None else [flag, str(self.text_length)]


#: family name -> its variants. The first variant of a family is its main one.
FAMILIES: dict[str, tuple[Variant, ...]] = {
    "sd3": (
        # with T5: a saved folder that `from_pretrained` loads whole
        Variant("sd3", "sd3", lambda: tiny.tiny_sd3_pipeline(num_layers=6, with_t5=True), cli=True),
        # SD3.5 layout (qk RMS-norm, dual attention in the first blocks), no T5
        Variant("sd3.5", "sd3", lambda: tiny.tiny_sd3_pipeline(num_layers=6, qk_norm="rms_norm",
                                                                dual_attention_layers=(0, 1))),
    ),
    "sd15": (Variant("sd15", "sd15", tiny.tiny_sd15_pipeline, text_length=None, edit_size=(16, 12),
                     loss_kw={"denoise_weight": 0.5}, cli=True),),
    "sdxl": (Variant("sdxl", "sdxl", tiny.tiny_sdxl_pipeline, text_length=None, edit_size=(16, 12),
                     loss_kw={"denoise_weight": 0.5}, cli=True),),
    "flux": (
        Variant("flux-schnell", "flux", tiny.tiny_flux_pipeline),
        Variant("flux-dev", "flux", lambda: tiny.tiny_flux_pipeline(guidance_embeds=True), cli=True),
    ),
    "flux2": (
        Variant("flux2-dev", "flux2", tiny.tiny_flux2_pipeline, cli=True),
        Variant("flux2-no-guidance", "flux2", lambda: tiny.tiny_flux2_pipeline(guidance_embeds=False)),
        # FLUX.2 [klein]: another pipeline class (Qwen3 text encoder); base = true CFG
        Variant("flux2-klein", "flux2", tiny.tiny_flux2_klein_pipeline, call_kw={"guidance_scale": 4.0}, cli=True),
        Variant("flux2-klein-distilled", "flux2", lambda: tiny.tiny_flux2_klein_pipeline(is_distilled=True),
                call_kw={"guidance_scale": 4.0}),
    ),
    "qwenimage": (Variant("qwenimage", "qwenimage", tiny.tiny_qwenimage_pipeline, text_length=32,
                          call_kw={"true_cfg_scale": 4.0, "negative_prompt": " "}, cli=True),),
    # --- issue 24 part B: cross-attention DiTs (SANA, Wan text-to-video) ---
    "sana": (
        # SANA 1.0 layout; binning off: the stock call would render at its 1024-px aspect-ratio table
        Variant("sana", "sana", tiny_crossattn.tiny_sana_pipeline, call_kw={"use_resolution_binning": False},
                cli=True),
        # SANA 1.5 layout: query / key RMS norm
        Variant("sana-1.5", "sana", lambda: tiny_crossattn.tiny_sana_pipeline(qk_norm="rms_norm_across_heads"),
                call_kw={"use_resolution_binning": False}),
    ),
    "wan": (
        Variant("wan2.1-t2v", "wan", tiny_crossattn.tiny_wan_pipeline, call_kw={"num_frames": 5}, cli=True,
                video=True),
        # Wan 2.2 A14B: a second transformer for the low-noise steps
        Variant("wan2.2-a14b", "wan", lambda: tiny_crossattn.tiny_wan_pipeline(two_experts=True),
                call_kw={"num_frames": 5}, video=True),
        # Wan 2.2 TI2V: one timestep per latent token
        Variant("wan2.2-ti2v", "wan", lambda: tiny_crossattn.tiny_wan_pipeline(expand_timesteps=True),
                call_kw={"num_frames": 5}, video=True),
    ),
    # --- end of issue 24 part B ---
    # ---- issue 24 part A (FLUX.3, Qwen-Image 2.1, Z-Image): softrepa.tiny_dit
    # Z-Image: guidance_scale > 0 runs both CFG branches in one batched call (prompts of different lengths)
    "zimage": (Variant("zimage", "zimage", tiny_dit.tiny_zimage_pipeline, text_length=32,
                       call_kw={"guidance_scale": 3.0}, cli=True),),
    # Qwen-Image 2.1: no text length; true CFG needs one negative prompt per prompt (the pipeline does not
    # broadcast one); built in memory (its processor needs torchvision to be saved and loaded: no CLI here);
    # sides multiples of 32
    "qwenimage21": (Variant("qwenimage21", "qwenimage21", tiny_dit.tiny_qwenimage21_pipeline, text_length=None,
                            call_kw={"true_cfg_scale": 3.0, "negative_prompt": [" ", " "]}, edit_size=(64, 32)),),
    # FLUX.3: the modular pipeline (one prompt per call, CFG through its guider; `Flux3Family.render`),
    # base and step-distilled (flow map, no guider); in memory only, as Qwen-Image 2.1 (no CLI here)
    "flux3": (
        Variant("flux3", "flux3", tiny_dit.tiny_flux3_pipeline, text_length=160, call_kw={"guidance_scale": 3.0}),
        Variant("flux3-distilled", "flux3", lambda: tiny_dit.tiny_flux3_pipeline(distilled=True), text_length=160),
    ),
    # ---- end of issue 24 part A
}


def skip_video(v: Variant, what: str) -> None:
    """Skip an image-only conformance test for a video variant (`Variant.video`), saying what it needs."""
    if v.video:
        pytest.skip(f"{v.id} is a video variant: {what} (its family tests check the video equivalent)")


def _missing(name: str) -> Variant:
    def build():
        pytest.fail(f"family {name!r} is registered but has no tiny builder: add it to FAMILIES in "
                    "tests/conformance.py", pytrace=False)

    return Variant(f"{name}-NO-BUILDER", name, build, cli=True)


def variants(cli_only: bool = False) -> list[Variant]:
    """Every variant of every registered family, in registration order (a placeholder that fails for a
    registered family missing from `FAMILIES`)."""
    out = [v for name in family_names() for v in FAMILIES.get(name, (_missing(name),))]
    return [v for v in out if v.cli] if cli_only else out


def params(cli_only: bool = False) -> list:
    """`variants()` as pytest params with their ids."""
    return [pytest.param(v, id=v.id) for v in variants(cli_only)]


def family_params(name: str) -> list:
    """The variants of family `name` as pytest params, for a family file's own tests."""
    return [pytest.param(v, id=v.id) for v in FAMILIES[name]]


def variant(variant_id: str) -> Variant:
    """The variant called `variant_id`."""
    for vs in FAMILIES.values():
        for v in vs:
            if v.id == variant_id:
                return v
    raise KeyError(variant_id)


#: Captions of a pair batch: one repeated (a positive off the diagonal), different lengths (padded masks).
CAPTIONS = ["a red circle", "a blue square", "a red circle", "a green triangle"]


def pair_batch(backbone, n: int = 4, shared_t: bool = True, seed: int = 0, resolution: int = 32):
    """A `PairBatch` of n random images encoded by `backbone`, `CAPTIONS[:n]`, one noise for all."""
    from softrepa.pairs import PairBatch

    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1
    lat = backbone.encode_images(pixels, generator=g)
    t = backbone.sample_timesteps(n, g, shared=shared_t)
    noise = torch.randn((1,) + lat.shape[1:], generator=g)
    cond = backbone.encode_prompts(CAPTIONS[:n], resolution=resolution)
    return PairBatch(lat, cond, CAPTIONS[:n], t, noise)


def pair_tokens(pipe, scale: float = 10.0):
    """Tokens for pair computations: 2 blocks (MM-DiTs) / down + mid (UNets), every parameter x `scale`
    (seed 0) so that the contrastive gradients are far above float noise."""
    from softrepa import SoftTokens, SoftTokensConfig

    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2, blocks=("down", "mid")), seed=0)
    with torch.no_grad():
        for p in tokens.parameters():
            p.mul_(scale)
    return tokens


def pipeline_modules(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's `nn.Module` components by name (denoiser, VAE, text encoders)."""
    return {k: m for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def assert_hooked_equals_reference(pipe, tokens, inputs: dict, reference_forward, *, scale: float = 30.0,
                                   rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """For a family's own exactness test: the pipeline's transformer with `tokens` (every parameter
    multiplied by `scale`, for a visible effect) attached == `reference_forward(model, tokens, inputs)`
    (the family's forward written out without hooks), and the tokens change the output."""
    from softrepa import attach

    model = pipe.transformer
    with torch.no_grad():
        for p in tokens.parameters():
            p.mul_(scale)
        plain = model(**inputs, return_dict=False)[0]
        ref = reference_forward(model, tokens, inputs)
        with attach(pipe, tokens):
            got = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    assert (got - plain).abs().max() > 1e-4
