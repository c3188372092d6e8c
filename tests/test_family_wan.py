"""Wan family (tiny random WanPipeline variants), what is specific to it: tokens prepended to the text
context of the selected blocks (no mask), text-space tokens through `text_embedder`, the tokens on both
Wan 2.2 A14B experts and the backbone's routing between them, TI2V's per-token timesteps (and the
placement's `timestep_rule`, a template extension), the stock video pipeline with tokens (the video
form of the conformance suite's image test), image-to-video without an image context supported and
with one refused, FlowEdit refused, `generate` writing frames and mp4. What every family does is in
tests/test_conformance.py."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.errors import UsageError
from softrepa.family import family_of
from softrepa.tiny_crossattn import tiny_wan_pipeline, tiny_wan_transformer, tiny_wan_vae
from tests.conformance import assert_hooked_equals_reference, family_params
from tests.conftest import randomize_tokens

CONFIG = SoftTokensConfig(num_layers=2)
RES = 32


def _inputs(model, b=2, n_txt=6, f=2, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return {"hidden_states": torch.randn(b, c.in_channels, f, h, w, generator=g),
            "encoder_hidden_states": torch.randn(b, n_txt, c.text_dim, generator=g),
            "timestep": torch.tensor([310.0, 870.0])[:b]}


def reference_forward(model, tokens, inp):
    """Wan's forward written out, no hooks: each selected block reads [tokens, prompt] as its context."""
    lay = tokens.layout
    x = inp["hidden_states"]
    b, _, f, h, w = x.shape
    p_t, p_h, p_w = model.config.patch_size
    rotary = model.rope(x)
    hs = model.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, n_img, D)
    temb, proj, ctx, _ = model.condition_embedder(inp["timestep"], inp["encoder_hidden_states"], None)
    proj = proj.unflatten(1, (6, -1))  # (B, 6, D)
    toks = tokens(inp["timestep"], b, projection=model.condition_embedder.text_embedder)  # (B, S, m, D)
    for k, block in enumerate(model.blocks):
        c = torch.cat([toks[:, lay.layers.index(k)], ctx], dim=1) if k in lay.layers else ctx
        hs = block(hs, c, proj, rotary)
    shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    hs = model.proj_out((model.norm_out(hs.float()) * (1 + scale) + shift).type_as(hs))
    hs = hs.reshape(b, f // p_t, h // p_h, w // p_w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hs.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, f, h, w)


@pytest.mark.parametrize("space", ["text", "block"])
def test_hooked_equals_the_written_out_forward(space):
    pipe = tiny_wan_pipeline(num_layers=3)
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2, layers=(0, 2), token_space=space), seed=0)
    assert_hooked_equals_reference(pipe, tokens, _inputs(pipe.transformer), reference_forward)


def _video(pipe, v, **kw):
    return pipe(prompt=["a red circle", "a small blue square on the left"], height=RES, width=RES,
                num_inference_steps=2, output_type="np", generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                **v.text_kw, **v.call_kw, **kw).frames


@pytest.mark.parametrize("v", family_params("wan"))
def test_stock_video_pipeline_with_tokens_and_vanilla_after_remove(v, tmp_path):
    """The video form of the conformance suite's stock-pipeline test: both CFG branches, tokens change
    the videos, `disabled()` and remove() give the never-attached videos bit for bit, a saved file too."""
    pipe = v.build()
    pipe.set_progress_bar_config(disable=True)
    plain = _video(pipe, v)
    tokens = randomize_tokens(SoftTokens.for_model(pipe, CONFIG, seed=0))
    with attach(pipe, tokens) as handle:
        with_tokens = _video(pipe, v)
        with handle.disabled():
            assert np.array_equal(_video(pipe, v), plain)
    assert with_tokens.shape == plain.shape == (2, 5, RES, RES, 3)
    assert np.abs(with_tokens - plain).max() > 1e-4
    assert np.array_equal(_video(pipe, v), plain)
    path = softrepa.save_soft_tokens(tokens, tmp_path / "t.safetensors")
    with softrepa.load_into(pipe, path):
        assert np.array_equal(_video(pipe, v), with_tokens)


def test_both_a14b_experts_carry_the_tokens_and_training_routes_by_t():
    """Wan 2.2 A14B: attach reaches `transformer` and `transformer_2` (one handle, remove() restores both,
    either expert attached alone blocks attaching the pipeline); the backbone sends each sample to the
    expert the pipeline uses at its t (t >= 875: the high-noise one), a mixed batch == its parts."""
    pipe = tiny_wan_pipeline(two_experts=True)
    bb = backbone_for(pipe, max_sequence_length=16)
    tokens = randomize_tokens(SoftTokens.for_model(pipe, CONFIG, seed=0))
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompts(["a red circle", "a blue square", "a red circle"])
    t = torch.tensor([990.0, 300.0, 875.0])
    with torch.no_grad():
        plain = [e(hidden_states=x[:1, :, None], timestep=t[:1], encoder_hidden_states=cond.embeds[:1],
                   return_dict=False)[0] for e in (pipe.transformer, pipe.transformer_2)]
        with attach(pipe, tokens) as handle:
            for e, p in zip((pipe.transformer, pipe.transformer_2), plain):
                got = e(hidden_states=x[:1, :, None], timestep=t[:1], encoder_hidden_states=cond.embeds[:1],
                        return_dict=False)[0]
                assert (got - p).abs().max() > 1e-3  # each expert carries the tokens
            assert softrepa.attached_handle(pipe) is handle
            mixed = bb.denoise(x, t, cond)
            parts = [bb._call(e, x[i:i + 1], t[i:i + 1], cond.embeds[i:i + 1])
                     for i, e in enumerate((pipe.transformer, pipe.transformer_2, pipe.transformer))]
            torch.testing.assert_close(mixed, torch.cat(parts), rtol=1e-5, atol=1e-6)
        for e, p in zip((pipe.transformer, pipe.transformer_2), plain):
            assert torch.equal(e(hidden_states=x[:1, :, None], timestep=t[:1], encoder_hidden_states=cond.embeds[:1],
                                 return_dict=False)[0], p)
    second = attach(pipe.transformer_2, tokens)
    with pytest.raises(softrepa.SoftTokensError, match="already carries"):
        attach(pipe, tokens)
    second.remove()
    bb.freeze()
    assert not any(p.requires_grad for p in pipe.transformer_2.parameters())


def test_ti2v_per_token_timesteps_take_the_samples_noise_level():
    """TI2V calls the transformer with one timestep per latent token, 0 on a given first frame: the
    tokens' bucket is the sample's t (the largest), and the pipeline's form == one t per sample."""
    pipe = tiny_wan_pipeline(expand_timesteps=True)
    model = pipe.transformer
    tokens = randomize_tokens(SoftTokens.for_model(pipe, CONFIG, seed=0))
    inp = _inputs(model)
    n = 2 * 2 * 3  # frames x (4 / 2) x (6 / 2) latent tokens
    per_token = inp["timestep"][:, None].repeat(1, n)  # (B, n)
    per_token[:, :6] = 0.0  # the first frame's tokens: a clean conditioning image
    with torch.no_grad(), attach(pipe, tokens) as handle:
        model(**dict(inp, timestep=per_token), return_dict=False)
        got = handle.current
        uniform = model(**dict(inp, timestep=inp["timestep"][:, None].repeat(1, n)), return_dict=False)[0]
        single = model(**inp, return_dict=False)[0]
    torch.testing.assert_close(got, tokens(inp["timestep"], 2, projection=family_of(pipe).projection(model)))
    torch.testing.assert_close(uniform, single, rtol=1e-5, atol=1e-6)


def test_image_to_video_without_an_image_context_works_and_with_one_is_refused():
    """TI2V's image mode through `WanImageToVideoPipeline` (no image context: the text is the prompt alone)
    carries the tokens and is vanilla after remove(); a transformer with an image context
    (added_kv_proj_dim, Wan 2.1 I2V) is refused by name, and training an I2V transformer too."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from PIL import Image

    t2v = tiny_wan_pipeline(expand_timesteps=True)
    pipe = WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                   scheduler=t2v.scheduler, transformer=t2v.transformer, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.RandomState(0).rand(RES, RES, 3) * 255).astype(np.uint8))

    def run():
        return pipe(image=image, prompt="a red circle", height=RES, width=RES, num_frames=5, num_inference_steps=2,
                    max_sequence_length=16, output_type="np", generator=torch.Generator().manual_seed(0)).frames

    plain = run()
    with attach(pipe, randomize_tokens(SoftTokens.for_model(pipe, CONFIG, seed=0))):
        assert np.abs(run() - plain).max() > 1e-4
    assert np.array_equal(run(), plain)

    torch.manual_seed(0)
    i2v = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, image_dim=16,
                                added_kv_proj_dim=32)
    with pytest.raises(softrepa.SoftTokensError, match="image context"):
        attach(i2v, SoftTokens.for_model(i2v, CONFIG, seed=0))
    t2v.transformer = tiny_wan_transformer()
    t2v.transformer.register_to_config(in_channels=10)  # Wan 2.2 I2V: latents + condition + mask channels
    with pytest.raises(softrepa.SoftTokensError, match="text-to-video"):
        backbone_for(t2v)


def test_flowedit_is_refused_in_one_line():
    from softrepa.edit import edit_image
    from softrepa.flowedit import FlowEditParams
    from PIL import Image

    pipe = tiny_wan_pipeline()
    with pytest.raises(UsageError, match="FlowEdit: Wan is a video family"):
        FlowEditParams.preset(family_of(pipe), with_tokens=False)
    with pytest.raises(UsageError, match="FlowEdit: Wan is a video family"):
        edit_image(pipe, Image.new("RGB", (RES, RES)), "a red circle", "a blue square")


def test_generate_writes_frames_mp4_and_the_first_frame(tmp_path, monkeypatch, caplog):
    """`generate_images` on a video pipeline: per video a `_frames/` folder, the first frame as the row's
    PNG (the stock call's first frame at the same seed, bit for bit), an mp4 through diffusers'
    `export_to_video` at the family's fps where imageio is installed, else one notice and no mp4."""
    from softrepa import generate

    pipe = tiny_wan_pipeline()
    kw = dict(steps=2, height=RES, width=RES, max_sequence_length=16, call_kwargs={"num_frames": 5}, progress=False)
    generate._mp4_writer.cache_clear()
    monkeypatch.setattr("diffusers.utils.import_utils.is_imageio_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="softrepa.generate"):
        rows = generate.generate_images(pipe, ["a red circle"], [0], tmp_path / "a", **kw)
    assert "pip install 'softrepa[video]'" in caplog.text
    assert (rows[0]["video"], rows[0]["num_frames"], rows[0]["fps"]) == (None, 5, 16)
    frames = sorted((tmp_path / "a" / "00000_s0_frames").iterdir())
    assert [f.name for f in frames] == [f"{k:05d}.png" for k in range(5)]
    assert (tmp_path / "a" / "00000_s0.png").read_bytes() == frames[0].read_bytes()
    ref = pipe(prompt="a red circle", height=RES, width=RES, num_inference_steps=2, num_frames=5, output_type="pil",
               max_sequence_length=16, guidance_scale=family_of(pipe).sampling.cfg,
               generator=torch.Generator().manual_seed(0)).frames[0][0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(frames[0]).convert("RGB")), np.asarray(ref))

    written = []
    generate._mp4_writer.cache_clear()
    monkeypatch.setattr(generate, "_mp4_writer", lambda: lambda fr, path, fps: written.append((len(fr), fps)) or
                        open(path, "wb").write(b"mp4"))
    rows = generate.generate_images(pipe, ["a red circle"], [0], tmp_path / "b", **kw)
    assert written == [(5, 16)] and rows[0]["video"] == "00000_s0.mp4"
    assert (tmp_path / "b" / "00000_s0.mp4").read_bytes() == b"mp4"
    row = json.loads((tmp_path / "b" / "metadata.jsonl").read_text().splitlines()[0])
    assert (row["family"], row["frames"]) == ("wan", "00000_s0_frames")


def test_family_facts_and_recipe():
    from diffusers import WanTransformer3DModel

    from softrepa.config import load_config

    pipe = tiny_wan_pipeline()
    fam = family_of(pipe)
    assert (fam.name, fam.sampling.steps, fam.sampling.cfg, fam.text_length, fam.video_fps) == ("wan", 50, 5.0, 512, 16)
    cfg = load_config("wan")
    assert (cfg.max_sequence_length, cfg.resolution, cfg.validation.every) == (512, 480, 0)
    with torch.device("meta"):  # Wan 2.1 T2V 1.3B's widths, no weights
        real = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
        tokens = SoftTokens.for_model(real, cfg.tokens)
    lay = tokens.layout
    assert (lay.family, lay.token_dim, lay.model_dim, lay.model_depth) == ("wan", 4096, 1536, 30)
    assert sum(p.numel() for p in tokens.parameters()) == 5 * 4 * 4096 + 100 * 5 * 1536
    assert tiny_wan_vae().config.scale_factor_spatial == 4


@pytest.mark.slow
def test_agsm_trains_through_both_a14b_experts(tmp_path):
    """`softrepa train --objective agsm` on a saved Wan 2.2 A14B folder, one t per sample (both experts
    in one batch): one finite step, and the saved (psi+) tokens have the model's layout."""
    from softrepa.cli import main
    from tests.conftest import write_square_images

    pipe = tiny_wan_pipeline(two_experts=True)
    pipe.save_pretrained(tmp_path / "model")
    write_square_images(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--output_dir",
                 str(out), "--resolution", "32", "--batch_size", "3", "--max_steps", "1", "--num_workers", "0",
                 "--checkpoint_every", "1", "--log_every", "1", "--validation.every", "0", "--tokens.num_layers", "2",
                 "--tokens.init", "normal", "--objective", "agsm", "--shared_timestep", "false",
                 "--max_sequence_length", "16", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    tokens = softrepa.load_soft_tokens(out / "tokens.safetensors")
    fresh = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2, init="normal"), seed=0)
    assert tokens.layout == fresh.layout


def test_edit_image_with_explicit_params_is_refused_in_one_line():
    """FlowEdit is refused for the video family also when the caller passes its own settings."""
    from PIL import Image

    from softrepa.edit import edit_image
    from softrepa.errors import UsageError
    from softrepa.flowedit import FlowEditParams
    from softrepa.tiny_crossattn import tiny_wan_pipeline

    with pytest.raises(UsageError, match="Wan is a video family"):
        edit_image(tiny_wan_pipeline(), Image.new("RGB", (32, 32)), "a", "b", FlowEditParams(steps=4, n_max=3))


def test_checkpointing_and_compilation_reach_both_a14b_experts(tmp_path):
    """The trainer turns gradient checkpointing on for every denoiser the family runs, and regional
    compilation of the pipeline covers both experts' blocks (the low-noise expert was missed before)."""
    from softrepa.compilation import compile_blocks
    from softrepa.config import load_config, parse_overrides
    from softrepa.train import Trainer
    from tests.conftest import write_square_images

    pipe = tiny_wan_pipeline(two_experts=True)
    write_square_images(tmp_path / "data")
    cfg = load_config(None, parse_overrides([
        "--model", "tiny", "--data", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"),
        "--resolution", "32", "--batch_size", "3", "--max_steps", "1", "--num_workers", "0",
        "--tokens.num_layers", "2", "--gradient_checkpointing", "true", "--max_sequence_length", "16"]))
    trainer = Trainer(cfg, pipe=pipe)
    assert pipe.transformer.gradient_checkpointing and pipe.transformer_2.gradient_checkpointing
    trainer.handle.remove()
    compiled = compile_blocks(pipe)
    try:
        per_expert = len(pipe.transformer.blocks)
        assert len(compiled) == 2 * per_expert
        assert all("forward" in b.__dict__ for b in (*pipe.transformer.blocks, *pipe.transformer_2.blocks))
    finally:
        compiled.remove()
    assert not any("forward" in b.__dict__ for b in (*pipe.transformer.blocks, *pipe.transformer_2.blocks))
