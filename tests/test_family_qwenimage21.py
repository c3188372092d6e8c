"""Qwen-Image 2.1 family (tiny random QwenImage21Pipeline), what is specific to it: the tokens as a
causal text prefix at row 0 of the block-causal joint sequence (key mask, rotary row, the t = 0
modulation row and the attention segments following), the prefix KV cache turned off while tokens are
on (and only then), each step's tokens at that step's time bucket, the flex BlockMask refused, the
backbone's prompts and model call, FlowEdit's grid, the recipe. What every family does (detach,
gradients, the stock pipeline with true CFG, FlowEdit identities) is in tests/test_conformance.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.family import family_of
from softrepa.tiny_dit import tiny_qwenimage21_pipeline

M = 4


@pytest.fixture(scope="module")
def pipe():
    p = tiny_qwenimage21_pipeline(num_layers=3)
    p.set_progress_bar_config(disable=True)
    return p


def _tokens(pipe, layers=(0, 2), scale=30.0, **kw) -> SoftTokens:
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_tokens=M, layers=layers, **kw), seed=0)
    with torch.no_grad():
        for p in tokens.parameters():
            p.mul_(scale)  # a visible effect
    return tokens


def _inputs(model, n_txt=7, h=4, w=6, seed=0):
    """Transformer inputs as the pipeline builds them: text of n_txt rows (sample 0 padded after 5), the
    target's h x w latents unpatched, one vision slot per 2 x 2 latents."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    mask = torch.ones(2, n_txt, dtype=torch.long)
    mask[0, 5:] = 0
    slots = torch.cat([torch.zeros(2, n_txt, dtype=torch.bool), torch.ones(2, h * w // 4, dtype=torch.bool)], dim=1)
    return {"hidden_states": torch.randn(2, h * w, c.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(2, n_txt, c.context_in_dim, generator=g),
            "encoder_hidden_states_mask": mask, "timestep": torch.tensor([0.31, 0.87]),
            "img_shapes": [[(1, h, w)]] * 2, "img_mask": slots}


def reference_forward(model, tokens, inp):
    """The blocks run by hand on the bare model from the inputs the model hands block 0: at each selected
    block the tokens are m text rows at row 0 — key mask 1, rotary row 0, modulation row t = 0, one causal
    text segment with the prompt — and are dropped after the block; then the model's output layers."""
    seen = {}
    hook = model.transformer_blocks[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        model(**inp)
    finally:
        hook.remove()
    lay, b = tokens.layout, inp["hidden_states"].shape[0]
    toks = tokens(inp["timestep"] * 1000, b, projection=model.txt_in)  # (B, sets, m, D)
    x, kw = seen["hidden_states"], {k: v for k, v in seen.items() if k != "hidden_states"}
    for k, block in enumerate(model.transformer_blocks):
        if k not in lay.layers:
            x = block(x, **kw)
            continue
        grown = dict(kw)
        grown["rotary_emb"] = torch.cat([kw["rotary_emb"][:1].expand(M, -1), kw["rotary_emb"]])
        grown["target_token_mask"] = torch.cat([torch.zeros(M, dtype=torch.bool), kw["target_token_mask"]])
        grown["key_valid"] = torch.cat([torch.ones(b, M, dtype=torch.bool), kw["key_valid"]], dim=1)
        (s, e, is_text), = kw["segments"]  # text to image: one text run
        assert (s, is_text) == (0, True)
        grown["segments"] = [(0, e + M, True)]
        y = block(torch.cat([toks[:, lay.layers.index(k)], x], dim=1), **grown)
        x = y[:, M:]
    temb = model.time_text_embed(torch.cat([inp["timestep"], inp["timestep"].new_zeros(1)]), x)
    return model.proj_out(model.norm_out(x, temb, kw["target_token_mask"]))


def test_hooked_forward_equals_the_blocks_run_by_hand(pipe):
    model = pipe.transformer
    tokens = _tokens(pipe)
    inp = _inputs(model)
    with torch.no_grad():
        plain = model(**inp, return_dict=False)[0]
        ref = reference_forward(model, tokens, inp)
        with attach(pipe, tokens):
            got = model(**inp, return_dict=False)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_the_prompt_sees_the_tokens_and_the_tokens_see_no_image(pipe):
    """Causal text: a token block changes the prompt rows' output (they come after the tokens); the tokens
    themselves attend to nothing after them, so their own rows do not depend on the image."""
    model = pipe.transformer
    tokens = _tokens(pipe, layers=(0,))
    inp = _inputs(model)
    outs = {}

    def keep(mod, args, kwargs, out):
        outs.setdefault(len(outs), out)

    with torch.no_grad(), attach(pipe, tokens):
        hook = model.transformer_blocks[0].register_forward_hook(keep, with_kwargs=True)  # after the drop hook
        try:
            model(**inp)
            inp2 = dict(inp, hidden_states=inp["hidden_states"] + 1.0)  # another image
            model(**inp2)
        finally:
            hook.remove()
    a, b = outs[0], outs[1]  # tokens dropped: (B, L, D)
    n_txt = inp["encoder_hidden_states"].shape[1]
    torch.testing.assert_close(a[:, :n_txt], b[:, :n_txt])  # text rows: causal, blind to the image
    assert (a[:, n_txt:] - b[:, n_txt:]).abs().max() > 1e-4


def test_kv_cache_is_off_with_tokens_and_on_without(pipe):
    """With tokens the pipeline's cached call equals its uncached one exactly (the hooks drop the cache);
    the model sees no cache while tokens are on and the pipeline's cache when the handle is disabled."""
    kw = dict(prompt="a red circle", height=32, width=32, num_inference_steps=3, output_type="np")
    modes = []
    with attach(pipe, _tokens(pipe)) as handle:
        spy = pipe.transformer.register_forward_pre_hook(  # after the token hook: sees the rewritten call
            lambda mod, args, kwargs: modes.append(kwargs.get("kv_cache_mode")), with_kwargs=True)
        try:
            cached = pipe(generator=torch.Generator().manual_seed(0), **kw).images
            assert modes == [None, None, None]
            uncached = pipe(generator=torch.Generator().manual_seed(0), use_kv_cache=False, **kw).images
            modes.clear()
            with handle.disabled():
                pipe(generator=torch.Generator().manual_seed(0), **kw)
            assert modes == ["extract", "cached", "cached"]
        finally:
            spy.remove()
    assert np.array_equal(cached, uncached)


def test_each_step_uses_its_own_time_bucket(pipe):
    """The tokens of every pipeline step are computed from that step's timestep (the cache would have kept
    step 0's): the token tensors of the three calls differ and equal the tokens at t * 1000."""
    tokens = _tokens(pipe, layers=(1,), time_buckets=100)
    got = []
    with attach(pipe, tokens) as handle:
        spy = pipe.transformer.register_forward_pre_hook(
            lambda mod, args, kwargs: got.append((kwargs["timestep"].clone(), handle.current.clone())),
            with_kwargs=True)
        try:
            pipe(prompt="a red circle", height=32, width=32, num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0), output_type="np")
        finally:
            spy.remove()
    assert len(got) == 3
    for t, current in got:
        torch.testing.assert_close(current, tokens(t * 1000, 1, projection=pipe.transformer.txt_in))
    assert not torch.equal(got[0][1], got[-1][1])


def test_a_flex_block_mask_is_refused(pipe):
    from softrepa.families.qwenimage21 import no_block_mask

    with pytest.raises(softrepa.SoftTokensError, match="SDPA attention processor"):
        no_block_mask(object(), M, 0, {})
    dense = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert no_block_mask(dense, M, 0, {}).shape == (2, 1, 1, 5 + M)


def test_backbone_matches_the_pipelines_call(pipe):
    """The backbone's velocity for one prompt is the transformer called as the pipeline calls it (last
    target rows), and its prompts are the pipeline's rows zero-padded to 512 with a mask."""
    bb = backbone_for(pipe)
    cond = bb.encode_prompts(["a red circle", "a small blue square on the left"])
    own, mask, _ = pipe.encode_prompt(["a red circle", "a small blue square on the left"])
    n = own.shape[1]
    assert cond.embeds.shape == (2, 512, 32)
    torch.testing.assert_close(cond.embeds[:, :n], own)
    assert torch.equal(cond.extra["mask"][:, :n], mask.long()) and not cond.extra["mask"][:, n:].any()
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(1, 4, 2, 4, generator=g), torch.tensor([420.0])
    one = bb.encode_prompts(["a red circle"])
    e1, _, ipm = pipe.encode_prompt(["a red circle"])
    with torch.no_grad():
        v = bb.denoise(x_t, t, one)
        slots = torch.cat([ipm, torch.ones(1, 2, dtype=torch.bool)], dim=1)
        raw = pipe.transformer(hidden_states=pipe._pack_latents(x_t, 1, 4, 2, 4), timestep=t / 1000,
                               encoder_hidden_states=e1, img_shapes=[[(1, 2, 4)]], img_mask=slots,
                               return_dict=False)[0][:, -8:]
    torch.testing.assert_close(v, raw.transpose(1, 2).reshape(1, 4, 2, 4))


def test_flowedit_sigmas_and_metadata(pipe):
    from softrepa.generate import native_resolution

    fam = family_of(pipe)
    bb = backbone_for(pipe)
    _, sigmas, _ = fam.edit_model(bb, 5, (1, 4, 4, 4))
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    c = sched.config
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5),
                        mu=calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    torch.testing.assert_close(sigmas, sched.sigmas.float())
    assert (fam.name, fam.text_length, fam.sampling.steps, fam.sampling.cfg) == ("qwenimage21", None, 40, 1.0)
    assert fam.guidance_kwargs(1.0) == {"true_cfg_scale": 1.0}
    assert fam.guidance_kwargs(4.0) == {"true_cfg_scale": 4.0, "negative_prompt": " "}
    assert fam.widths(pipe.transformer) == (32, 32) and native_resolution(pipe) == 1024


def test_recipe():
    from softrepa.config import load_config

    recipe = load_config("qwenimage21")
    assert (recipe.tokens.num_layers, recipe.tokens.num_tokens, recipe.tokens.token_space) == (5, 4, "text")
    assert recipe.lr == 1e-3 and recipe.batch_size == 16 and recipe.max_sequence_length is None


@pytest.mark.parametrize("objective", ["softrepa", "agsm"])
def test_one_training_step_with_each_objective(tmp_path, objective):
    """The one trainer on this family's tiny pipeline (in memory): one step of each objective writes a
    tokens file of this family and a finite loss."""
    from tests.conftest import one_training_step

    path, rows = one_training_step(tmp_path, tiny_qwenimage21_pipeline(num_layers=3), objective)
    assert softrepa.load_soft_tokens(path).layout.family == "qwenimage21"
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])


def test_segments_rule_with_condition_images():
    """Condition images sit inside the text: the tokens join the first text run, later runs shift by m.
    (End to end with condition images needs the released RGBA VAE, whose images are RGBA: not run here.)"""
    from softrepa.families.qwenimage21 import text_segments

    runs = [(0, 5, True), (5, 21, False), (21, 30, True)]
    assert text_segments(runs, M, 0, {}) == [(0, 5 + M, True), (5 + M, 21 + M, False), (21 + M, 30 + M, True)]
    assert text_segments([(0, 16, False), (16, 20, True)], M, 0, {}) == [(0, M, True), (M, 16 + M, False),
                                                                          (16 + M, 20 + M, True)]


def test_generate_images_in_memory_vanilla_is_the_stock_call_and_tokens_differ(pipe, tmp_path):
    """What the CLI's generate does (not run through a saved folder here, see tests/conformance.py): the
    vanilla image is the stock pipeline's at the family's defaults, bit for bit; with tokens (and with
    true CFG, one prompt per call) the image differs."""
    from PIL import Image

    from softrepa.generate import generate_images

    common = dict(prompts=["a red circle"], seeds=[0], steps=2, height=32, width=32, progress=False)
    generate_images(pipe, out_dir=tmp_path / "vanilla", **common)
    fam = family_of(pipe)
    ref = pipe(prompt="a red circle", height=32, width=32, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), **fam.guidance_kwargs(fam.sampling.cfg)).images[0]
    vanilla = np.asarray(Image.open(tmp_path / "vanilla" / "00000_s0.png").convert("RGB"))
    assert np.array_equal(vanilla, np.asarray(ref))
    with attach(pipe, _tokens(pipe)):
        generate_images(pipe, out_dir=tmp_path / "tokens", **common)
        generate_images(pipe, out_dir=tmp_path / "cfg", cfg=3.0, **common)
    for sub in ("tokens", "cfg"):
        img = np.asarray(Image.open(tmp_path / sub / "00000_s0.png").convert("RGB"))
        assert not np.array_equal(img, vanilla), sub
