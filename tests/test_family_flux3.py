"""FLUX.3 family (tiny random Flux3ModularPipeline), what is specific to it: the tokens as m text rows of the
joint blocks (per-token text modulation and rotary grown, the first text row's rotary), the per-mode blocks left
alone, the backbone's prompts (one window of 80s per prompt, as the pipeline) and model call (also under
gradient checkpointing with mixed windows), the modular
pipeline's call per prompt with the CFG scale on its guider, the unconditional branch found through the
guider, modular loading, FlowEdit's grid, the recipe and one training step of each objective. What every
family does (detach, gradients, checkpointing, chunked == plain, the stock pipeline, FlowEdit identities)
is in tests/test_conformance.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.family import family_of
from softrepa.tiny_dit import tiny_flux3_pipeline

M = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux3_pipeline()


def _tokens(pipe, layers=(0, 2), scale=30.0, seed=0, **kw) -> SoftTokens:
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_tokens=M, layers=layers, **kw), seed=seed)
    with torch.no_grad():
        for p in tokens.parameters():
            p.mul_(scale)  # a visible effect
    return tokens


def _inputs(model, n_txt=6, h=4, w=6, seed=0, cond=False):
    """Transformer inputs as the pipeline builds them (ids from its own steps); optionally one reference image."""
    from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep, _prepare_image_ids

    g = torch.Generator().manual_seed(seed)
    c = model.config
    text = torch.randn(2, n_txt, c.joint_attention_dim, generator=g)
    inp = {"hidden_states": torch.randn(2, h * w, c.in_channels, generator=g), "encoder_hidden_states": text,
           "timestep": torch.tensor([0.31, 0.87]), "img_ids": _prepare_image_ids(h, w, 0.5),
           "txt_ids": Flux3TextRoPEInputsStep._prepare_text_ids(text)}
    if cond:
        inp["image_cond_hidden_states"] = torch.randn(2, 4, c.cond_in_channels, generator=g)
        inp["image_cond_ids"] = _prepare_image_ids(2, 2, 0.5, l_coord=-1)
    return inp


def reference_forward(model, tokens, inp):
    """The joint blocks run by hand from the inputs the model hands joint block 0: at each selected block the
    tokens are m text rows in front of the text, with the first text row's modulation and the rotary of the
    first text id (0, 0, 0, 0), computed here by the model's pos_embed, and are dropped after the block."""
    seen = {}
    hook = model.single_transformer_blocks[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        model(**inp)
    finally:
        hook.remove()
    lay, b = tokens.layout, inp["hidden_states"].shape[0]
    toks = tokens(inp["timestep"] * 1000, b, projection=model.context_embedder)  # (B, sets, m, D)
    ids = torch.zeros(M, 4)  # (m, 4): the first text token's id, m times
    cos, sin = model.pos_embed(ids)  # (m, d) each
    text, content = seen["encoder_hidden_states"], seen["hidden_states"]
    for k, block in enumerate(model.single_transformer_blocks):
        kw = dict(temb_mod=seen["temb_mod"], temb_mod_context=seen["temb_mod_context"],
                  image_rotary_emb=seen["image_rotary_emb"])
        if k in lay.layers:
            mod = seen["temb_mod_context"]
            kw["temb_mod_context"] = torch.cat([mod[:, :1].expand(-1, M, -1), mod], dim=1)
            rot = seen["image_rotary_emb"]
            kw["image_rotary_emb"] = (torch.cat([cos, rot[0]]), torch.cat([sin, rot[1]]))
            text = torch.cat([toks[:, lay.layers.index(k)], text], dim=1)
        text, content = block(hidden_states=content, encoder_hidden_states=text, **kw)
        if k in lay.layers:
            text = text[:, M:]
    n_img = inp["hidden_states"].shape[1]
    temb = model.timestep_embedder(model.time_proj(inp["timestep"] * 1000))[:, None].expand(-1, n_img, -1)
    return model.proj_out(model.norm_out(content[:, :n_img], temb))


@pytest.mark.parametrize("cond", [False, True], ids=["text-to-image", "reference-image"])
def test_hooked_forward_equals_the_joint_blocks_run_by_hand(pipe, cond):
    model = pipe.transformer
    tokens = _tokens(pipe)
    inp = _inputs(model, cond=cond)
    with torch.no_grad():
        plain = model(**inp, return_dict=False)[0]
        ref = reference_forward(model, tokens, inp)
        with attach(pipe, tokens):
            got = model(**inp, return_dict=False)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_the_per_mode_text_blocks_never_see_the_tokens(pipe):
    """Only joint blocks get tokens: the text-only blocks run on the prompt's rows alone, with and without tokens."""
    model = pipe.transformer
    shapes = []
    hook = model.txt_mode_blocks[0].register_forward_pre_hook(lambda mod, args: shapes.append(args[0].shape))
    try:
        with torch.no_grad(), attach(pipe, _tokens(pipe)):
            model(**_inputs(model))
    finally:
        hook.remove()
    assert shapes == [torch.Size([2, 6, model.inner_dim])]
    with pytest.raises(softrepa.SoftTokensError, match="only 3 transformer blocks|go beyond the model depth"):
        SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=4))


def test_backbone_matches_the_pipelines_call(pipe):
    """The backbone's prompts are the pipeline's own text step (one window of 80s per prompt, zero rows after
    it) and its velocity is the transformer as the pipeline's denoise step calls it (captured in a run)."""
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs) if not calls
                                                      else None, with_kwargs=True)
    try:
        pipe(prompt="a red circle", height=32, width=32, num_inference_steps=1, output="images",
             generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    seen = calls[0]  # the first call of step 0: the conditional branch
    bb = backbone_for(pipe)
    cond = bb.encode_prompts(["a red circle", "a small blue square " * 8])
    assert cond.embeds.shape == (2, 480, 128) and cond.extra["length"].tolist() == [80, 160]
    torch.testing.assert_close(cond.embeds[:1, :80], seen["encoder_hidden_states"])
    assert not cond.embeds[0, 80:].any()
    x_t = seen["hidden_states"].transpose(1, 2).reshape(1, 16, 8, 8)  # the pipeline's packed latents, unpacked
    t = seen["timestep"] * 1000
    with torch.no_grad():
        v = bb.denoise(x_t, t, cond.index([0]))
        raw = pipe.transformer(**seen)[0]
    # the backbone builds the ids itself: equal predictions mean equal ids, text and timestep
    torch.testing.assert_close(v, raw.transpose(1, 2).reshape(1, 16, 8, 8))


def test_a_batch_of_windows_equals_each_prompt_alone(pipe):
    """Rows of different windows in one denoise call: each is the prediction of its prompt alone."""
    bb = backbone_for(pipe)
    cond = bb.encode_prompts(["a small blue square " * 8, "a red circle", "a green triangle"])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 16, 4, 4, generator=g), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        batch = bb.denoise(x, t, cond)
        alone = torch.cat([bb.denoise(x[i:i + 1], t[i:i + 1], cond.index([i])) for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)


def test_a_window_beyond_the_training_rows_is_one_named_error(pipe):
    bb = backbone_for(pipe)
    with pytest.raises(softrepa.SoftrepaError, match="text window of 560 tokens, at most 480"):
        bb.encode_prompts(["x" * 500])


def test_render_sets_the_cfg_on_the_guider_and_restores_it(pipe):
    """`Flux3Family.render` is the pipeline's own call per prompt with the guider at the asked scale: its image
    equals the stock call made with a guider of that scale; the pipeline's guider is unchanged after."""
    fam = family_of(pipe)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = fam.render(pipe, ["a red circle", "a blue square"], gens, steps=2, height=32, width=32,
                     call_kwargs=fam.guidance_kwargs(5.0), output_type="np")
    assert pipe.guider.guidance_scale == 3.5 and len(out) == 2 and out[0].shape == (32, 32, 3)
    pipe.guider.guidance_scale = 5.0
    try:
        ref = pipe(prompt="a blue square", height=32, width=32, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(1), output="images")
    finally:
        pipe.guider.guidance_scale = 3.5
    assert np.array_equal(out[1], ref[0])


def _agsm_file(pipe, tmp_path):
    pos, neg = _tokens(pipe, seed=0), _tokens(pipe, seed=1)
    return softrepa.save_soft_tokens(pos, tmp_path / "agsm.safetensors", others={"negative": neg}, name="positive")


@pytest.mark.parametrize("mode", ["negative", "none"])
def test_the_guiders_unconditional_call_carries_the_chosen_tokens(pipe, tmp_path, mode):
    """With CFG the guider prepares two calls per step; the second (unconditional) gets psi- ("negative") or
    no tokens ("none"), the first psi+; one image per choice, each deterministic; detaching restores the guider."""
    from softrepa.generate import generate_images

    path = _agsm_file(pipe, tmp_path)
    seen = []
    common = dict(prompts=["a red circle"], seeds=[0], steps=2, height=32, width=32, progress=False)
    with softrepa.load_into(pipe, path, uncond_tokens=mode) as handle:
        # registered after the token hooks: it sees the text the block gets
        probe = pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
        try:
            rows = generate_images(pipe, out_dir=tmp_path / mode, **common)
        finally:
            probe.remove()
        assert handle.uncond_calls == 2  # one unconditional call per step
        # a call outside the guider (the backbone's) is never a branch: the tokens are on it
        probe = pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
        try:
            with torch.no_grad():
                bb = backbone_for(pipe)
                bb.denoise(torch.randn(1, 16, 4, 4), torch.tensor([500.0]), bb.encode_prompts(["a red circle"]))
        finally:
            probe.remove()
        assert seen[-1] == 80 + M and handle.branch is None
    with softrepa.load_into(pipe, path):
        generate_images(pipe, out_dir=tmp_path / "positive", **common)
    n = 80  # the prompt's window
    # per step: conditional call (tokens), then unconditional ("negative": tokens, "none": the plain text)
    uncond = n + M if mode == "negative" else n
    assert seen[:4] == [n + M, uncond, n + M, uncond]
    assert "prepare_models" not in vars(pipe.guider) and rows[0]["uncond_tokens"] == mode
    from PIL import Image
    a = np.asarray(Image.open(tmp_path / mode / "00000_s0.png"))
    b = np.asarray(Image.open(tmp_path / "positive" / "00000_s0.png"))
    assert not np.array_equal(a, b)


def test_flowedit_sigmas_and_defaults(pipe):
    from softrepa.generate import native_resolution

    fam = family_of(pipe)
    bb = backbone_for(pipe)
    _, sigmas, _ = fam.edit_model(bb, 5, (1, 16, 4, 4))
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5))
    torch.testing.assert_close(sigmas, sched.sigmas.float())
    assert abs(float(sigmas[1]) - 6.93 * 0.8 / (1 + 5.93 * 0.8)) < 1e-5  # the pipeline's constant shift 6.93
    assert (fam.name, fam.text_length, fam.sampling.steps, fam.sampling.cfg) == ("flux3", 8192, 50, 3.5)
    assert fam.guidance_kwargs(3.5) == {"guidance_scale": 3.5}
    assert fam.widths(pipe.transformer) == (32, 128) and native_resolution(pipe) == 1024


def test_recipe():
    from softrepa.config import load_config

    recipe = load_config("flux3")
    assert (recipe.tokens.num_layers, recipe.tokens.num_tokens, recipe.tokens.token_space) == (5, 4, "text")
    assert recipe.lr == 1e-3 and recipe.batch_size == 16 and recipe.validation.guidance_scale == 3.5


@pytest.mark.parametrize("objective", ["softrepa", "agsm"])
@pytest.mark.parametrize("distilled", [False, True], ids=["base", "distilled"])
def test_one_training_step_with_each_objective(tmp_path, objective, distilled):
    """The one trainer on this family's tiny pipelines (in memory): one step of each objective writes a
    tokens file of this family and a finite loss."""
    from tests.conftest import one_training_step

    path, rows = one_training_step(tmp_path, tiny_flux3_pipeline(distilled=distilled), objective,
                                   "--max_sequence_length", "160")
    assert softrepa.load_soft_tokens(path).layout.family == "flux3"
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])


def test_generate_images_in_memory_vanilla_is_the_stock_call_and_tokens_differ(pipe, tmp_path):
    """What the CLI's generate does: the vanilla image is the stock modular pipeline's at the family's defaults,
    bit for bit; with tokens the image differs."""
    from PIL import Image

    from softrepa.generate import generate_images

    common = dict(prompts=["a red circle"], seeds=[0], steps=2, height=32, width=32, progress=False)
    generate_images(pipe, out_dir=tmp_path / "vanilla", **common)
    ref = pipe(prompt="a red circle", height=32, width=32, num_inference_steps=2, output="images",
               generator=torch.Generator().manual_seed(0))[0]
    vanilla = np.asarray(Image.open(tmp_path / "vanilla" / "00000_s0.png").convert("RGB"))
    assert np.array_equal(vanilla, np.asarray(ref))
    with attach(pipe, _tokens(pipe)):
        generate_images(pipe, out_dir=tmp_path / "tokens", **common)
    img = np.asarray(Image.open(tmp_path / "tokens" / "00000_s0.png").convert("RGB"))
    assert not np.array_equal(img, vanilla)


def _save_folder(pipe, path):
    """`save_pretrained` of a tiny FLUX.3 pipeline: the Qwen3-VL processor cannot be saved and loaded back
    without torchvision here, so the folder holds its plain tokenizer (the processor is put back after)."""
    proc = pipe.tokenizer
    pipe.update_components(tokenizer=proc.tokenizer)
    try:
        pipe.save_pretrained(str(path), overwrite_modular_index=True)
    finally:
        pipe.update_components(tokenizer=proc)
    return proc


def test_a_saved_modular_folder_loads_without_the_prompt_upsampler(tmp_path):
    """`load_pipeline` on a folder with a `modular_model_index.json` (FLUX.3 has no classic pipeline class):
    a `Flux3ModularPipeline` with its weights, without the prompt upsampler block (prompts are encoded as
    written), rendering the saved pipeline's image. The Qwen3-VL processor cannot be saved and loaded back
    without torchvision here, so the folder holds its plain tokenizer and the test puts the processor back."""
    from softrepa.loading import check_model
    from softrepa.pipeline import load_pipeline

    source = tiny_flux3_pipeline()
    proc = _save_folder(source, tmp_path / "flux3")
    assert not (tmp_path / "flux3" / "model_index.json").exists()
    check_model(str(tmp_path / "flux3"))  # a modular index is a pipeline folder
    loaded = load_pipeline(str(tmp_path / "flux3"))
    assert type(loaded).__name__ == "Flux3ModularPipeline" and family_of(loaded).name == "flux3"
    assert "prompt_upsampler" not in loaded._blocks.sub_blocks and "text_encoder" in loaded._blocks.sub_blocks
    for a, b in zip(loaded.transformer.state_dict().values(), source.transformer.state_dict().values()):
        assert torch.equal(a, b)
    loaded.update_components(tokenizer=proc)
    kw = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output="images", output_type="np")
    got = loaded(generator=torch.Generator().manual_seed(0), **kw)[0]
    assert np.array_equal(got, source(generator=torch.Generator().manual_seed(0), **kw)[0])


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    """A saved FLUX.3 folder (see `_save_folder`), large random tokens and a three-image dataset."""
    from tests.conftest import write_square_images

    root = tmp_path_factory.mktemp("flux3_cli")
    pipe = tiny_flux3_pipeline()
    proc = _save_folder(pipe, root / "model")
    softrepa.save_soft_tokens(_tokens(pipe), root / "t.safetensors")
    write_square_images(root / "data")
    return root, proc


@pytest.fixture
def processor_back(cli_folder, monkeypatch):
    """softrepa's own `load_pipeline` on the saved folder, then the in-memory processor put back (the one
    step a machine with torchvision does not need)."""
    import softrepa.pipeline
    import softrepa.train

    real = softrepa.pipeline.load_pipeline

    def load(*args, **kwargs):
        pipe = real(*args, **kwargs)
        pipe.update_components(tokenizer=cli_folder[1])
        return pipe

    monkeypatch.setattr(softrepa.pipeline, "load_pipeline", load)
    monkeypatch.setattr(softrepa.train, "load_pipeline", load)
    return cli_folder[0]


def test_train_generate_and_edit_through_the_cli_on_a_saved_folder(processor_back, tmp_path):
    """The CLI on a saved modular folder: one training step writes FLUX.3 tokens; `generate --compare`
    renders vanilla (the stock call at the family's defaults, bit for bit) and tokens images that differ;
    `edit` with tokens writes an image of the source's size."""
    import json

    from PIL import Image

    from softrepa.cli import main

    root = processor_back
    assert main(["train", "--model", str(root / "model"), "--data", str(root / "data"), "--output_dir",
                 str(tmp_path / "run"), "--resolution", "32", "--batch_size", "3", "--max_steps", "1",
                 "--num_workers", "0", "--checkpoint_every", "1", "--log_every", "1", "--validation.every", "0",
                 "--tokens.num_layers", "2", "--tokens.init", "normal", "--loss.tau", "2.0",
                 "--max_sequence_length", "160", "--no-progress"]) == 0
    assert softrepa.load_soft_tokens(tmp_path / "run" / "tokens.safetensors").layout.family == "flux3"

    assert main(["generate", "--model", str(root / "model"), "--tokens", str(root / "t.safetensors"), "--prompts",
                 "a red circle", "--seeds", "0", "--steps", "2", "--size", "32", "--compare", "--no-progress",
                 "--out", str(tmp_path / "gen")]) == 0
    a, b = (tmp_path / "gen" / sub / "00000_s0.png" for sub in ("vanilla", "tokens"))
    assert a.read_bytes() != b.read_bytes()
    row = json.loads((tmp_path / "gen" / "vanilla" / "metadata.jsonl").read_text().splitlines()[0])
    assert (row["cfg"], row["steps"], row["family"], row["max_sequence_length"]) == (3.5, 2, "flux3", 8192)
    from softrepa.pipeline import load_pipeline

    pipe = load_pipeline(str(root / "model"))
    ref = pipe(prompt="a red circle", height=32, width=32, num_inference_steps=2, output="images",
               generator=torch.Generator().manual_seed(0))[0]
    assert np.array_equal(np.asarray(Image.open(a).convert("RGB")), np.asarray(ref))

    Image.fromarray((np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8)).save(tmp_path / "src.png")
    assert main(["edit", "--model", str(root / "model"), "--image", str(tmp_path / "src.png"), "--steps", "4",
                 "--tokens", str(root / "t.safetensors"), "--source-prompt", "a red circle", "--target-prompt",
                 "a blue square", "--n-max", "3", "--no-progress", "--out", str(tmp_path / "edits")]) == 0
    assert Image.open(tmp_path / "edits" / "src.png").size == (30, 20)


def test_mixed_windows_under_gradient_checkpointing_give_the_plain_gradients():
    """One denoise over prompts of different windows makes one model call per window before the backward;
    with checkpointing each call's blocks are recomputed with their own call's tokens (`CallFrames`), so
    the token gradients equal those without checkpointing (they differed by twice their size before)."""
    pipe = tiny_flux3_pipeline()
    bb = backbone_for(pipe)
    cond = bb.encode_prompts(["a small blue square " * 8, "a red circle", "a green triangle"])
    assert cond.extra["length"].tolist() == [160, 80, 80]
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 16, 4, 4, generator=g), torch.tensor([100.0, 500.0, 900.0])
    grads = []
    for checkpointing in (False, True):
        tokens = _tokens(pipe, scale=3.0, time_buckets=100)
        if checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        try:
            with attach(pipe, tokens):
                bb.denoise(x, t, cond).pow(2).mean().backward()
        finally:
            pipe.transformer.disable_gradient_checkpointing()
        grads.append([p.grad.clone() for p in tokens.parameters()])
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)


def test_a_modular_folder_missing_a_component_is_one_named_error_and_offload_is_refused_early(tmp_path):
    """diffusers only logs a component that fails to load: `load_pipeline` names it instead. `--cpu-offload`
    on a modular folder is refused before anything loads."""
    import shutil

    from softrepa.pipeline import load_pipeline

    _save_folder(tiny_flux3_pipeline(), tmp_path / "flux3")
    from softrepa.errors import UsageError

    with pytest.raises(UsageError, match="modular pipeline, which has no model CPU offload"):
        softrepa.load_model(str(tmp_path / "flux3"), device="cuda", cpu_offload=True)
    shutil.rmtree(tmp_path / "flux3" / "transformer")
    with pytest.raises(FileNotFoundError, match="transformer did not load"):
        load_pipeline(str(tmp_path / "flux3"))


def test_the_distilled_pipeline_samples_with_its_own_defaults(tmp_path):
    """`generate` on the step-distilled pipeline (no guider): 16 steps and no CFG recorded, the image the stock
    call gives with its defaults."""
    from PIL import Image

    from softrepa.generate import generate_images

    pipe = tiny_flux3_pipeline(distilled=True)
    fam = family_of(pipe)
    assert (fam.sampling_for(pipe).steps, fam.sampling_for(pipe).cfg) == (16, 1.0)
    base = fam.sampling_for(tiny_flux3_pipeline())
    assert (base.steps, base.cfg) == (50, 3.5)
    rows = generate_images(pipe, ["a red circle"], [0], tmp_path, height=32, width=32, progress=False)
    assert (rows[0]["steps"], rows[0]["cfg"]) == (16, 1.0)
    # a CFG asked of a pipeline without a guider is not applied: recorded as 1.0, with a warning
    assert fam.applied_cfg(pipe, 3.5) == 1.0 and fam.applied_cfg(tiny_flux3_pipeline(), 3.5) == 3.5
    rows = generate_images(pipe, ["a red circle"], [0], tmp_path / "cfg", cfg=3.5, height=32, width=32, progress=False)
    assert rows[0]["cfg"] == 1.0
    ref = pipe(prompt="a red circle", height=32, width=32, output="images", generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "00000_s0.png").convert("RGB")), np.asarray(ref[0]))


def test_reentrant_checkpointing_with_several_calls_is_refused_not_guessed():
    """Reentrant checkpointing hands a recomputed block a detached copy of its input: with several calls before
    the backward (mixed windows) the block cannot be matched to its call, and that is one softrepa error, not
    silently wrong gradients."""
    import functools

    pipe = tiny_flux3_pipeline()
    bb = backbone_for(pipe)
    cond = bb.encode_prompts(["a small blue square " * 8, "a red circle"])
    x, t = torch.randn(2, 16, 4, 4), torch.tensor([100.0, 500.0])
    pipe.transformer.enable_gradient_checkpointing(
        functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    try:
        with attach(pipe, _tokens(pipe, scale=3.0)):
            out = bb.denoise(x.requires_grad_(True), t, cond)
            with pytest.raises(softrepa.SoftTokensError, match="cannot tell which of 2 denoiser calls"):
                out.pow(2).mean().backward()
    finally:
        pipe.transformer.disable_gradient_checkpointing()


def test_the_modular_fallback_is_only_for_models_without_a_classic_class(tmp_path):
    """A folder with both indexes whose classic load fails keeps its own error when the classic class exists
    (a broken classic pipeline), and is loaded as a modular one when diffusers has no such class (FLUX.3)."""
    import json

    from softrepa.pipeline import classic_class_exists, has_modular_index, load_pipeline

    _save_folder(tiny_flux3_pipeline(), tmp_path / "m")
    assert has_modular_index(str(tmp_path / "m")) and not classic_class_exists(str(tmp_path / "m"))
    index = {"_class_name": "Flux3Pipeline", "_diffusers_version": "0.42.1", "transformer": ["diffusers", "X"]}
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(index))
    assert type(load_pipeline(str(tmp_path / "m"))).__name__ == "Flux3ModularPipeline"
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    assert classic_class_exists(str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="cannot load a diffusers pipeline"):
        load_pipeline(str(tmp_path / "m"))
