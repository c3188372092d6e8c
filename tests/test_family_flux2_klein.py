"""FLUX.2 [klein] (tiny `Flux2KleinPipeline`: Qwen3 text encoder, no guidance embedding) through the FLUX.2
family, what is specific to it: the base model samples and edits with true CFG (two calls a step), a
step-distilled one without guidance, the backbone encodes as the pipeline does, `--true-cfg` is refused.
The tokens in the stock pipeline, FlowEdit identities and `softrepa train` / `generate --compare` /
`edit` on a saved folder: tests/test_conformance.py (variants flux2-klein, flux2-klein-distilled)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.cli import main
from softrepa.family import family_of
from softrepa.flowedit import FlowEditParams, guidance_mode
from softrepa.tiny import tiny_flux2_klein_pipeline

KW = dict(height=32, width=32, num_inference_steps=2, output_type="np", max_sequence_length=16)


def _count_calls(pipe):
    """Record the batch size of every transformer call; returns (list, hook handle)."""
    seen: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("distilled", [False, True], ids=["base", "distilled"])
def test_stock_pipeline_guides_with_true_cfg_unless_distilled(distilled):
    """The base model's pipeline calls the transformer on a conditional and an empty-prompt branch per
    step, the step-distilled one once; the same with tokens attached."""
    pipe = tiny_flux2_klein_pipeline(is_distilled=distilled)
    assert family_of(pipe).name == "flux2"
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    seen, hook = _count_calls(pipe)
    try:
        pipe(prompt="a red circle", generator=gen(), guidance_scale=4.0, **KW)
        with attach(pipe, SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0)):
            pipe(prompt="a red circle", generator=gen(), guidance_scale=4.0, **KW)
    finally:
        hook.remove()
    assert seen == [1] * (2 if distilled else 4) * 2  # base: a conditional and an empty-prompt call per step


def test_backbone_encodes_and_denoises_as_the_pipeline():
    """The prompt embedding is the pipeline's `encode_prompt` (Qwen3 layers 9, 18, 27 stacked); the
    backbone's velocity is the transformer called with the pipeline's ids and t / 1000."""
    pipe = tiny_flux2_klein_pipeline()
    bb = backbone_for(pipe, max_sequence_length=16)
    cond = bb.encode_prompts(["a red circle", "a blue square"])
    ref, text_ids = pipe.encode_prompt(["a red circle", "a blue square"], max_sequence_length=16)
    assert cond.embeds.shape == (2, 16, 48) and torch.equal(cond.embeds, ref)
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        v = bb.denoise(x, t, cond)
        out = pipe.transformer(hidden_states=x.flatten(2).transpose(1, 2), timestep=t / 1000, guidance=None,
                               encoder_hidden_states=ref, txt_ids=text_ids, img_ids=pipe._prepare_latent_ids(x),
                               return_dict=False)[0]
    torch.testing.assert_close(v, out.transpose(1, 2).reshape(2, 16, 4, 4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distilled", [False, True], ids=["base", "distilled"])
def test_flowedit_guides_as_the_pipeline(distilled):
    """FlowEdit guides as the pipeline samples: the base model with true CFG, the step-distilled one without
    guidance (the identities: tests/test_conformance.py)."""
    from softrepa.edit import edit_latents, encode_source, image_to_pixels

    pipe = tiny_flux2_klein_pipeline(is_distilled=distilled)
    bb = backbone_for(pipe)
    assert guidance_mode(family_of(pipe).edit_model(bb, 4, (1, 16, 6, 8))[0]) == ("embedded" if distilled else "cfg")
    img = Image.fromarray((np.random.RandomState(0).rand(24, 32, 3) * 255).astype(np.uint8))
    z = encode_source(bb, image_to_pixels(img, (24, 32))).detach()
    seen, hook = _count_calls(pipe)
    try:
        edit_latents(pipe, z, ["a red circle"], ["a blue square"],
                     FlowEditParams(steps=4, n_max=2, src_cfg=2.0, tar_cfg=2.0), max_sequence_length=8)
    finally:
        hook.remove()
    # per step one joint call: (source, target) x (conditional, empty prompt) for the base model's true
    # CFG, (source, target) conditional rows only for the step-distilled one
    assert seen == [2 if distilled else 4] * 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    tiny_flux2_klein_pipeline().save_pretrained(root / "klein")
    return root


def test_true_cfg_on_klein_is_a_one_line_error(saved, tmp_path, capsys):
    """Klein's pipeline guides with true CFG itself (`--cfg`); `--true-cfg` (for guidance-distilled
    pipelines that take `true_cfg_scale`) is refused before anything is generated."""
    rc = main(["generate", "--model", str(saved / "klein"), "--prompts", "a red circle", "--seeds", "0",
               "--steps", "2", "--size", "32", "--true-cfg", "4", "--no-progress", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "Flux2KleinPipeline" in err[0] and "true_cfg_scale" in err[0]
    assert not list((tmp_path / "g").glob("**/*.png"))
