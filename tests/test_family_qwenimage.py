"""Qwen-Image family (tiny random QwenImagePipeline), what is specific to it: tokens on the dual-stream
blocks with a text-mask entry 1 and the rotary row of the first text position, one prompt broadcast
over the batch, the widths and presets, fixed-length padded prompts, the pipeline's latents and sigmas,
the 3-D VAE's FlowEdit source, the recipe. What every family does (detach, gradients, the stock
pipeline with true CFG, FlowEdit identities, the CLI) is in tests/test_conformance.py."""

from __future__ import annotations

import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for, encode_prompt
from softrepa.family import family_of
from softrepa.tiny import tiny_qwenimage_pipeline
from tests.conformance import assert_hooked_equals_reference


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
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(layers=layers, token_space=space), seed=0)
    assert_hooked_equals_reference(pipe, tokens, _inputs(pipe.transformer, padded=padded), reference_forward)


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


def test_presets_widths_and_bad_input(pipe):
    """Sampling and edit presets, true CFG's call arguments, the widths; a text width that differs from
    the tokens', a pipeline without its text encoder (the layout's family, file round trip and refusals
    in general: tests/test_conformance.py)."""
    fam = family_of(pipe)
    assert (fam.sampling.steps, fam.sampling.cfg) == (50, 4.0)
    assert (fam.edit.steps, fam.edit.src_cfg, fam.edit.choose(False), fam.edit.choose(True)) == \
        (50, 3.5, (37, 13.5), (35, 9.0))
    assert fam.guidance_kwargs(4.0) == {"true_cfg_scale": 4.0, "negative_prompt": " "}  # true CFG's second branch
    assert fam.guidance_kwargs(1.0) == {"true_cfg_scale": 1.0}  # no second branch: no negative prompt
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0)
    lay = tokens.layout
    assert (lay.family, lay.token_dim, lay.model_dim, lay.model_depth) == ("qwenimage", 32, 32, 3)
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


def test_backbone_latents_and_sigmas(pipe):
    """The packed latents of the factor-4 3-D VAE and the FlowEdit adapter's sigmas (noise, target and
    prediction: tests/test_conformance.py)."""
    bb = backbone_for(pipe, max_sequence_length=32)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = bb.encode_images(pixels, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert x0.shape == (2, 4, 8, 8)
    assert bb.decode_latents(x0).shape == (2, 3, 32, 32)
    # the FlowEdit adapter's sigmas are the pipeline's own (its grid, resolution shift, terminal shift)
    _, sigmas, _ = family_of(pipe).edit_model(bb, 3, (1, 4, 8, 8))
    pipe(["a red circle"], height=32, width=32, num_inference_steps=3, output_type="latent", true_cfg_scale=1.0)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=0)


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
