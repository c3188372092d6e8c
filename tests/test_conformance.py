"""One conformance suite over every registered family (`softrepa.family.family_names()`), each family
through the tiny variants of `tests/conformance.py` (as peft's PeftCommonTester runs one suite over
every method): the tokens' layout and file round trip, the backbone's noise / target contract, attach /
remove bit-exact and leaving nothing, `handle.disabled()` vanilla, gradients on the tokens only (also
with gradient checkpointing), chunked == plain contrastive gradients, the stock pipeline with tokens and
after removal, FlowEdit identities, and train / generate / edit through the CLI on a folder saved with
`save_pretrained` (marked slow; they run in the normal suite). Family files test only what is specific
to a family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.cli import main
from softrepa.family import family_names, family_of, get_family
from softrepa.flowedit import FlowEditParams
from tests.conformance import (FAMILIES, Variant, pair_batch, pair_tokens, params, pipeline_modules, skip_video,
                               variants)
from tests.conftest import randomize_tokens, write_square_images

CONFIG = SoftTokensConfig(num_layers=2)  # every family: 2 blocks (MM-DiTs), down + mid (UNets)
PROMPTS = ["a red circle", "a small blue square on the left"]  # different lengths: a padded batch
RES = 32


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny models gain nothing from two, and where the suite's two cores are
    shared (other test processes) two spinning threads per process make these tests many times slower.
    Every comparison below is within one test, so at one thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tokens(pipe, std: float = 1.0) -> SoftTokens:
    """Tokens of `CONFIG` with values large enough for their effect to be far above float noise."""
    return randomize_tokens(SoftTokens.for_model(pipe, CONFIG, seed=0), std=std)


def _latents(bb, n: int):
    """(x0, noise, cond): n encoded random images, their noise, n prompts of different lengths."""
    g = torch.Generator().manual_seed(0)
    x0 = bb.encode_images(torch.rand(n, 3, RES, RES, generator=g) * 2 - 1, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, noise, bb.encode_prompts((PROMPTS + ["a green triangle"])[:n], resolution=RES)


def _denoise_inputs(bb):
    """(x_t, target, t, cond) for the backbone: three samples whose timesteps fall in buckets 0, 50 and 99
    (a fractional one as pipelines pass, and the t = 1000 end, clamped); noised at the nearest training
    timestep (integers below 1000)."""
    x0, noise, cond = _latents(bb, 3)
    t = torch.tensor([9.0, 503.7, 1000.0])
    t_train = t.round().clamp(max=999.0)
    return bb.add_noise(x0, noise, t_train), bb.target(x0, noise, t_train), t, cond


def _hooks(module: torch.nn.Module) -> dict[str, list]:
    """Every hook dict of a module (forward, pre-forward, backward, state-dict ...), as ordered items."""
    return {k: list(v.items()) for k, v in vars(module).items() if "hook" in k and isinstance(v, dict)}


def _global_hooks() -> dict[str, list]:
    import torch.nn.modules.module as mm

    return {k: list(v.items()) for k, v in vars(mm).items() if k.startswith("_global") and isinstance(v, dict)}


def _snapshot(pipe) -> dict:
    """What attach() must leave as it found: per module of every component its hooks, attributes,
    mode and parameters (objects and values), the state dict, the attention processors."""
    snap: dict = {"global": _global_hooks()}
    for name, comp in pipeline_modules(pipe).items():
        snap[name] = {
            "modules": [(n, type(m), _hooks(m), sorted(vars(m)), m.training) for n, m in comp.named_modules()],
            "params": [(n, id(p), p.requires_grad) for n, p in comp.named_parameters()],
            "state": {k: v.clone() for k, v in comp.state_dict().items()},
            "procs": {k: id(v) for k, v in getattr(comp, "attn_processors", {}).items()},
        }
    return snap


def _assert_same(before: dict, after: dict) -> None:
    assert after["global"] == before["global"]
    for name in before:
        if name == "global":
            continue
        b, a = before[name], after[name]
        assert a["modules"] == b["modules"], name
        assert a["params"] == b["params"], name
        assert list(a["state"]) == list(b["state"]), name
        assert all(torch.equal(a["state"][k], v) for k, v in b["state"].items()), name
        assert a["procs"] == b["procs"], name


# ----------------------------------------------------------------------------- the mapping
def test_every_registered_family_has_a_tiny_builder():
    """A family registered without an entry in tests/conformance.py fails here (and in every test below)."""
    assert set(FAMILIES) == set(family_names()), "tests/conformance.py FAMILIES must name every registered family"
    ids = [v.id for v in variants()]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("v", params())
def test_variant_builds_a_pipeline_of_its_family(v: Variant):
    pipe = v.build()
    fam = family_of(pipe)
    assert fam.name == v.family
    assert fam.text_length_option == (v.text_length is not None)


@pytest.mark.parametrize("v", params())
def test_tokens_layout_file_round_trip_and_refusals(v: Variant, tmp_path):
    """Tokens built for the model carry its family and widths; a tokens file loads back equal and
    `load_into` attaches it; more layers than the model has, and tokens of another family, are refused
    with errors naming the field."""
    from softrepa.family import describe_model

    pipe = v.build()
    info = describe_model(pipe)
    tokens = SoftTokens.for_model(pipe, CONFIG, seed=0)
    lay = tokens.layout
    assert (lay.family, lay.token_dim, lay.model_dim, lay.model_depth) == \
        (v.family, info.text_dim, info.model_dim, info.depth)
    path = softrepa.save_soft_tokens(tokens, tmp_path / "t.safetensors")
    loaded = softrepa.load_soft_tokens(path)
    assert loaded.layout == lay
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), tokens.parameters()))
    handle = softrepa.load_into(pipe, path)
    assert softrepa.attached_handle(pipe) is handle
    handle.remove()
    if info.depth:  # one token set per block: at most `depth` of them
        with pytest.raises(softrepa.SoftTokensError, match="layers"):
            SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=info.depth + 1))
    other = next(o for o in variants() if o.family != v.family)
    foreign = SoftTokens.for_model(other.build(), CONFIG, seed=0)
    with pytest.raises(softrepa.SoftTokensError, match=f"family: tokens are for '{other.family}', the model is "
                                                       f"'{v.family}'"):
        attach(pipe, foreign)
    assert softrepa.attached_handle(pipe) is None


# ----------------------------------------------------------------------------- the backbone
@pytest.mark.parametrize("v", params())
def test_backbone_latents_noise_target_and_denoise(v: Variant):
    """encode_images / decode_latents round the image size; the prediction has the latent's shape; a
    flow family noises linearly from x0 (t = 0) to the noise (t = 1000) with target noise - x0, an
    epsilon one predicts the noise (v-prediction: tests/test_vprediction.py)."""
    pipe = v.build()
    bb = backbone_for(pipe, **v.text_kw)
    x0, noise, cond = _latents(bb, 2)
    t = torch.tensor([250.0, 750.0])
    assert bb.decode_latents(x0).shape == (2, 3, RES, RES)
    with torch.no_grad():
        pred = bb.denoise(bb.add_noise(x0, noise, t), t, cond)
    assert pred.shape == x0.shape and torch.isfinite(pred).all()
    if bb.prediction == "flow":
        torch.testing.assert_close(bb.add_noise(x0, noise, torch.tensor([0.0, 1000.0])),
                                   torch.stack([x0[0], noise[1]]))
        torch.testing.assert_close(bb.target(x0, noise, t), noise - x0)
    else:
        assert bb.prediction == "epsilon"
        torch.testing.assert_close(bb.target(x0, noise, t), noise)


# ----------------------------------------------------------------------------- attach / remove / disabled
@pytest.mark.parametrize("v", params())
def test_a_pipeline_without_its_text_encoder_is_one_named_error(v: Variant):
    """Every family: prompts through a pipeline whose text encoder was not loaded raise one
    SoftrepaError naming the missing component (not a TypeError / AttributeError from inside)."""
    pipe = v.build()
    pipe.text_encoder = None
    with pytest.raises(softrepa.SoftrepaError, match=r"has no text_encoder\b.*load the pipeline with its text encoders"):
        backbone_for(pipe).encode_prompts(["a red circle"])


@pytest.mark.parametrize("v", params())
def test_attach_changes_the_output_and_remove_restores_everything(v: Variant):
    """attach changes the prediction; `handle.disabled()` is the vanilla model bit for bit and the tokens
    come back after it; remove() restores the output, the state dict (keys and values), the parameters,
    every hook dict of every module (a user's own hook kept in place), the attention processors. Twice."""
    pipe = v.build()
    bb = backbone_for(pipe, **v.text_kw)
    x_t, _, t, cond = _denoise_inputs(bb)
    den = softrepa.family.resolve_denoiser(pipe)
    user = den.register_forward_pre_hook(lambda mod, args: None)  # must survive attach / remove

    with torch.no_grad():
        plain = bb.denoise(x_t, t, cond)
        before = _snapshot(pipe)
        hooks0 = [_hooks(m) for m in den.modules()]
        for _ in range(2):
            handle = attach(pipe, _tokens(pipe))
            assert softrepa.attached_handle(pipe) is handle and handle.active
            assert [_hooks(m) for m in den.modules()] != hooks0
            with_tokens = bb.denoise(x_t, t, cond)
            assert (with_tokens - plain).abs().max() > 1e-3
            with handle.disabled():
                assert torch.equal(bb.denoise(x_t, t, cond), plain)
            assert handle.enabled and torch.equal(bb.denoise(x_t, t, cond), with_tokens)
            handle.remove()
            assert softrepa.attached_handle(pipe) is None and not handle.active
            _assert_same(before, _snapshot(pipe))
            assert torch.equal(bb.denoise(x_t, t, cond), plain)
    assert user.id in den._forward_pre_hooks
    user.remove()


@pytest.mark.parametrize("v", params())
def test_attach_twice_is_refused(v: Variant):
    pipe = v.build()
    tokens = _tokens(pipe)
    with attach(pipe, tokens):
        with pytest.raises(softrepa.SoftTokensError, match="already carries"):
            attach(pipe, _tokens(pipe))
    attach(pipe, tokens).remove()  # removed: attaching again is fine


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("v", params())
def test_gradients_reach_only_the_tokens_also_with_checkpointing(v: Variant):
    """Through the training path (frozen backbone): every token tensor gets a gradient, only the time
    buckets of the batch's timesteps, no model parameter gets one (nor is unfrozen); gradient
    checkpointing (blocks re-run in the backward pass) gives the same token gradients."""
    pipe = v.build()
    bb = backbone_for(pipe, **v.text_kw)
    bb.freeze()
    tokens = _tokens(pipe, std=0.1)
    x_t, target, t, cond = _denoise_inputs(bb)
    den = softrepa.family.resolve_denoiser(pipe)
    calls = []

    def grads():
        tokens.zero_grad(set_to_none=True)
        counter = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in den.modules()]
        try:
            with attach(pipe, tokens):
                (bb.denoise(x_t, t, cond) - target).pow(2).mean().backward()
        finally:
            for h in counter:
                h.remove()
        return [p.grad.clone() for p in tokens.parameters()]

    plain = grads()
    n_plain = len(calls)
    den.enable_gradient_checkpointing()
    den.train()
    try:
        checkpointed = grads()
    finally:
        den.disable_gradient_checkpointing()
        den.eval()
    assert len(calls) - n_plain > n_plain  # checkpointing re-ran blocks in the backward pass
    for name, module in pipeline_modules(pipe).items():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters()), name
    assert all(g.abs().sum() > 0 for g in plain)
    touched = (tokens.time.grad.abs().sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
    assert touched == [0, 50, 99]
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- pairs
@pytest.mark.parametrize("shared_t", [True, False])
@pytest.mark.parametrize("v", params())
def test_chunked_equals_plain(v: Variant, shared_t):
    """Exact contrastive gradients: the chunked two-pass computation == the plain single pass, for any
    chunk size (1, not dividing the pairs, all of them); the text encoders get no gradient."""
    from softrepa.pairs import contrastive_backward

    pipe = v.build()
    bb = backbone_for(pipe, **v.text_kw)
    bb.freeze()
    batch = pair_batch(bb, shared_t=shared_t, resolution=RES)
    tokens = pair_tokens(pipe)
    kw = {"tau": 0.07, "scale": 4.0, "denoise_weight": 0.0, **v.loss_kw}
    results = {}
    with attach(pipe, tokens):
        for chunk in (None, 1, 3, 5, 16):
            tokens.zero_grad(set_to_none=True)
            out = contrastive_backward(bb, batch, pair_chunk=chunk, loss_kwargs=kw)
            results[chunk] = (out.loss.item(), [p.grad.clone() for p in tokens.parameters()])
    ref_loss, ref_grads = results[None]
    assert any(g.abs().sum() > 0 for g in ref_grads)
    for chunk, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), chunk
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7 + 1e-4 * r.abs().max().item())
    assert all(p.grad is None for p in pipe.text_encoder.parameters())


@pytest.mark.parametrize("v", params())
def test_agsm_trains_both_sets_and_chunked_equals_plain(v: Variant):
    """AGSM through the same pair code: psi+ and psi- (sharing the time part) get exact gradients in
    any chunking and under gradient checkpointing, the EMA references none, the text encoders none."""
    import copy

    from softrepa.objectives import AGSM
    from softrepa.pairs import objective_backward

    pipe = v.build()
    bb = backbone_for(pipe, **v.text_kw)
    bb.freeze()
    batch = pair_batch(bb, shared_t=True, resolution=RES)
    pos = pair_tokens(pipe)
    neg = copy.deepcopy(pos)
    neg.time = pos.time  # the shared time part, as the trainer builds the two sets
    randomize_tokens(neg, seed=2)
    sets = {"positive": pos, "negative": neg}
    ema = {k: copy.deepcopy(t).requires_grad_(False) for k, t in sets.items()}
    for t in ema.values():
        randomize_tokens(t, seed=3, std=0.3)
    params_ = list({id(p): p for t in sets.values() for p in t.parameters()}.values())
    results = {}
    with attach(pipe, pos) as handle:
        def use_set(name, reference):
            return handle.carrying((ema if reference else sets)[name])

        den = softrepa.family.resolve_denoiser(pipe)
        for chunk, checkpointing in ((None, False), (1, False), (5, False), ("ckpt", True), (5, True)):
            for p in params_:
                p.grad = None
            if checkpointing:  # blocks re-run in the backward must see their own set's tokens
                den.enable_gradient_checkpointing()
                den.train()
            try:
                out = objective_backward(bb, batch, AGSM(tau=0.1, gamma_neg=1.0), use_set=use_set,
                                         pair_chunk=None if chunk == "ckpt" else chunk)
            finally:
                if checkpointing:
                    den.disable_gradient_checkpointing()
                    den.eval()
            results[chunk if not checkpointing or chunk == "ckpt" else f"ckpt {chunk}"] = (
                out.loss.item(), [p.grad.clone() for p in params_])
    ref_loss, ref_grads = results[None]
    assert pos.base.grad is not None and neg.base.grad is not None  # both sets trained
    assert results[None][1][0].abs().sum() > 0
    for chunk, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), chunk
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7 + 1e-4 * r.abs().max().item())
    assert all(p.grad is None for t in ema.values() for p in t.parameters())
    assert all(p.grad is None for p in pipe.text_encoder.parameters())


# ----------------------------------------------------------------------------- the stock pipeline
@pytest.mark.parametrize("v", params())
def test_stock_pipeline_generates_with_the_tokens_and_is_vanilla_after_remove(v: Variant, tmp_path):
    """The unmodified pipeline (a batch of two prompts of different lengths, both CFG branches where the
    pipeline has them): with tokens the images differ from vanilla at the same seeds; `disabled()` and
    remove() give vanilla bit for bit; tokens saved and loaded back with `load_into` give the same images."""
    skip_video(v, "the stock call returns .frames, not .images")
    pipe = v.build()
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)

    def generate():
        # the stock call as the family makes it (`Family.render`: one batched `pipe(...)` call, FLUX.3's
        # modular pipeline one call per prompt); a copy of the prompts: a pipeline may write into the list
        # it is given (ZImagePipeline 0.42.1 puts its chat template into the caller's prompts)
        images = family.render(pipe, list(PROMPTS), [torch.Generator().manual_seed(s) for s in (0, 1)], steps=2,
                               height=RES, width=RES, call_kwargs={**v.text_kw, **v.call_kw}, output_type="np")
        return np.stack(images)

    plain = generate()
    tokens = _tokens(pipe)
    with attach(pipe, tokens) as handle:
        with_tokens = generate()
        with handle.disabled():
            assert np.array_equal(generate(), plain)
    assert not handle.active  # the with block removed the hooks
    assert with_tokens.shape == plain.shape == (2, RES, RES, 3)
    assert np.abs(with_tokens - plain).max() > 1e-4
    assert np.array_equal(generate(), plain)  # removed: vanilla again
    path = softrepa.save_soft_tokens(tokens, tmp_path / "t.safetensors")
    with softrepa.load_into(pipe, path):
        assert np.array_equal(generate(), with_tokens)
    assert np.array_equal(generate(), plain)


# ----------------------------------------------------------------------------- FlowEdit
def _image(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("v", params())
def test_flowedit_identities(v: Variant):
    """The same prompt and the same CFG on both branches returns the source latent exactly, with and
    without tokens; n_max = 0 is the VAE round trip; another target prompt edits (seeded: the same
    edit twice), tokens change the edit, and after detaching it is the vanilla edit again."""
    skip_video(v, "no editing")
    from softrepa.edit import edit_image, edit_latents, encode_source, image_to_pixels, pixels_to_image
    pipe = v.build()
    bb = backbone_for(pipe)
    w, h = v.edit_size
    img = _image(w, h)
    z = encode_source(bb, image_to_pixels(img, (h, w))).detach()
    p = FlowEditParams(steps=4, n_max=3, src_cfg=2.0, tar_cfg=2.0)

    def run(src, tar):
        return edit_latents(pipe, z, [src], [tar], p, **v.text_kw)

    assert torch.equal(run("a red circle", "a red circle"), z)
    edited = run("a red circle", "a blue square")
    assert (edited - z).abs().max() > 1e-3
    assert torch.equal(run("a red circle", "a blue square"), edited)
    with attach(pipe, _tokens(pipe)):
        assert torch.equal(run("a red circle", "a red circle"), z)
        assert not torch.allclose(run("a red circle", "a blue square"), edited, atol=1e-4)
    assert torch.equal(run("a red circle", "a blue square"), edited)

    out = edit_image(pipe, img, "a red circle", "a blue square", FlowEditParams(steps=4, n_max=0), **v.text_kw)
    roundtrip = pixels_to_image(bb.decode_latents(z))
    assert out.size == img.size
    np.testing.assert_array_equal(np.asarray(out), np.asarray(roundtrip))


# ----------------------------------------------------------------------------- CLI on a saved folder
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> a folder with the variant's pipeline saved by `save_pretrained`, large random tokens
    (t.safetensors) and a three-image dataset (data/); made once per variant."""
    folders: dict[str, object] = {}

    def get(v: Variant):
        if v.id not in folders:
            root = tmp_path_factory.mktemp(v.id)
            pipe = v.build()
            pipe.save_pretrained(root / "model")
            softrepa.save_soft_tokens(_tokens(pipe), root / "t.safetensors")
            write_square_images(root / "data")
            folders[v.id] = root
        return folders[v.id]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("v", params(cli_only=True))
def test_train_cli_one_step_on_a_saved_folder(v: Variant, saved, tmp_path):
    from softrepa.pipeline import load_pipeline

    root = saved(v)
    pipe = load_pipeline(str(root / "model"))
    assert type(pipe).__name__ == type(v.build()).__name__
    out = tmp_path / "run"
    rc = main([
        "train", "--model", str(root / "model"), "--data", str(root / "data"), "--output_dir", str(out),
        "--resolution", str(RES), "--batch_size", "3", "--max_steps", "1", "--num_workers", "0",
        "--checkpoint_every", "1", "--log_every", "1", "--validation.every", "0", "--tokens.num_layers", "2",
        "--tokens.init", "normal", "--loss.tau", "2.0", *v.cli_text_args("--max_sequence_length"), "--no-progress"])
    assert rc == 0
    tokens = softrepa.load_soft_tokens(out / "tokens.safetensors")
    assert tokens.layout.family == v.family
    assert tokens.base.shape == SoftTokens.for_model(pipe, CONFIG).base.shape
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("v", params(cli_only=True))
def test_generate_compare_cli_on_a_saved_folder(v: Variant, saved, tmp_path):
    """`generate --compare`: vanilla and tokens images differ; the vanilla one is the stock pipeline
    with the family's default CFG at the same seed, bit for bit."""
    skip_video(v, "the comparison is against .images")
    from softrepa.pipeline import load_pipeline

    root = saved(v)
    rc = main([
        "generate", "--model", str(root / "model"), "--tokens", str(root / "t.safetensors"),
        "--prompts", "a red circle", "--seeds", "0", "--steps", "2", "--size", str(RES), *v.cli_text_args(),
        "--compare", "--no-progress", "--out", str(tmp_path / "gen")])
    assert rc == 0
    a, b = (tmp_path / "gen" / sub / "00000_s0.png" for sub in ("vanilla", "tokens"))
    assert a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes()
    assert (tmp_path / "gen" / "compare" / "00000.png").is_file()
    pipe = load_pipeline(str(root / "model"))
    fam = family_of(pipe)
    row = json.loads((tmp_path / "gen" / "vanilla" / "metadata.jsonl").read_text().splitlines()[0])
    assert (row["cfg"], row["steps"], row["family"]) == (fam.sampling.cfg, 2, v.family)
    ref = pipe(prompt="a red circle", height=RES, width=RES, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               **v.text_kw, **fam.guidance_kwargs(fam.sampling.cfg)).images[0]
    assert np.array_equal(np.asarray(Image.open(a).convert("RGB")), np.asarray(ref))


@pytest.mark.slow
@pytest.mark.parametrize("v", params(cli_only=True))
def test_edit_cli_on_a_saved_folder(v: Variant, saved, tmp_path):
    """`edit` with tokens: an output of the source's size, the run recorded with the CFGs of the family's
    with-tokens preset; without tokens, the same prompt and CFG on both branches gives exactly the
    n_max = 0 result (decode(encode(image)))."""
    skip_video(v, "no editing")
    root = saved(v)
    _image(30, 20).save(tmp_path / "src.png")
    common = ["edit", "--model", str(root / "model"), "--image", str(tmp_path / "src.png"), "--steps", "4",
              *v.cli_text_args(), "--no-progress"]
    assert main([*common, "--tokens", str(root / "t.safetensors"), "--source-prompt", "a red circle",
                 "--target-prompt", "a blue square", "--n-max", "3", "--out", str(tmp_path / "edits")]) == 0
    assert Image.open(tmp_path / "edits" / "src.png").size == (30, 20)
    row = json.loads((tmp_path / "edits" / "metadata.jsonl").read_text().splitlines()[0])
    assert (row["family"], row["n_max"], row["tokens"]) == (v.family, 3, str(root / "t.safetensors"))
    preset = FlowEditParams.preset(get_family(v.family), with_tokens=True)  # the CFGs of the tokens' preset
    assert (row["src_cfg"], row["tar_cfg"]) == (preset.src_cfg, preset.tar_cfg)

    same = [*common, "--source-prompt", "a red square", "--target-prompt", "a red square", "--source-cfg", "3.5",
            "--target-cfg", "3.5"]
    assert main([*same, "--n-max", "3", "--out", str(tmp_path / "same")]) == 0
    assert main([*same, "--n-max", "0", "--out", str(tmp_path / "none")]) == 0
    same_img, none_img = (np.asarray(Image.open(tmp_path / sub / "src.png").convert("RGB")) for sub in ("same", "none"))
    assert np.array_equal(same_img, none_img)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "edits" / "src.png").convert("RGB")), none_img)
