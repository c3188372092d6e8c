"""FLUX.1 family (schnell- and dev-style tiny models), what is specific to it: tokens on the dual-stream
blocks with their rotary positions, the widths, FlowEdit through the guidance embedding (one conditional
call per branch, the pipeline's sigmas), true CFG on a guidance-distilled model. What every family does
(detach, gradients, the stock pipeline, FlowEdit identities, the CLI) is in tests/test_conformance.py."""

from __future__ import annotations

import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.family import family_of
from softrepa.tiny import tiny_flux_pipeline
from tests.conformance import assert_hooked_equals_reference, family_params


@pytest.fixture(params=family_params("flux"))
def pipe(request):
    return request.param.build()


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
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(layers=layers), seed=0)
    assert_hooked_equals_reference(pipe, tokens, _inputs(pipe.transformer), reference_forward)


def test_widths():
    """(The layout's family and widths, file round trip and refusals: tests/test_conformance.py.)"""
    lay = SoftTokens.for_model(tiny_flux_pipeline(), SoftTokensConfig(num_layers=2), seed=0).layout
    assert (lay.family, lay.token_dim, lay.model_dim, lay.model_depth) == ("flux", 32, 32, 2)


# ----------------------------------------------------------------------------- FlowEdit (guidance embedding)
def _edit_inputs(pipe, w=32, h=24):
    from PIL import Image
    import numpy as np

    from softrepa.edit import encode_source, image_to_pixels

    img = Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8))
    return img, encode_source(backbone_for(pipe), image_to_pixels(img, (h, w))).detach()


def test_flowedit_target_guidance_enters_only_through_the_embedding(pipe):
    """Same prompt, other target guidance: dev-style the guidance embedding makes it an edit; schnell-style
    (no guidance input) both branches are plain conditional velocities, as the official FlowEditFLUX, and
    the source comes back exactly. (Same prompt and guidance: tests/test_conformance.py.)"""
    from softrepa.edit import edit_latents
    from softrepa.flowedit import FlowEditParams

    _, z = _edit_inputs(pipe)
    other = edit_latents(pipe, z, ["a red circle"], ["a red circle"],
                         FlowEditParams(steps=4, n_max=3, src_cfg=2.0, tar_cfg=5.0), max_sequence_length=8)
    if pipe.transformer.config.guidance_embeds:
        assert (other - z).abs().max() > 1e-3
    else:
        assert torch.equal(other, z)


def test_flowedit_makes_one_conditional_call_per_branch_with_its_guidance(pipe):
    """No unconditional rows: each step calls the model once on (source, target) conditional rows,
    the guidance embedding carrying 1.5 on the source rows and 5.5 on the target rows (dev-style)."""
    from softrepa.edit import edit_latents
    from softrepa.flowedit import FlowEditParams

    _, z = _edit_inputs(pipe)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw["hidden_states"].shape[0], kw["guidance"])), with_kwargs=True)
    try:
        edit_latents(pipe, z, ["a red circle"], ["a blue square"],
                     FlowEditParams(steps=4, n_max=2, src_cfg=1.5, tar_cfg=5.5), max_sequence_length=8)
    finally:
        hook.remove()
    assert [n for n, _ in seen] == [2, 2]  # 2 steps, one call each on B = 1 source + 1 target row
    for _, g in seen:
        if pipe.transformer.config.guidance_embeds:
            assert g.tolist() == [1.5, 5.5]
        else:
            assert g is None


def test_flowedit_presets_sigmas_and_cfg_form():
    """FLUX presets are FlowEdit's published FLUX.1-dev ones (also with tokens); the sigma grid is the
    FluxPipeline's own (linspace(1, 1/T, T), dynamically shifted); the CFG 'authors' form is refused."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from softrepa.edit import edit_latents
    from softrepa.flowedit import FlowEditParams

    pipe = tiny_flux_pipeline(guidance_embeds=True)
    for with_tokens in (False, True):
        p = FlowEditParams.preset(family_of(pipe), with_tokens=with_tokens)
        assert (p.steps, p.n_max, p.src_cfg, p.tar_cfg, p.n_min, p.n_avg) == (28, 24, 1.5, 5.5, 0, 1)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                     max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    _, sigmas, _ = family_of(pipe).edit_model(backbone_for(pipe), 5, (1, 4, 12, 16))
    pipe(prompt="a red circle", height=24, width=32, num_inference_steps=5, output_type="latent",
         max_sequence_length=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float().cpu(), rtol=0, atol=0)
    assert not np.allclose(sigmas[:-1].numpy(), np.linspace(1, 1 / 5, 5))  # shifted
    _, z = _edit_inputs(pipe)
    with pytest.raises(ValueError, match="embedding"):
        edit_latents(pipe, z, ["a"], ["b"], FlowEditParams(steps=4, n_max=2, guidance="authors"),
                     max_sequence_length=8)


def test_a_pipeline_without_a_text_encoder_is_a_one_line_error(pipe):
    pipe.text_encoder_2 = None
    with pytest.raises(softrepa.SoftrepaError, match="text_encoder_2"):
        backbone_for(pipe, max_sequence_length=8).encode_prompts(["a red circle"])


def test_pure_loop_with_embedded_guidance():
    """The loop with an `EmbeddedGuidance` denoise: conditional rows only, each branch's scale per row,
    the joint call == two calls, n_min / n_avg run, equal branches keep the source exactly."""
    from softrepa.flowedit import EditConds, EmbeddedGuidance, FlowEditParams, flowedit_latents, guidance_mode

    calls = []

    def toy(x, sigma, cond, scale):  # (N, C, h, w), cond (N, 1, 1, 1), scale (N,)
        calls.append((x.shape[0], scale.tolist()))
        return torch.tanh(x) * cond * scale.view(-1, 1, 1, 1) + sigma * x.flip(-1)

    den = EmbeddedGuidance(toy)
    assert guidance_mode(den) == "embedded" and guidance_mode(lambda x, s, c: x) == "cfg"
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1, 0, 7)
    src, tar = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1), torch.tensor([3.0, -1.0]).view(2, 1, 1, 1)
    p = FlowEditParams(steps=6, n_max=5, src_cfg=1.5, tar_cfg=5.5)
    two = flowedit_latents(den, z, sigmas, EditConds(src, tar), p)
    assert calls[:2] == [(2, [1.5, 1.5]), (2, [5.5, 5.5])]
    calls.clear()
    joint = flowedit_latents(den, z, sigmas, EditConds(src, tar, torch.cat([src, tar])), p)
    assert calls[0] == (4, [1.5, 1.5, 5.5, 5.5]) and len(calls) == 5
    torch.testing.assert_close(joint, two)
    same = FlowEditParams(steps=6, n_max=5, src_cfg=2.0, tar_cfg=2.0)
    assert torch.equal(flowedit_latents(den, z, sigmas, EditConds(src, src, torch.cat([src, src])), same), z)
    for extra in ({"n_min": 2}, {"n_avg": 3}):
        b = flowedit_latents(den, z, sigmas, EditConds(src, tar), FlowEditParams(**{**p.to_dict(), **extra}))
        assert torch.isfinite(b).all() and not torch.allclose(b, two)


def test_true_cfg_on_a_guidance_distilled_model_runs_both_branches_with_the_tokens(tmp_path):
    """`generate_images(true_cfg=...)` on FLUX.1-dev: the transformer sees the conditional and the
    negative branch per step, both carrying the tokens; the metadata records it; a pipeline without
    true CFG (SD3) refuses the option by name."""
    from softrepa.generate import generate_images
    from softrepa.tiny import tiny_sd3_pipeline

    dev = tiny_flux_pipeline(guidance_embeds=True)
    tokens = SoftTokens.for_model(dev, SoftTokensConfig(num_layers=1, num_tokens=2), seed=0)
    handle = attach(dev, tokens)
    calls = []
    hook = dev.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append(handle.current is not None), with_kwargs=True)
    kw = dict(steps=2, height=32, width=32, progress=False)
    rows = generate_images(dev, ["a red square"], [0], tmp_path / "true", true_cfg=3.0, **kw)
    n_true = len(calls)
    generate_images(dev, ["a red square"], [0], tmp_path / "plain", **kw)
    hook.remove()
    assert n_true == 2 * (len(calls) - n_true) and all(calls)  # two branches per step, tokens on both
    assert rows[0]["true_cfg"] == 3.0
    from PIL import Image
    import numpy as np

    a = np.asarray(Image.open(tmp_path / "true" / rows[0]["file"]), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "plain" / rows[0]["file"]), dtype=np.int16)
    assert np.abs(a - b).max() > 0
    with pytest.raises(ValueError, match="true_cfg_scale"):
        generate_images(tiny_sd3_pipeline(num_layers=2), ["x"], [0], tmp_path / "sd3", true_cfg=3.0, **kw)
