"""SANA family (tiny random SanaPipeline), what is specific to it: tokens prepended to the caption
context of the selected blocks with 0 in the additive mask bias (padding stays hidden), text-space
tokens through `caption_projection` + `caption_norm`, the pipeline call's own prompt conditioning (the
complex human instruction), the deterministic DC-AE latents, the model's `timestep_scale`, SANA-Sprint
refused, the presets and the recipe. What every family does is in tests/test_conformance.py."""

from __future__ import annotations

import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.family import family_of
from softrepa.tiny_crossattn import tiny_sana_pipeline
from tests.conformance import assert_hooked_equals_reference


@pytest.fixture(scope="module")
def pipe():
    p = tiny_sana_pipeline(num_layers=3)
    p.set_progress_bar_config(disable=True)
    return p


def _inputs(model, b=2, n_txt=6, h=4, w=6, seed=0):
    """Transformer inputs: an h x w latent, a padded text batch (sample 0: 4 prompt tokens + 2 padding)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    mask = torch.ones(b, n_txt, dtype=torch.long)
    mask[0, 4:] = 0
    return {"hidden_states": torch.randn(b, c.in_channels, h, w, generator=g),
            "encoder_hidden_states": torch.randn(b, n_txt, c.caption_channels, generator=g),
            "encoder_attention_mask": mask, "timestep": torch.tensor([310.0, 870.0])[:b]}


def reference_forward(model, tokens, inp):
    """SANA's forward written out, no hooks: each selected block reads [tokens, caption] as its
    cross-attention context, with bias 0 for the tokens in front of the caption's (1 - mask) * -10000."""
    lay = tokens.layout
    x = inp["hidden_states"]
    b, _, h, w = x.shape
    bias = ((1 - inp["encoder_attention_mask"].to(x.dtype)) * -10000.0).unsqueeze(1)  # (B, 1, n_txt)
    hs = model.patch_embed(x)  # (B, h*w, D)
    temb, embedded = model.time_embed(inp["timestep"], batch_size=b, hidden_dtype=hs.dtype)
    ctx = model.caption_norm(model.caption_projection(inp["encoder_hidden_states"]))  # (B, n_txt, D)
    toks = tokens(inp["timestep"], b, projection=torch.nn.Sequential(model.caption_projection, model.caption_norm))
    for k, block in enumerate(model.transformer_blocks):
        c, m = ctx, bias
        if k in lay.layers:
            i = lay.layers.index(k)
            c = torch.cat([toks[:, i], ctx], dim=1)  # (B, m + n_txt, D)
            m = torch.cat([bias.new_zeros(b, 1, lay.num_tokens), bias], dim=-1)
        hs = block(hs, None, c, m, temb, h, w)
    hs = model.proj_out(model.norm_out(hs, embedded, model.scale_shift_table))  # (B, h*w, C)
    return hs.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C, h, w) (patch 1)


@pytest.mark.parametrize("space", ["text", "block"])
def test_hooked_equals_the_written_out_forward(pipe, space):
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2, layers=(0, 2), token_space=space), seed=0)
    assert_hooked_equals_reference(pipe, tokens, _inputs(pipe.transformer), reference_forward)


def test_padding_stays_hidden_and_the_tokens_are_seen(pipe):
    """With tokens attached, what sits at a padded caption position changes nothing (the bias still
    covers it: the tokens' 0s were inserted in front, not over it), while the tokens change the output."""
    model = pipe.transformer
    inp = _inputs(model)
    other = dict(inp, encoder_hidden_states=inp["encoder_hidden_states"].clone())
    other["encoder_hidden_states"][0, 4:] = 50.0  # sample 0's padding
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0)
    with torch.no_grad():
        plain = model(**inp, return_dict=False)[0]
        with attach(pipe, tokens):
            a = model(**inp, return_dict=False)[0]
            b = model(**other, return_dict=False)[0]
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert (a - plain).abs().max() > 1e-4


def test_prompts_are_encoded_as_the_pipeline_call_encodes_them(pipe):
    """The backbone's conditioning is what the stock call hands the transformer (its default complex
    human instruction included), embeddings and mask; without the instruction it would differ."""
    seen = {}

    def grab(module, args, kwargs):
        seen["ctx"], seen["mask"] = kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"]

    h = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(prompt=["a red circle"], guidance_scale=1.0, num_inference_steps=1, height=32, width=32,
             max_sequence_length=16, use_resolution_binning=False, output_type="latent")
    finally:
        h.remove()
    cond = backbone_for(pipe, max_sequence_length=16).encode_prompts(["a red circle"])
    assert torch.equal(cond.embeds, seen["ctx"]) and torch.equal(cond.extra["mask"], seen["mask"])
    plain = pipe.encode_prompt(["a red circle"], do_classifier_free_guidance=False, max_sequence_length=16)[0]
    assert not torch.equal(plain, seen["ctx"])


def test_dc_ae_latents_are_deterministic_and_scaled(pipe):
    bb = backbone_for(pipe)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a = bb.encode_images(x, generator=torch.Generator().manual_seed(0))
    b = bb.encode_images(x, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    assert torch.equal(a, b)  # no posterior: the generator draws nothing
    raw = pipe.vae.encode(x).latent
    torch.testing.assert_close(a, raw * pipe.vae.config.scaling_factor)
    torch.testing.assert_close(bb.encode_source(x), a.float())
    assert bb.decode_latents(a).shape == (2, 3, 32, 32)


def test_time_buckets_follow_the_models_timestep_scale():
    """A model called with t x timestep_scale (as the pipeline calls it) gets the tokens of bucket(t)."""
    p = tiny_sana_pipeline()
    p.transformer.register_to_config(timestep_scale=0.5)
    tokens = SoftTokens.for_model(p, SoftTokensConfig(num_layers=2), seed=0)
    inp = _inputs(p.transformer)
    with torch.no_grad(), attach(p, tokens) as handle:
        p.transformer(**dict(inp, timestep=inp["timestep"] * 0.5), return_dict=False)
        got = handle.current
    want = tokens(inp["timestep"], 2, projection=family_of(p).projection(p.transformer))
    torch.testing.assert_close(got, want)


def test_sana_sprint_is_refused_by_name():
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                   cross_attention_dim=32, caption_channels=32, guidance_embeds=True)
    with pytest.raises(softrepa.SoftTokensError, match="SANA-Sprint"):
        attach(model, SoftTokens.for_model(model, SoftTokensConfig(num_layers=1), seed=0))


def test_family_facts_and_recipe(pipe):
    fam = family_of(pipe)
    assert (fam.name, fam.sampling.steps, fam.sampling.cfg, fam.text_length) == ("sana", 20, 4.5, 300)
    assert fam.guidance_kwargs(4.5) == {"guidance_scale": 4.5, "use_resolution_binning": False}
    info = softrepa.family.describe_model(pipe)
    assert (info.model_dim, info.text_dim, info.depth) == (32, 32, 3)
    from softrepa.config import load_config

    cfg = load_config("sana")
    assert (cfg.max_sequence_length, cfg.resolution, cfg.tokens.num_layers) == (fam.text_length, 1024, 5)
    from diffusers import SanaTransformer2DModel

    with torch.device("meta"):  # SANA 1600M's widths (diffusers' defaults), no weights
        tokens = SoftTokens.for_model(SanaTransformer2DModel(), cfg.tokens)
    lay = tokens.layout
    assert (lay.family, lay.token_dim, lay.model_dim, lay.model_depth) == ("sana", 2304, 2240, 20)
    assert sum(p.numel() for p in tokens.parameters()) == 5 * 4 * 2304 + 100 * 5 * 2240
