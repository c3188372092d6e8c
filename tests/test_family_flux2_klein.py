"""FLUX.2 [klein] (tiny `Flux2KleinPipeline`: Qwen3 text encoder, no guidance embedding) through the FLUX.2
family: the stock pipeline's true CFG carries the tokens on both branches, a step-distilled model samples
and edits without guidance, the backbone encodes as the pipeline does, and `softrepa train` / `generate
--compare` / `edit` run on a folder saved with `save_pretrained`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.cli import main
from softrepa.family import family_of
from softrepa.flowedit import FlowEditParams, guidance_mode
from softrepa.tiny import tiny_flux2_klein_pipeline
from tests.conftest import write_square_images

KW = dict(height=32, width=32, num_inference_steps=2, output_type="np", max_sequence_length=16)


def _count_calls(pipe):
    """Record the batch size of every transformer call; returns (list, hook handle)."""
    seen: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("distilled", [False, True], ids=["base", "distilled"])
def test_stock_pipeline_uses_the_tokens_and_disabled_is_vanilla(distilled):
    pipe = tiny_flux2_klein_pipeline(is_distilled=distilled)
    assert family_of(pipe).name == "flux2"
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    seen, hook = _count_calls(pipe)
    try:
        plain = pipe(prompt="a red circle", generator=gen(), guidance_scale=4.0, **KW).images
    finally:
        hook.remove()
    assert len(seen) == (2 if distilled else 4)  # base: a conditional and an empty-prompt call per step
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0)
    with torch.no_grad():
        tokens.base.mul_(50)
    with attach(pipe, tokens) as handle:
        with_tokens = pipe(prompt="a red circle", generator=gen(), guidance_scale=4.0, **KW).images
        with handle.disabled():
            assert (pipe(prompt="a red circle", generator=gen(), guidance_scale=4.0, **KW).images == plain).all()
    assert abs(with_tokens - plain).max() > 1e-4
    assert (pipe(prompt="a red circle", generator=gen(), guidance_scale=4.0, **KW).images == plain).all()


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
def test_flowedit_guides_as_the_pipeline_and_same_prompt_returns_the_source(distilled):
    from softrepa.edit import edit_latents, encode_source, image_to_pixels

    pipe = tiny_flux2_klein_pipeline(is_distilled=distilled)
    bb = backbone_for(pipe)
    assert guidance_mode(family_of(pipe).edit_model(bb, 4, (1, 16, 6, 8))[0]) == ("embedded" if distilled else "cfg")
    img = Image.fromarray((np.random.RandomState(0).rand(24, 32, 3) * 255).astype(np.uint8))
    z = encode_source(bb, image_to_pixels(img, (24, 32))).detach()
    p = FlowEditParams(steps=4, n_max=2, src_cfg=2.0, tar_cfg=2.0)
    run = lambda src, tar: edit_latents(pipe, z, [src], [tar], p, max_sequence_length=8)  # noqa: E731
    assert torch.equal(run("a red circle", "a red circle"), z)
    seen, hook = _count_calls(pipe)
    try:
        edited = run("a red circle", "a blue square")
    finally:
        hook.remove()
    # per step one joint call: (source, target) x (conditional, empty prompt) for the base model's true
    # CFG, (source, target) conditional rows only for the step-distilled one
    assert seen == [2 if distilled else 4] * 2
    assert (edited - z).abs().max() > 1e-3
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2, init_std=1.0), seed=0)
    with attach(pipe, tokens):
        assert torch.equal(run("a red circle", "a red circle"), z)
        assert not torch.allclose(run("a red circle", "a blue square"), edited, atol=1e-4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    pipe = tiny_flux2_klein_pipeline()
    pipe.save_pretrained(root / "klein")
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0)
    with torch.no_grad():
        tokens.base.mul_(50)
    softrepa.save_soft_tokens(tokens, root / "t.safetensors")
    write_square_images(root / "data")
    return root


def test_train_generate_and_edit_cli_on_a_saved_folder(saved, tmp_path):
    from softrepa.pipeline import load_pipeline

    assert type(load_pipeline(str(saved / "klein"))).__name__ == "Flux2KleinPipeline"
    out = tmp_path / "run"
    rc = main(["train", "--model", str(saved / "klein"), "--data", str(saved / "data"), "--output_dir", str(out),
               "--resolution", "32", "--batch_size", "3", "--max_steps", "1", "--num_workers", "0",
               "--checkpoint_every", "1", "--log_every", "1", "--validation.every", "0", "--tokens.num_layers", "2",
               "--loss.tau", "2.0", "--max_sequence_length", "16", "--no-progress"])
    assert rc == 0
    tokens = softrepa.load_soft_tokens(out / "tokens.safetensors")
    assert tokens.layout.family == "flux2" and tokens.layout.layers == (0, 1)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and np.isfinite(row["loss"])

    rc = main(["generate", "--model", str(saved / "klein"), "--tokens", str(saved / "t.safetensors"),
               "--prompts", "a red circle", "--seeds", "0", "--steps", "2", "--size", "32",
               "--max-sequence-length", "16", "--compare", "--no-progress", "--out", str(tmp_path / "gen")])
    assert rc == 0
    a, b = (tmp_path / "gen" / sub / "00000_s0.png" for sub in ("vanilla", "tokens"))
    assert a.read_bytes() != b.read_bytes()

    Image.fromarray((np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8)).save(tmp_path / "src.png")
    rc = main(["edit", "--model", str(saved / "klein"), "--tokens", str(saved / "t.safetensors"),
               "--image", str(tmp_path / "src.png"), "--source-prompt", "a red circle", "--target-prompt",
               "a blue square", "--steps", "4", "--n-max", "3", "--max-sequence-length", "8", "--no-progress",
               "--out", str(tmp_path / "edits")])
    assert rc == 0
    assert Image.open(tmp_path / "edits" / "src.png").size == (30, 20)


def test_true_cfg_on_klein_is_a_one_line_error(saved, tmp_path, capsys):
    """Klein's pipeline guides with true CFG itself (`--cfg`); `--true-cfg` (for guidance-distilled
    pipelines that take `true_cfg_scale`) is refused before anything is generated."""
    rc = main(["generate", "--model", str(saved / "klein"), "--prompts", "a red circle", "--seeds", "0",
               "--steps", "2", "--size", "32", "--true-cfg", "4", "--no-progress", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "Flux2KleinPipeline" in err[0] and "true_cfg_scale" in err[0]
    assert not list((tmp_path / "g").glob("**/*.png"))
