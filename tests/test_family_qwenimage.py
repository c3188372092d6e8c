"""Qwen-Image family (tiny random QwenImagePipeline): tokens on the dual-stream blocks with a text-mask
entry 1 and the rotary row of the first text position, exact detach, the stock pipeline with true CFG,
training through the Backbone and the CLI, FlowEdit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for, encode_prompt
from softrepa.family import family_of
from softrepa.tiny import tiny_qwenimage_pipeline, tiny_sd3_pipeline
from tests.conftest import write_square_images


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwenimage_pipeline(num_layers=3)


def _big(tokens: SoftTokens, factor: float = 30.0) -> SoftTokens:
    with torch.no_grad():
        for p in tokens.parameters():
            p.mul_(factor)  # a visible effect
    return tokens


def _inputs(model, b=2, n_txt=6, h=4, w=6, padded=True, seed=0):
    """Transformer inputs: packed latents of an h x w patch grid, text of n_txt positions whose mask
    (padded=True) gives the two samples different prompt lengths, as a padded batch."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    mask = None
    if padded:
        mask = torch.ones(b, n_txt, dtype=torch.long)
        mask[0, 4:] = 0  # sample 0: 4 prompt tokens + 2 padding
    return {"hidden_states": torch.randn(b, h * w, c.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(b, n_txt, c.joint_attention_dim, generator=g),
            "encoder_hidden_states_mask": mask, "timestep": torch.tensor([0.31, 0.87])[:b],
            "img_shapes": [[(1, h, w)]] * b}


def reference_forward(model, tokens, inp):
    """The transformer's forward written out, no hooks: at each selected block the tokens are real text
    positions in front of the prompt — mask 1, rotary row of MSRoPE's first text position (the
    diagonal p0 = max(h/2, w/2)) — and are dropped after the block."""
    lay = tokens.layout
    m = lay.num_tokens
    hs = model.img_in(inp["hidden_states"])  # (B, n_img, D)
    b = hs.shape[0]
    temb = model.time_text_embed(inp["timestep"], hs)
    ehs = model.txt_in(model.txt_norm(inp["encoder_hidden_states"]))  # (B, n_txt, D)
    mask = inp["encoder_hidden_states_mask"]
    mask = None if mask is None else mask.bool()
    img_rot, txt_rot = model.pos_embed(inp["img_shapes"], max_txt_seq_len=ehs.shape[1], device=hs.device)
    _, h, w = inp["img_shapes"][0][0]
    first = model.pos_embed.pos_freqs[max(h // 2, w // 2)].to(txt_rot.device)  # (d/2,) complex: text position 0
    assert torch.equal(first, txt_rot[0])
    rot_tok = (img_rot, torch.cat([first.expand(m, -1), txt_rot]))  # (m + n_txt, d/2)
    mask_tok = None if mask is None else torch.cat([mask.new_ones(b, m), mask], dim=1)  # (B, m + n_txt): tokens 1
    # text-space tokens enter as the prompt does (txt_norm, txt_in); block-space ones at the block width
    projection = (lambda s: model.txt_in(model.txt_norm(s))) if lay.token_space == "text" else None
    toks = tokens(inp["timestep"] * 1000, b, projection=projection)  # (B, S, m, D)
    for k, block in enumerate(model.transformer_blocks):
        if k in lay.layers:
            s = lay.layers.index(k)
            ehs, hs = block(hidden_states=hs, encoder_hidden_states=torch.cat([toks[:, s], ehs], 1),
                            encoder_hidden_states_mask=mask_tok, temb=temb, image_rotary_emb=rot_tok)
            ehs = ehs[:, m:]
        else:
            ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, encoder_hidden_states_mask=mask,
                            temb=temb, image_rotary_emb=(img_rot, txt_rot))
    return model.proj_out(model.norm_out(hs, temb))


@pytest.mark.parametrize("padded", [True, False], ids=["padded-mask", "no-mask"])
@pytest.mark.parametrize("layers", [(0,), (0, 2), (1,)])
@pytest.mark.parametrize("space", ["text", "block"])
def test_hooked_forward_equals_reference(pipe, layers, padded, space):
    model = pipe.transformer
    tokens = _big(SoftTokens.for_model(pipe, SoftTokensConfig(layers=layers, token_space=space), seed=0))
    inp = _inputs(model, padded=padded)
    with torch.no_grad():
        plain = model(**inp, return_dict=False)[0]
        ref = reference_forward(model, tokens, inp)
        with attach(pipe, tokens):
            got = model(**inp, return_dict=False)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (got - plain).abs().max() > 1e-4


def test_chosen_rotary_row_is_a_text_position_never_an_image_one(pipe):
    """MSRoPE facts the choice rests on: text rows continue the diagonal after the image's extent,
    and the first text row differs from every image row (also at the smallest grids)."""
    rope = pipe.transformer.pos_embed
    for h, w in [(2, 2), (4, 6), (8, 8)]:
        img, txt = rope([[(1, h, w)]], max_txt_seq_len=5, device=torch.device("cpu"))
        p0 = max(h // 2, w // 2)
        assert torch.equal(txt, rope.pos_freqs[p0:p0 + 5])
        assert not (img == txt[:1]).all(dim=1).any()


def test_batch_of_one_prompt_broadcast_matches_repeated_prompt(pipe):
    """The stock pipeline passes one negative prompt for several latents; with tokens the hook
    broadcasts the text like the model does."""
    model = pipe.transformer
    tokens = _big(SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0))
    inp = _inputs(model, padded=False)
    one = dict(inp, encoder_hidden_states=inp["encoder_hidden_states"][:1])
    rep = dict(inp, encoder_hidden_states=inp["encoder_hidden_states"][:1].expand(2, -1, -1))
    with torch.no_grad(), attach(pipe, tokens):
        a = model(**one, return_dict=False)[0]
        b = model(**rep, return_dict=False)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_detach_is_bit_exact_and_leaves_nothing(pipe):
    model = pipe.transformer
    inp = _inputs(model)
    before = model(**inp, return_dict=False)[0]
    keys = list(model.state_dict())
    procs = {k: (type(v), id(v)) for k, v in model.attn_processors.items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    for _ in range(2):
        handle = attach(pipe, _big(SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=3), seed=0)))
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) > hooks
        model(**inp, return_dict=False)
        handle.remove()
    after = model(**inp, return_dict=False)[0]
    assert torch.equal(before, after) and list(model.state_dict()) == keys
    assert {k: (type(v), id(v)) for k, v in model.attn_processors.items()} == procs
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks == 0
    assert softrepa.attached_handle(pipe) is None


def test_gradients_reach_only_tokens_with_and_without_checkpointing(pipe):
    model = pipe.transformer
    model.requires_grad_(False)
    tokens = _big(SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0), 3.0)
    inp = _inputs(model)
    grads = []
    try:
        for ckpt in (False, True):
            if ckpt:  # blocks then get their arguments by position: the hooks must find them there too
                model.enable_gradient_checkpointing()
                model.train()
            tokens.zero_grad(set_to_none=True)
            with attach(pipe, tokens):
                model(**inp, return_dict=False)[0].square().mean().backward()
            assert all(p.grad is None for p in model.parameters())
            assert tokens.base.grad.abs().sum() > 0
            touched = (tokens.time.grad.abs().sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
            assert touched == [31, 87]  # t / 1000 from the pipeline, rescaled onto the buckets
            grads.append((tokens.base.grad.clone(), tokens.time.grad.clone()))
    finally:
        model.disable_gradient_checkpointing()
        model.eval()
        model.requires_grad_(True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_stock_pipeline_with_true_cfg_uses_the_tokens_and_disabled_is_vanilla(pipe):
    prompts = ["a red circle", "a small blue square on the left"]  # different lengths: a padded batch
    kw = dict(height=32, width=32, num_inference_steps=2, output_type="np", max_sequence_length=64,
              **family_of(pipe).guidance_kwargs(4.0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    plain = pipe(prompts, generator=gens(), **kw).images
    tokens = _big(SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0), 50.0)
    with attach(pipe, tokens) as handle:
        with_tokens = pipe(prompts, generator=gens(), **kw).images
        with handle.disabled():
            vanilla = pipe(prompts, generator=gens(), **kw).images
    assert np.array_equal(vanilla, plain)
    assert abs(with_tokens - plain).max() > 1e-4
    assert kw["true_cfg_scale"] == 4.0 and kw["negative_prompt"] == " "


def test_family_layout_and_bad_input(pipe, tmp_path):
    fam = family_of(pipe)
    assert fam.name == "qwenimage" and fam.text_length_option
    assert (fam.sampling.steps, fam.sampling.cfg) == (50, 4.0)
    assert (fam.edit.steps, fam.edit.src_cfg, fam.edit.choose(False), fam.edit.choose(True)) == \
        (50, 3.5, (37, 13.5), (35, 9.0))
    assert fam.guidance_kwargs(1.0) == {"true_cfg_scale": 1.0}  # no second branch: no negative prompt
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0)
    lay = tokens.layout
    assert (lay.family, lay.token_dim, lay.model_dim, lay.model_depth) == ("qwenimage", 32, 32, 3)
    path = softrepa.save_soft_tokens(tokens, tmp_path / "t.safetensors")
    softrepa.load_into(pipe, path).remove()
    with pytest.raises(softrepa.SoftTokensError, match="layers"):
        SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=4))
    with pytest.raises(softrepa.SoftTokensError, match="family: tokens are for 'sd3'"):
        attach(pipe, SoftTokens.for_model(tiny_sd3_pipeline(num_layers=2), SoftTokensConfig(num_layers=1)))
    wide = tiny_qwenimage_pipeline(num_layers=3)
    wide.transformer.register_to_config(joint_attention_dim=64)  # as if the text width differed
    with pytest.raises(softrepa.SoftTokensError, match="token_dim.*joint_attention_dim"):
        attach(wide, tokens)
    no_text = tiny_qwenimage_pipeline(num_layers=1)
    no_text.text_encoder = None
    with pytest.raises(softrepa.SoftrepaError, match="no text_encoder"):
        backbone_for(no_text).encode_prompts(["a red circle"])


def test_backbone_fixed_padding_changes_no_prediction(pipe):
    """Prompts padded to max_sequence_length (mask 0) predict as the stock, unpadded encoding does, and
    a sample's prediction does not depend on the other prompts of its batch."""
    bb = backbone_for(pipe, max_sequence_length=48)
    tokens = _big(SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0))
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad(), attach(pipe, tokens):
        short = bb.encode_prompts(["a red circle"])
        both = bb.encode_prompts(["a red circle", "a much longer prompt about a blue square"])
        assert short.embeds.shape == (1, 48, 32) and both.embeds.shape == (2, 48, 32)
        assert short.extra["mask"].shape == (1, 48) and both.extra["mask"].shape == (2, 48)
        assert short.extra["mask"].sum() < both.extra["mask"][1].sum()
        alone = bb.denoise(x0[:1], t[:1], short)
        in_batch = bb.denoise(x0, t, both)[:1]
        stock, _ = encode_prompt(pipe, ["a red circle"], max_sequence_length=48)  # (1, n, D), mask None
        unpadded = bb.denoise(x0[:1], t[:1], softrepa.backbone.TextCond(stock))
    torch.testing.assert_close(alone, in_batch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, unpadded, rtol=1e-5, atol=1e-6)


def test_backbone_flow_target_latents_and_sigmas(pipe):
    bb = backbone_for(pipe, max_sequence_length=32)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = bb.encode_images(pixels, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert x0.shape == (2, 4, 8, 8)
    assert bb.decode_latents(x0).shape == (2, 3, 32, 32)
    noise = torch.randn_like(x0)
    t = torch.tensor([250.0, 750.0])
    cond = bb.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        v = bb.denoise(bb.add_noise(x0, noise, t), t, cond)
    assert v.shape == x0.shape
    torch.testing.assert_close(bb.add_noise(x0, noise, torch.tensor([0.0, 1000.0])), torch.stack([x0[0], noise[1]]))
    torch.testing.assert_close(bb.target(x0, noise, t), noise - x0)
    # the FlowEdit adapter's sigmas are the pipeline's own (its grid, resolution shift, terminal shift)
    _, sigmas, _ = family_of(pipe).edit_model(bb, 3, (1, 4, 8, 8))
    pipe(["a red circle"], height=32, width=32, num_inference_steps=3, output_type="latent", true_cfg_scale=1.0)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=0)


@pytest.mark.parametrize("with_tokens", [False, True])
def test_flowedit_with_the_same_prompt_returns_the_source_exactly(pipe, with_tokens):
    from softrepa.edit import edit_latents
    from softrepa.flowedit import FlowEditParams

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # the same prompt and the same CFG on both branches: the velocity difference is exactly zero
    params = FlowEditParams.preset(family_of(pipe), with_tokens, steps=6, n_max=5)
    params.tar_cfg = params.src_cfg
    handle = attach(pipe, _big(SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0))) \
        if with_tokens else None
    try:
        same = edit_latents(pipe, z, ["a red circle"], ["a red circle"], params, max_sequence_length=32)
        other = edit_latents(pipe, z, ["a red circle"], ["a blue square"], params, max_sequence_length=32)
    finally:
        if handle is not None:
            handle.remove()
    assert torch.equal(same, z)
    assert (other - z).abs().max() > 1e-4


def test_flowedit_on_an_image_through_the_backbone(pipe):
    """Image -> deterministic source latent -> edit -> image (the backbone's `encode_source`, since the
    3-D VAE takes (B, 3, 1, H, W) clips)."""
    from softrepa.edit import edit_latents
    from softrepa.flowedit import FlowEditParams

    bb = backbone_for(pipe, max_sequence_length=32)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = bb.encode_source(pixels)
    assert z.dtype == torch.float32 and z.shape == (1, 4, 8, 8) and torch.equal(z, bb.encode_source(pixels))
    params = FlowEditParams.preset(family_of(pipe), False, steps=4, n_max=3)
    edited = edit_latents(pipe, z, ["a red circle"], ["a blue circle"], params, max_sequence_length=32)
    image = bb.decode_latents(edited)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwenimage")
    tiny_qwenimage_pipeline(num_layers=2).save_pretrained(root / "qwen")
    write_square_images(root / "data")
    return root


def test_train_cli_one_step_from_a_saved_folder(saved, tmp_path):
    from softrepa.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--model", str(saved / "qwen"), "--data", str(saved / "data"), "--output_dir", str(out),
               "--resolution", "32", "--batch_size", "3", "--max_steps", "1", "--num_workers", "0",
               "--max_sequence_length", "32", "--tokens.num_layers", "2", "--checkpoint_every", "1",
               "--log_every", "1", "--validation.every", "0", "--loss.tau", "2.0", "--lr", "0.05"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    tokens = softrepa.load_soft_tokens(out / "tokens.safetensors")
    assert tokens.layout.family == "qwenimage" and tokens.layout.layers == (0, 1)
    fresh = SoftTokens.for_model(tiny_qwenimage_pipeline(num_layers=2), SoftTokensConfig(num_layers=2), seed=0)
    assert tokens.base.shape == fresh.base.shape


def test_generate_compare_cli_on_a_saved_folder(saved, tmp_path):
    from softrepa.cli import main
    from softrepa.pipeline import load_pipeline

    pipe = load_pipeline(str(saved / "qwen"))
    tokens = _big(SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0), 50.0)
    softrepa.save_soft_tokens(tokens, tmp_path / "t.safetensors")
    rc = main(["generate", "--model", str(saved / "qwen"), "--tokens", str(tmp_path / "t.safetensors"),
               "--prompts", "a red circle", "--seeds", "0", "--steps", "2", "--size", "32",
               "--max-sequence-length", "32", "--compare", "--no-progress", "--out", str(tmp_path / "gen")])
    assert rc == 0
    a, b = (tmp_path / "gen" / sub / "00000_s0.png" for sub in ("vanilla", "tokens"))
    assert a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes()
    assert (tmp_path / "gen" / "compare" / "00000.png").is_file()
    # the vanilla half is the stock pipeline with true CFG 4 (the family default) and the same seed
    row = json.loads((tmp_path / "gen" / "vanilla" / "metadata.jsonl").read_text().splitlines()[0])
    assert (row["cfg"], row["steps"], row["family"]) == (4.0, 2, "qwenimage")
    ref = pipe("a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=32,
               generator=torch.Generator().manual_seed(0), **family_of(pipe).guidance_kwargs(4.0)).images[0]
    assert np.array_equal(np.asarray(Image.open(a).convert("RGB")), np.asarray(ref))


def test_recipe_loads_and_fits_the_real_widths():
    """The packaged recipe is a valid config, and its tokens fit Qwen-Image's real widths (model built on
    the meta device: no weights)."""
    from diffusers import QwenImageTransformer2DModel

    from softrepa.config import load_config

    cfg = load_config("qwenimage")
    assert (cfg.model, cfg.max_sequence_length, cfg.tokens.num_layers, cfg.loss.tau_schedule) == \
        ("Qwen/Qwen-Image", 128, 5, "calibrated")
    with torch.device("meta"):
        real = QwenImageTransformer2DModel(num_layers=60, num_attention_heads=24, attention_head_dim=128,
                                           joint_attention_dim=3584)
        tokens = SoftTokens.for_model(real, cfg.tokens)
    lay = tokens.layout
    assert (lay.family, lay.token_dim, lay.model_dim, lay.model_depth, lay.layers) == \
        ("qwenimage", 3584, 3072, 60, (0, 1, 2, 3, 4))
    assert sum(p.numel() for p in tokens.parameters()) == 5 * 4 * 3584 + 100 * 5 * 3072


def test_edit_cli_with_the_same_prompt_and_cfg_returns_the_decoded_source(saved, tmp_path):
    """`softrepa edit` on a saved Qwen-Image folder (the backbone's encode_source for the 3-D VAE): the
    same prompt and CFG on both branches gives exactly the n_max = 0 result, decode(encode(image))."""
    from softrepa.cli import main

    common = ["edit", "--model", str(saved / "qwen"), "--image", str(saved / "data" / "0.png"),
              "--source-prompt", "a red square", "--target-prompt", "a red square", "--steps", "4",
              "--source-cfg", "3.5", "--target-cfg", "3.5", "--size", "32", "--max-sequence-length", "32",
              "--no-progress"]
    assert main([*common, "--n-max", "3", "--out", str(tmp_path / "same")]) == 0
    assert main([*common, "--n-max", "0", "--out", str(tmp_path / "none")]) == 0
    same, none = (np.asarray(Image.open(tmp_path / sub / "0.png").convert("RGB")) for sub in ("same", "none"))
    assert np.array_equal(same, none)
    other = [("a blue square" if a == "a red square" and common[i - 1] == "--target-prompt" else a)
             for i, a in enumerate(common)]
    assert main([*other, "--n-max", "3", "--out", str(tmp_path / "edit")]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "edit" / "0.png").convert("RGB")), none)
