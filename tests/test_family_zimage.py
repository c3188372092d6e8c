"""Z-Image family (tiny random ZImagePipeline), what is specific to it: the tokens inserted where the
caption starts in the joint `[image, caption]` sequence (after the padded image rows), with the key mask
and the rotary row of the first caption position following; the model's `t = 1 - sigma` mapped onto the
tokens' buckets; per-sample list inputs; the refusals (Omni calls, mixed sizes); the backbone's sign
and prompts; FlowEdit's sigma grid; the recipe. What every family does (detach, gradients, the stock
pipeline with CFG, FlowEdit identities, the CLI) is in tests/test_conformance.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.family import family_of
from softrepa.tiny_dit import tiny_zimage_pipeline

M = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_zimage_pipeline(num_layers=3)


def _tokens(pipe, layers=(0, 2), scale=30.0, **kw) -> SoftTokens:
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_tokens=M, layers=layers, **kw), seed=0)
    with torch.no_grad():
        for p in tokens.parameters():
            p.mul_(scale)  # a visible effect
    return tokens


def _inputs(model, caption_lengths=(5, 40), h=8, w=6, seed=0):
    """Per-sample lists as the pipeline passes them: latents (C, 1, h, w), captions of different lengths
    (padded by the model to 32 and 64 rows: a joint batch with a key mask), t = 1 - sigma."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = [torch.randn(c.in_channels, 1, h, w, generator=g) for _ in caption_lengths]
    caps = [torch.randn(n, c.cap_feat_dim, generator=g) for n in caption_lengths]
    return x, torch.tensor([0.25, 0.875])[:len(x)], caps


def reference_forward(model, tokens, x, t, caps):
    """ZImageTransformer2DModel.forward written out from its parts, no hooks: at each selected main block
    the tokens stand between the padded image and the caption — key mask 1, the rotary row of the first
    caption position — and are dropped after the block."""
    lay, dev = tokens.layout, x[0].device
    adaln = model.t_embedder(t * model.t_scale).type_as(x[0])
    xs, cs, sizes, x_pos, c_pos, x_pad, c_pad = model.patchify_and_embed(list(x), list(caps), 2, 1)
    x_len, c_len = [len(a) for a in xs], [len(a) for a in cs]
    xe = model.all_x_embedder["2-1"](torch.cat(xs)).split(x_len)
    xe, x_freqs, x_mask, _, _ = model._prepare_sequence(list(xe), x_pos, x_pad, model.x_pad_token, None, dev)
    for layer in model.noise_refiner:
        xe = layer(xe, x_mask, x_freqs, adaln)
    ce = model.cap_embedder(torch.cat(cs)).split(c_len)
    ce, c_freqs, c_mask, _, _ = model._prepare_sequence(list(ce), c_pos, c_pad, model.cap_pad_token, None, dev)
    for layer in model.context_refiner:
        ce = layer(ce, c_mask, c_freqs)
    u, freqs, mask, _ = model._build_unified_sequence(xe, x_freqs, x_len, None, ce, c_freqs, c_len, None,
                                                      None, None, None, None, False, dev)
    n = x_len[0]  # the padded image rows: where the caption starts
    toks = tokens(1000.0 * (1.0 - t), len(x), projection=model.cap_embedder)  # (B, sets, m, D)
    for k, layer in enumerate(model.layers):
        if k not in lay.layers:
            u = layer(u, mask, freqs, adaln)
            continue
        s = toks[:, lay.layers.index(k)]  # (B, m, D)
        grown = torch.cat([u[:, :n], s, u[:, n:]], dim=1)  # (B, n + m + rest, D)
        f = torch.cat([freqs[:, :n], freqs[:, n:n + 1].expand(-1, M, -1), freqs[:, n:]], dim=1)
        msk = None if mask is None else torch.cat([mask[:, :n], mask.new_ones(len(x), M), mask[:, n:]], dim=1)
        y = layer(grown, msk, f, adaln)
        u = torch.cat([y[:, :n], y[:, n + M:]], dim=1)
    out = model.all_final_layer["2-1"](u, c=adaln)
    return model.unpatchify(list(out.unbind(0)), sizes, 2, 1)


def test_hooked_forward_equals_the_forward_written_out(pipe):
    """Tokens in blocks 0 and 2 of 3, a batch of two captions of different padded lengths (key mask on)."""
    model = pipe.transformer
    tokens = _tokens(pipe)
    x, t, caps = _inputs(model)
    with torch.no_grad():
        plain = model(x, t, caps, return_dict=False)[0]
        ref = reference_forward(model, tokens, x, t, caps)
        with attach(pipe, tokens):
            got = model(x, t, caps, return_dict=False)[0]
    for a, b, p in zip(got, ref, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert (a - p).abs().max() > 1e-3


def test_image_rows_are_padded_to_32_and_the_caption_start_follows_the_image_size(pipe):
    """An 8 x 6 latent is 12 patches (padded to 32 rows), a 16 x 16 one 64 (no padding): the tokens go after
    those rows in either case, whatever the caption length."""
    model = pipe.transformer
    tokens = _tokens(pipe, layers=(1,))
    for h, w in ((8, 6), (16, 16)):
        x, t, caps = _inputs(model, caption_lengths=(7, 7), h=h, w=w)
        seen = []
        with torch.no_grad(), attach(pipe, tokens) as handle:
            # registered after attach: sees the block's input with the tokens in it
            hook = model.layers[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
            try:
                model(x, t, caps)
            finally:
                hook.remove()
            toks = handle.current[:, 0]  # (B, m, D)
        img = (h // 2) * (w // 2)
        n = img + (-img) % 32
        assert seen[0].shape[1] == n + M + 32  # [image (padded), tokens, caption (padded to 32)]
        torch.testing.assert_close(seen[0][:, n:n + M], toks)


def test_time_buckets_follow_one_minus_t(pipe):
    """The model's t = 1 - sigma reaches the tokens as 1000 (1 - t): t = 0.99 (sigma 0.01, the pipeline's
    float32 (1000 - 10) / 1000) is bucket 1, t = 0 is bucket 99, t = 1 bucket 0."""
    model = pipe.transformer
    tokens = _tokens(pipe, time_buckets=100)
    x, _, caps = _inputs(model, caption_lengths=(5, 5, 5))
    t = (1000.0 - torch.tensor([10.0, 1000.0, 0.0])) / 1000.0  # as the pipeline computes it, float32
    with attach(pipe, tokens) as handle:
        with torch.no_grad():
            model(x, t, caps)
        got = handle.current
    want = tokens(torch.tensor([10.0, 1000.0, 0.0]), 3, projection=model.cap_embedder)
    torch.testing.assert_close(got, want)


def test_omni_calls_and_mixed_sizes_are_refused_with_one_error(pipe):
    model = pipe.transformer
    x, t, caps = _inputs(model)
    with attach(pipe, _tokens(pipe)):
        with pytest.raises(softrepa.SoftTokensError, match="Omni"):
            model([[xi] for xi in x], t, [[c] for c in caps])
        mixed = [x[0], torch.randn(x[1].shape[0], 1, 16, 16)]
        with pytest.raises(softrepa.SoftTokensError, match="one image size"):
            model(mixed, t, caps)


def test_backbone_prompts_and_velocity_sign(pipe):
    """Prompts: the pipeline's own unpadded rows, zero-padded to the text length with a mask; denoise is
    minus the model's output (the pipeline negates it): the velocity eps - x0 of the flow backbone."""
    bb = backbone_for(pipe, max_sequence_length=32)
    cond = bb.encode_prompts(["a red circle", "a small blue square on the left"])
    own, _ = pipe.encode_prompt(["a red circle", "a small blue square on the left"],
                                do_classifier_free_guidance=False, max_sequence_length=32)
    assert cond.embeds.shape == (2, 32, 16)
    for i, e in enumerate(own):
        k = e.shape[0]
        assert int(cond.extra["mask"][i].sum()) == k
        torch.testing.assert_close(cond.embeds[i, :k], e)
        assert not cond.embeds[i, k:].any()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        v = bb.denoise(x_t, t, cond)
        raw = pipe.transformer(list(x_t.unsqueeze(2).unbind(0)), (1000 - t) / 1000, list(own),
                               return_dict=False)[0]
    torch.testing.assert_close(v, -torch.stack(raw)[:, :, 0])


def test_flowedit_sigmas_are_the_pipelines(pipe):
    """FlowEdit's grid is the pipeline's: linspace(1, 1 / steps, steps) through its scheduler (+ the final 0)."""
    bb = backbone_for(pipe)
    _, sigmas, _ = family_of(pipe).edit_model(bb, 6, (1, 4, 16, 16))
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=0.5)
    torch.testing.assert_close(sigmas, sched.sigmas.float())
    assert len(sigmas) == 7 and sigmas[-1] == 0


def test_family_metadata_and_recipe(pipe):
    from softrepa.config import load_config
    from softrepa.generate import native_resolution

    fam = family_of(pipe)
    assert (fam.name, fam.block_list, fam.text_length, fam.sampling.steps, fam.sampling.cfg) == \
        ("zimage", "layers", 512, 8, 0.0)
    assert fam.widths(pipe.transformer) == (32, 16)
    assert native_resolution(pipe) == 1024
    assert fam.guidance_kwargs(3.0) == {"guidance_scale": 3.0}
    recipe = load_config("zimage")
    assert recipe.model == "Tongyi-MAI/Z-Image-Turbo"
    assert (recipe.tokens.num_layers, recipe.tokens.num_tokens, recipe.tokens.token_space) == (5, 4, "text")
    assert recipe.max_sequence_length == 128 and recipe.lr == 1e-3 and recipe.batch_size == 16


@pytest.mark.parametrize("objective", ["softrepa", "agsm"])
def test_one_training_step_with_each_objective(tmp_path, objective):
    """The one trainer on this family's tiny pipeline (in memory): one step of each objective writes a
    tokens file of this family and a finite loss."""
    from tests.conftest import one_training_step

    path, rows = one_training_step(tmp_path, tiny_zimage_pipeline(num_layers=3), objective)
    assert softrepa.load_soft_tokens(path).layout.family == "zimage"
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
