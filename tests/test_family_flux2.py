"""FLUX.2 family (tiny `Flux2Pipeline`, with and without the guidance embedding), what is specific to it:
tokens on the dual-stream blocks at the text positions just before the prompt, the widths, the
pipeline's latents (patches, batch norm) and denoising step, FlowEdit guidance (embedding or true CFG)
and sigmas. What every family does (detach, gradients, the stock pipeline, FlowEdit identities, the
CLI) is in tests/test_conformance.py; FLUX.2 [klein] in tests/test_family_flux2_klein.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.family import family_of
from softrepa.flowedit import FlowEditParams
from softrepa.tiny import tiny_flux2_pipeline
from tests.conformance import assert_hooked_equals_reference, family_params


@pytest.fixture(params=[p for p in family_params("flux2") if "klein" not in p.id])
def pipe(request):
    return request.param.build()


def _inputs(pipe, b=2, n_txt=5, h=4, w=4, seed=0):
    """Transformer inputs as Flux2Pipeline builds them: ids (0, row, col, 0) and (0, 0, 0, l)."""
    g = torch.Generator().manual_seed(seed)
    c = pipe.transformer.config
    return {"hidden_states": torch.randn(b, h * w, c.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(b, n_txt, c.joint_attention_dim, generator=g),
            "timestep": torch.tensor([0.31, 0.87])[:b], "guidance": torch.full((b,), 4.0),
            "img_ids": pipe._prepare_latent_ids(torch.zeros(b, 1, h, w)),
            "txt_ids": pipe._prepare_text_ids(torch.zeros(b, n_txt, 1))}


def reference_forward(model, tokens, inp):
    """`Flux2Transformer2DModel.forward` written out without hooks, the m tokens being real text positions:
    ids (0, 0, 0, -m .. -1), i.e. m more text tokens before the prompt's (0, 0, 0, 0 ..), prepended to the
    selected dual-stream blocks and dropped after each."""
    lay, m = tokens.layout, tokens.layout.num_tokens
    t = inp["timestep"] * 1000
    guidance = inp["guidance"] * 1000 if model.config.guidance_embeds else None
    temb = model.time_guidance_embed(t, guidance)
    mod_img, mod_txt = model.double_stream_modulation_img(temb), model.double_stream_modulation_txt(temb)
    mod_single = model.single_stream_modulation(temb)
    hs = model.x_embedder(inp["hidden_states"])  # (B, n_img, D)
    ehs = model.context_embedder(inp["encoder_hidden_states"])  # (B, n_txt, D)
    txt_ids, img_ids = inp["txt_ids"][0], inp["img_ids"][0]
    tok_ids = torch.zeros(m, 4)
    tok_ids[:, 3] = torch.arange(-m, 0)
    rotary = model.pos_embed(torch.cat([txt_ids, img_ids]))
    rotary_tok = model.pos_embed(torch.cat([tok_ids, txt_ids, img_ids]))  # tokens as text positions
    toks = tokens(t, hs.shape[0], projection=model.context_embedder)  # (B, S, m, D)
    for k, block in enumerate(model.transformer_blocks):
        if k in lay.layers:
            ehs, hs = block(hidden_states=hs, encoder_hidden_states=torch.cat([toks[:, lay.layers.index(k)], ehs], 1),
                            temb_mod_img=mod_img, temb_mod_txt=mod_txt, image_rotary_emb=rotary_tok)
            ehs = ehs[:, m:]
        else:
            ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb_mod_img=mod_img,
                            temb_mod_txt=mod_txt, image_rotary_emb=rotary)
    n_txt = ehs.shape[1]
    hs = torch.cat([ehs, hs], dim=1)
    for block in model.single_transformer_blocks:
        hs = block(hidden_states=hs, encoder_hidden_states=None, temb_mod=mod_single, image_rotary_emb=rotary)
    return model.proj_out(model.norm_out(hs[:, n_txt:], temb))


@pytest.mark.parametrize("layers", [(0,), (0, 1), (1,)])
@pytest.mark.parametrize("space", ["text", "block"])
def test_hooked_forward_equals_reference(pipe, layers, space):
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(layers=layers, token_space=space), seed=0)
    assert_hooked_equals_reference(pipe, tokens, _inputs(pipe), reference_forward, atol=1e-5)


def test_token_positions_are_text_positions_before_the_prompt():
    """The tokens' ids continue the text's sequence axis backwards from its first position."""
    from softrepa.families.flux2 import token_ids

    txt = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]])
    assert token_ids(txt, 2).tolist() == [[0, 0, 0, -2], [0, 0, 0, -1]]
    assert token_ids(txt[None] + torch.tensor([3, 0, 0, 5]), 1).tolist() == [[3, 0, 0, 4]]  # (B, n, 4) ids


def test_widths_and_flux1_tokens_refused():
    """Text width 48 (three stacked hidden states of 16); FLUX.1 tokens do not attach to FLUX.2, though
    the blocks look alike (the layout's family, file round trip, refusals in general:
    tests/test_conformance.py)."""
    from softrepa.tiny import tiny_flux_pipeline

    pipe = tiny_flux2_pipeline()
    lay = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0).layout
    assert (lay.family, lay.token_dim, lay.model_dim, lay.model_depth) == ("flux2", 48, 32, 2)
    flux1 = SoftTokens.for_model(tiny_flux_pipeline(), SoftTokensConfig(num_layers=2), seed=0)
    with pytest.raises(softrepa.SoftTokensError, match="family: tokens are for 'flux', the model is 'flux2'"):
        attach(pipe, flux1)


def test_backbone_latents_are_the_pipelines(pipe):
    """The model latent is the pipeline's: 2 x 2 patches, batch-normed; decode inverts the mapping (noise,
    target and prediction shapes: tests/test_conformance.py)."""
    bb = backbone_for(pipe, max_sequence_length=8)
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mode = pipe.vae.encode(pixels).latent_dist.mode()  # (1, 4, 8, 8)
        ours = bb.latents_from_vae(mode)
        theirs = pipe._encode_vae_image(pixels, generator=None)  # the pipeline's reference-image path
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        from softrepa.edit import encode_source

        torch.testing.assert_close(encode_source(bb, pixels), theirs, rtol=0, atol=0)  # FlowEdit's source
        torch.testing.assert_close(bb.decode_latents(ours), pipe.vae.decode(mode).sample.clamp(-1, 1),
                                   rtol=1e-5, atol=1e-5)


def test_backbone_denoise_equals_the_pipeline_step():
    """One pipeline step (packing, ids, t / 1000, guidance) == the backbone's velocity, unpacked."""
    pipe = tiny_flux2_pipeline()
    bb = backbone_for(pipe, max_sequence_length=8)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda mod, args, kw, out: seen.append((kw, out[0])),
                                                  with_kwargs=True)
    try:
        pipe(prompt="a red circle", height=16, width=16, num_inference_steps=1, guidance_scale=4.0,
             output_type="latent", max_sequence_length=8, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    kw, out = seen[0]
    x = kw["hidden_states"].transpose(1, 2).reshape(1, 16, 4, 4)  # unpacked (1, 4C, h, w)
    with torch.no_grad():
        v = bb.denoise(x, kw["timestep"] * 1000, bb.encode_prompts(["a red circle"]))
    torch.testing.assert_close(v, out.transpose(1, 2).reshape(1, 16, 4, 4), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- FlowEdit
def _source(pipe, w=32, h=24):
    from softrepa.edit import encode_source, image_to_pixels

    img = Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8))
    return img, encode_source(backbone_for(pipe), image_to_pixels(img, (h, w))).detach()


def test_flowedit_target_guidance_enters_with_or_without_an_embedding(pipe):
    """The source latent is the patched one; the same prompt with another target guidance edits, through
    the embedding (dev) or true CFG (no embedding). (Same prompt and guidance: tests/test_conformance.py.)"""
    from softrepa.edit import edit_latents

    _, z = _source(pipe)
    assert z.shape == (1, 16, 6, 8)  # 2 x 2 patches of the factor-2 latent
    other = edit_latents(pipe, z, ["a red circle"], ["a red circle"],
                         FlowEditParams(steps=4, n_max=3, src_cfg=2.0, tar_cfg=5.0), max_sequence_length=8)
    assert (other - z).abs().max() > 1e-3


def test_flowedit_guidance_follows_the_pipeline_without_an_embedding():
    """No guidance embedding: true CFG (an empty-prompt branch, 4 rows per joint call), as a base model's
    Flux2KleinPipeline samples; a pipeline marked step-distilled (`is_distilled`) gets no guidance at all."""
    from softrepa.edit import edit_latents
    from softrepa.flowedit import guidance_mode

    pipe = tiny_flux2_pipeline(guidance_embeds=False)
    bb = backbone_for(pipe)
    assert guidance_mode(family_of(pipe).edit_model(bb, 4, (1, 16, 6, 8))[0]) == "cfg"
    _, z = _source(pipe)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        edit_latents(pipe, z, ["a red circle"], ["a blue square"], FlowEditParams(steps=4, n_max=2),
                     max_sequence_length=8)
    finally:
        hook.remove()
    assert seen == [4, 4]
    pipe.register_to_config(is_distilled=True)
    assert guidance_mode(family_of(pipe).edit_model(bb, 4, (1, 16, 6, 8))[0]) == "embedded"


def test_flowedit_guidance_per_branch_and_the_pipelines_sigmas():
    """One conditional call per step on (source, target) rows with guidance (1.5, 5.5); the sigma grid
    is Flux2Pipeline's (linspace, shifted by compute_empirical_mu); presets carried over from FLUX.1-dev."""
    from softrepa.edit import edit_latents

    pipe = tiny_flux2_pipeline()
    _, z = _source(pipe)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw["hidden_states"].shape[0], kw["guidance"].tolist())), with_kwargs=True)
    try:
        edit_latents(pipe, z, ["a red circle"], ["a blue square"],
                     FlowEditParams(steps=4, n_max=2, src_cfg=1.5, tar_cfg=5.5), max_sequence_length=8)
    finally:
        hook.remove()
    assert seen == [(2, [1.5, 5.5])] * 2
    _, sigmas, _ = family_of(pipe).edit_model(backbone_for(pipe), 5, tuple(z.shape))
    pipe(prompt="a red circle", height=24, width=32, num_inference_steps=5, output_type="latent",
         max_sequence_length=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float().cpu(), rtol=0, atol=0)
    p = FlowEditParams.preset(family_of(pipe), with_tokens=True)
    assert (p.steps, p.n_max, p.src_cfg, p.tar_cfg) == (28, 24, 1.5, 5.5)


def test_a_pipeline_without_its_text_encoder_is_a_one_line_error():
    pipe = tiny_flux2_pipeline()
    pipe.text_encoder = None
    with pytest.raises(softrepa.SoftrepaError, match="text_encoder"):
        backbone_for(pipe, max_sequence_length=8).encode_prompts(["a red circle"])
