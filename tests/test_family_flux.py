"""FLUX.1 family (schnell- and dev-style tiny models): tokens on the dual-stream blocks with their
rotary positions, exact detach, the stock FluxPipeline, training through the Backbone."""

from __future__ import annotations

import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.family import family_of
from softrepa.tiny import tiny_flux_pipeline


@pytest.fixture(params=[False, True], ids=["schnell", "dev"])
def pipe(request):
    return tiny_flux_pipeline(guidance_embeds=request.param)


def _inputs(model, b=2, n_txt=5, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    inp = {"hidden_states": torch.randn(b, h * w, c.in_channels, generator=g),
           "encoder_hidden_states": torch.randn(b, n_txt, c.joint_attention_dim, generator=g),
           "pooled_projections": torch.randn(b, c.pooled_projection_dim, generator=g),
           "timestep": torch.tensor([0.31, 0.87])[:b], "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(n_txt, 3)}
    if c.guidance_embeds:
        inp["guidance"] = torch.full((b,), 3.5)
    return inp


def reference_forward(model, tokens, inp):
    """The transformer's forward written out, with the tokens as real text positions (id 0, as FLUX's
    text) prepended to the selected dual-stream blocks and dropped after each; no hooks."""
    lay = tokens.layout
    hs = model.x_embedder(inp["hidden_states"])
    t = inp["timestep"] * 1000
    temb = (model.time_text_embed(t, inp["pooled_projections"]) if "guidance" not in inp
            else model.time_text_embed(t, inp["guidance"] * 1000, inp["pooled_projections"]))
    ehs = model.context_embedder(inp["encoder_hidden_states"])
    ids = torch.cat([inp["txt_ids"], inp["img_ids"]])
    rotary = model.pos_embed(ids)
    toks = tokens(inp["timestep"] * 1000, hs.shape[0], projection=model.context_embedder)  # (B, S, m, D)
    m = lay.num_tokens
    rotary_tok = model.pos_embed(torch.cat([torch.zeros(m, 3), ids]))
    for k, block in enumerate(model.transformer_blocks):
        if k in lay.layers:
            s = lay.layers.index(k)
            ehs, hs = block(hidden_states=hs, encoder_hidden_states=torch.cat([toks[:, s], ehs], 1), temb=temb,
                            image_rotary_emb=rotary_tok)
            ehs = ehs[:, m:]
        else:
            ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb, image_rotary_emb=rotary)
    for block in model.single_transformer_blocks:
        ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb, image_rotary_emb=rotary)
    return model.proj_out(model.norm_out(hs, temb))


@pytest.mark.parametrize("layers", [(0,), (0, 1), (1,)])
def test_hooked_forward_equals_reference(pipe, layers):
    model = pipe.transformer
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(layers=layers), seed=0)
    with torch.no_grad():
        tokens.base.mul_(30)  # visible effect
        inp = _inputs(model)
        plain = model(**inp, return_dict=False)[0]
        ref = reference_forward(model, tokens, inp)
        with attach(pipe, tokens):
            got = model(**inp, return_dict=False)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (got - plain).abs().max() > 1e-4


def test_detach_is_bit_exact(pipe):
    model = pipe.transformer
    keys = list(model.state_dict())
    inp = _inputs(model)
    with torch.no_grad():
        before = model(**inp, return_dict=False)[0]
        handle = attach(pipe, SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0))
        handle.remove()
        after = model(**inp, return_dict=False)[0]
    assert torch.equal(before, after) and list(model.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_stock_pipeline_uses_the_tokens(pipe):
    kw = dict(height=32, width=32, num_inference_steps=2, output_type="np", max_sequence_length=16)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = pipe("a red circle", generator=gen(), **kw).images
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0)
    with torch.no_grad():
        tokens.base.mul_(50)
    with attach(pipe, tokens) as handle:
        with_tokens = pipe("a red circle", generator=gen(), **kw).images
        with handle.disabled():
            assert (pipe("a red circle", generator=gen(), **kw).images == plain).all()
    assert abs(with_tokens - plain).max() > 1e-4


def test_family_and_layout(pipe, tmp_path):
    fam = family_of(pipe)
    assert fam.name == "flux" and fam.text_length_option
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0)
    lay = tokens.layout
    assert (lay.family, lay.token_dim, lay.model_dim, lay.model_depth) == ("flux", 32, 32, 2)
    path = softrepa.save_soft_tokens(tokens, tmp_path / "t.safetensors")
    softrepa.load_into(pipe, path).remove()
    with pytest.raises(softrepa.SoftTokensError, match="layers"):
        SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=3))


def test_backbone_flow_target_and_denoise_shapes(pipe):
    bb = backbone_for(pipe, max_sequence_length=16)
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([250.0, 750.0])
    cond = bb.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        v = bb.denoise(bb.add_noise(x0, noise, t), t, cond)
    assert v.shape == x0.shape
    torch.testing.assert_close(bb.add_noise(x0, noise, torch.tensor([0.0, 1000.0])),
                               torch.stack([x0[0], noise[1]]))
    torch.testing.assert_close(bb.target(x0, noise, t), noise - x0)


def test_generate_compare_cli_on_a_saved_flux_folder(tmp_path):
    from softrepa.cli import main

    pipe = tiny_flux_pipeline(guidance_embeds=True)
    pipe.save_pretrained(tmp_path / "flux")
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0)
    with torch.no_grad():
        tokens.base.mul_(50)
    softrepa.save_soft_tokens(tokens, tmp_path / "t.safetensors")
    rc = main(["generate", "--model", str(tmp_path / "flux"), "--tokens", str(tmp_path / "t.safetensors"),
               "--prompts", "a red circle", "--seeds", "0", "--steps", "2", "--size", "32",
               "--max-sequence-length", "16", "--compare", "--no-progress", "--out", str(tmp_path / "gen")])
    assert rc == 0
    a, b = (tmp_path / "gen" / sub / "00000_s0.png" for sub in ("vanilla", "tokens"))
    assert a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes()
    assert (tmp_path / "gen" / "compare" / "00000.png").is_file()
