"""What the unconditional CFG branch carries (AGSM's psi+ / psi-, `softrepa.branches`): several-set
tokens files, the row choice of batched and per-call CFG, the split call of "none", and that
detaching still restores the model exactly."""

from __future__ import annotations

import copy

import pytest
import torch

import softrepa
from softrepa import tiny
from softrepa.artifact import SETS_KEY, read_metadata
from softrepa.errors import SoftTokensError, UsageError
from softrepa.registry import resolve_denoiser
from softrepa.tokens import SoftTokens


def _sets(pipe, seed=0):
    """Two token sets of one layout sharing the time part (as an AGSM run's psi+ / psi-)."""
    torch.manual_seed(seed)
    pos = SoftTokens.for_model(pipe, softrepa.SoftTokensConfig(num_layers=2))
    neg = copy.deepcopy(pos)
    with torch.no_grad():
        pos.base.normal_(0, 1.0)
        neg.base.normal_(0, 1.0)
        if pos.time is not None:
            pos.time.normal_(0, 0.5)
            neg.time.copy_(pos.time)
    return pos, neg


def _agsm_file(pipe, path, seed=0):
    pos, neg = _sets(pipe, seed)
    softrepa.save_soft_tokens(pos, path, others={"negative": neg}, name="positive",
                              extra_metadata={"objective": "agsm"})
    return pos, neg


# ----------------------------------------------------------------------------- the file
def test_a_file_holds_both_sets_and_stores_a_shared_time_part_once(tmp_path):
    pipe = tiny.tiny_sd3_pipeline()
    pos, neg = _agsm_file(pipe, tmp_path / "t.safetensors")
    path = tmp_path / "t.safetensors"
    assert softrepa.token_sets_of(path) == ["positive", "negative"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["base", "negative.base", "time"]  # the time part once
    a, b = softrepa.load_soft_tokens(path), softrepa.load_soft_tokens(path, token_set="negative")
    assert torch.equal(a.base, pos.base) and torch.equal(b.base, neg.base) and torch.equal(b.time, pos.time)
    assert torch.equal(softrepa.load_soft_tokens(path, token_set="positive").base, pos.base)
    with pytest.raises(SoftTokensError, match="no token set 'other'; the file holds positive, negative"):
        softrepa.load_soft_tokens(path, token_set="other")
    # a set with its own time part keeps it
    with torch.no_grad():
        neg.time.add_(1.0)
    softrepa.save_soft_tokens(pos, tmp_path / "u.safetensors", others={"negative": neg}, name="positive")
    assert torch.equal(softrepa.load_soft_tokens(tmp_path / "u.safetensors", token_set="negative").time, neg.time)
    # a one-set file is one set, as before
    softrepa.save_soft_tokens(pos, tmp_path / "one.safetensors")
    assert softrepa.token_sets_of(tmp_path / "one.safetensors") == ["tokens"]
    assert SETS_KEY not in read_metadata(tmp_path / "one.safetensors")


def test_a_set_of_another_layout_is_refused(tmp_path):
    pos, _ = _sets(tiny.tiny_sd3_pipeline())
    other = SoftTokens.for_model(tiny.tiny_sd3_pipeline(), softrepa.SoftTokensConfig(num_tokens=2, num_layers=2))
    with pytest.raises(SoftTokensError, match="token set 'negative' has another layout"):
        softrepa.save_soft_tokens(pos, tmp_path / "t.safetensors", others={"negative": other})


def test_negative_needs_a_negative_set(tmp_path):
    pipe = tiny.tiny_sd3_pipeline()
    pos, _ = _sets(pipe)
    softrepa.save_soft_tokens(pos, tmp_path / "one.safetensors")
    with pytest.raises(UsageError, match="needs a file with a 'negative' token set.*holds tokens"):
        softrepa.load_into(pipe, tmp_path / "one.safetensors", uncond_tokens="negative")
    assert softrepa.attached_handle(pipe) is None  # nothing left attached
    with pytest.raises(UsageError, match="must be one of positive, negative, none"):
        softrepa.load_into(pipe, tmp_path / "one.safetensors", uncond_tokens="psi-")


# ----------------------------------------------------------------------------- the denoiser
def _denoiser_call(pipe, b=2, seed=1):
    """Arguments of one batched CFG call [uncond; cond] of the tiny pipeline's denoiser (2b rows)."""
    g = torch.Generator().manual_seed(seed)
    model = resolve_denoiser(pipe)
    cfg = model.config
    if hasattr(cfg, "joint_attention_dim"):  # SD3
        kw = dict(hidden_states=torch.randn(2 * b, cfg.in_channels, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2 * b, 7, cfg.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(2 * b, cfg.pooled_projection_dim, generator=g),
                  timestep=torch.full((2 * b,), 500.0), return_dict=False)
    else:  # UNet: SDXL's added conditions are batched too (a dict the split must index)
        kw = dict(sample=torch.randn(2 * b, cfg.in_channels, 8, 8, generator=g),
                  timestep=torch.tensor(500.0),
                  encoder_hidden_states=torch.randn(2 * b, 5, cfg.cross_attention_dim, generator=g),
                  return_dict=False)
        if cfg.addition_embed_type == "text_time":
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2 * b, _text_embeds_dim(pipe), generator=g),
                                       "time_ids": torch.randn(2 * b, 6, generator=g)}  # (2b, 6) sizes
    return model, kw


def _text_embeds_dim(pipe):
    return pipe.text_encoder_2.config.projection_dim


@pytest.mark.parametrize("build", [tiny.tiny_sd3_pipeline, tiny.tiny_sd15_pipeline, tiny.tiny_sdxl_pipeline],
                         ids=["sd3", "sd15", "sdxl"])
def test_batched_cfg_rows_carry_the_chosen_tokens(build, tmp_path):
    pipe = build()
    pos, neg = _agsm_file(pipe, tmp_path / "t.safetensors")
    model, kw = _denoiser_call(pipe)
    b = kw.get("hidden_states", kw.get("sample")).shape[0] // 2
    with torch.no_grad():
        vanilla = model(**kw)[0]
        with softrepa.attach(pipe, pos):
            all_pos = model(**kw)[0]
        with softrepa.attach(pipe, neg):
            all_neg = model(**kw)[0]
        pipe._guidance_scale = 5.0  # as the pipeline's call sets it: CFG on, batch = [uncond; cond]
        for mode, uncond_rows in (("negative", all_neg), ("none", vanilla), ("positive", all_pos)):
            handle = softrepa.load_into(pipe, tmp_path / "t.safetensors", uncond_tokens=mode)
            out = model(**kw)[0]
            handle.remove()
            # the unconditional half as chosen, the conditional half always psi+
            torch.testing.assert_close(out[:b], uncond_rows[:b], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[b:], all_pos[b:], rtol=1e-5, atol=1e-5)
        pipe._guidance_scale = 1.0  # CFG off: every row conditional, every choice is psi+
        for mode in ("negative", "none"):
            with softrepa.load_into(pipe, tmp_path / "t.safetensors", uncond_tokens=mode):
                assert torch.equal(model(**kw)[0], all_pos)
    assert not torch.allclose(all_neg[:b], all_pos[:b])  # the comparison above could fail


def test_rows_named_by_the_caller_win_and_must_fit(tmp_path):
    pipe = tiny.tiny_sd3_pipeline()
    pos, neg = _agsm_file(pipe, tmp_path / "t.safetensors")
    model, kw = _denoiser_call(pipe, b=2)
    with torch.no_grad():
        with softrepa.attach(pipe, neg):
            all_neg = model(**kw)[0]
        with softrepa.attach(pipe, pos):
            all_pos = model(**kw)[0]
        handle = softrepa.attach(model, pos)  # a bare denoiser: only named rows are unconditional
        softrepa.set_uncond(handle, model, "negative", neg)
        assert torch.equal(model(**kw)[0], all_pos)
        mask = torch.tensor([False, True, False, True])
        with handle.uncond_rows(mask):
            out = model(**kw)[0]
        torch.testing.assert_close(out[mask], all_neg[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[~mask], all_pos[~mask], rtol=1e-5, atol=1e-5)
        with pytest.raises(SoftTokensError, match="uncond_rows names 3 rows for a call of 4"):
            with handle.uncond_rows(torch.ones(3, dtype=torch.bool)):
                model(**kw)
        with pytest.raises(UsageError, match="already set"):
            softrepa.set_uncond(handle, model, "none")
        handle.remove()


@pytest.mark.parametrize("mode", ["negative", "none"])
def test_detaching_still_restores_the_model_exactly(mode, tmp_path):
    pipe = tiny.tiny_qwenimage_pipeline()  # per-call CFG: the cache-context probe is installed too
    _agsm_file(pipe, tmp_path / "t.safetensors")
    model = resolve_denoiser(pipe)
    before = (dict(vars(model)).keys(), dict(model._forward_pre_hooks), dict(model._forward_hooks),
              {k: v.clone() for k, v in model.state_dict().items()})
    handle = softrepa.load_into(pipe, tmp_path / "t.safetensors", uncond_tokens=mode)
    assert "cache_context" in vars(model)
    handle.remove()
    after = (dict(vars(model)).keys(), dict(model._forward_pre_hooks), dict(model._forward_hooks),
             model.state_dict())
    assert after[0] == before[0] and after[1] == before[1] and after[2] == before[2]
    assert all(torch.equal(after[3][k], v) for k, v in before[3].items())


# ----------------------------------------------------------------------------- stock pipelines
def _images(pipe, **call):
    out = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0), **call)
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)  # Wan: video frames


def _sana():
    from softrepa.tiny_crossattn import tiny_sana_pipeline

    return tiny_sana_pipeline()


def _wan_a14b():
    from softrepa.tiny_crossattn import tiny_wan_pipeline

    return tiny_wan_pipeline(two_experts=True)


@pytest.mark.parametrize("build,call", [
    (tiny.tiny_sd3_pipeline, {"guidance_scale": 4.0}),                       # batched CFG
    (_sana, {"guidance_scale": 4.5, "use_resolution_binning": False}),      # batched CFG, cross-attention
    (tiny.tiny_qwenimage_pipeline, {"true_cfg_scale": 4.0, "negative_prompt": " "}),  # one call per branch
    (_wan_a14b, {"guidance_scale": 4.0, "guidance_scale_2": 3.0, "num_frames": 1}),  # per call, two experts
], ids=["sd3", "sana", "qwenimage", "wan-a14b"])
def test_the_stock_pipeline_samples_each_choice_deterministically(build, call, tmp_path):
    pipe = build()
    _agsm_file(pipe, tmp_path / "t.safetensors")
    out = {}
    for mode in ("positive", "negative", "none"):
        with softrepa.load_into(pipe, tmp_path / "t.safetensors", uncond_tokens=mode):
            out[mode] = _images(pipe, **call)
            assert torch.equal(_images(pipe, **call), out[mode])  # deterministic
    assert not torch.equal(out["negative"], out["positive"])
    assert not torch.equal(out["none"], out["positive"]) and not torch.equal(out["none"], out["negative"])
    vanilla = _images(pipe, **call)
    assert not torch.equal(out["none"], vanilla)  # the conditional branch still carries psi+


def test_a_family_whose_cfg_rows_are_unknown_is_refused(tmp_path, monkeypatch):
    pipe = tiny.tiny_sd3_pipeline()
    _agsm_file(pipe, tmp_path / "t.safetensors")
    family = softrepa.family_of(pipe)
    monkeypatch.setattr(type(family), "cfg_branches", "")
    with pytest.raises(UsageError, match="does not know where SD3 / SD3.5's pipeline puts its unconditional rows"):
        softrepa.load_into(pipe, tmp_path / "t.safetensors", uncond_tokens="negative")
    assert softrepa.attached_handle(pipe) is None


def test_edit_names_flowedit_rows_and_embedded_guidance_refuses(tmp_path):
    from softrepa.edit import edit_latents
    from softrepa.flowedit import FlowEditParams

    pipe = tiny.tiny_sd3_pipeline()
    _agsm_file(pipe, tmp_path / "t.safetensors")
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    params = FlowEditParams(steps=4, n_max=3, src_cfg=3.5, tar_cfg=9.0)
    out = {}
    for mode in ("positive", "negative", "none"):
        with softrepa.load_into(pipe, tmp_path / "t.safetensors", uncond_tokens=mode):
            out[mode] = edit_latents(pipe, z, ["a red circle"], ["a blue circle"], params)
            assert torch.equal(edit_latents(pipe, z, ["a red circle"], ["a blue circle"], params), out[mode])
    assert not torch.equal(out["negative"], out["positive"]) and not torch.equal(out["none"], out["positive"])

    flux = tiny.tiny_flux_pipeline(guidance_embeds=True)  # FLUX.1-dev: guidance is a model input
    _agsm_file(flux, tmp_path / "f.safetensors")
    with softrepa.load_into(flux, tmp_path / "f.safetensors", uncond_tokens="negative"):
        with pytest.raises(UsageError, match="embedded guidance, which has no unconditional branch"):
            edit_latents(flux, torch.randn(1, 16, 4, 4), ["a"], ["b"], FlowEditParams(steps=4, n_max=3))


# ----------------------------------------------------------------------------- the CLI, end to end
def test_agsm_train_info_and_generate_on_the_sd3_miniature(tmp_path, capsys):
    """`softrepa train --config toy_sd3 --objective agsm` writes one file with both sets, `info`
    names them, `generate --uncond-tokens negative` differs from the default; both deterministic."""
    import json

    import numpy as np
    from PIL import Image

    from softrepa.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for i, (name, rgb) in enumerate({"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30),
                                     "yellow": (230, 220, 30)}.items()):
        a = np.full((32, 32, 3), 255, np.uint8)
        a[6 + i:22 + i, 8:24] = rgb
        Image.fromarray(a).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {name} square\n")
    run = tmp_path / "run"
    assert main(["train", "--config", "toy_sd3", "--objective", "agsm", "--negatives.per_image", "0",
                 "--data", str(data), "--output_dir", str(run), "--batch_size", "4", "--max_steps", "2",
                 "--agsm.ema_decay", "0.5", "--agsm.gamma_neg", "1.0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(run / "tokens.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["objective"] == "agsm" and info["token_sets"] == ["positive", "negative"]
    images = {}
    for mode in ("positive", "negative", "positive", "negative"):
        out = tmp_path / f"gen_{mode}_{len(images)}"
        assert main(["generate", "--model", "@assets/toy_sd3", "--tokens", str(run), "--prompts",
                     "a red square left of a blue circle", "--seeds", "0", "--steps", "4", "--cfg", "3",
                     "--uncond-tokens", mode, "--out", str(out), "--no-progress"]) == 0
        row = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
        assert row["uncond_tokens"] == (None if mode == "positive" else mode)
        img = np.asarray(Image.open(out / row["file"]))
        if mode in images:
            assert np.array_equal(images[mode], img)  # deterministic
        images[mode] = img
    assert not np.array_equal(images["positive"], images["negative"])
    # a one-set file cannot give psi-: one line, exit 2, before the model loads
    softrepa.save_soft_tokens(softrepa.load_soft_tokens(run), tmp_path / "one.safetensors")
    assert main(["generate", "--model", "@assets/toy_sd3", "--tokens", str(tmp_path / "one.safetensors"),
                 "--prompts", "a red square", "--uncond-tokens", "negative", "--out", str(tmp_path / "x")]) == 2
    assert "needs a file with a 'negative' token set" in capsys.readouterr().err
