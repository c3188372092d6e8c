"""Regional compilation (`softrepa.compile_blocks`): same numbers as eager, exact attach / detach, no
graph breaks in a block, no recompilation after the first step.

Real inductor compilation on the CPU: each test compiles a tiny SD3 block (tens of seconds on two
cores the first time; inductor's on-disk cache makes repeats cheaper).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from softrepa import CompileConfig, SoftTokens, SoftTokensConfig, attach, compile_blocks
from softrepa.backbone import TextCond
from softrepa.compilation import repeated_blocks
from softrepa.errors import ConfigError, SoftTokensError
from softrepa.families.sd3 import SD3Backbone
from softrepa.pairs import PairBatch, contrastive_backward
from softrepa.tiny import tiny_sd3_transformer
from tests import conformance

# compiled kernels reorder float sums: agreement to fp32 round-off, not bit for bit
RTOL, ATOL = 1e-4, 1e-6


class _Pipe:
    def __init__(self, model):
        self.transformer, self.vae = model, None


def _setup(seed: int = 0, B: int = 3):
    model = tiny_sd3_transformer(num_layers=3, seed=seed).requires_grad_(False)
    tokens = SoftTokens.for_model(model, SoftTokensConfig(num_layers=2, num_tokens=2, init="normal"), seed=1)
    g = torch.Generator().manual_seed(seed)
    cond = TextCond(torch.randn(B, 7, 64, generator=g), torch.randn(B, 64, generator=g))
    batch = PairBatch(torch.randn(B, 16, 16, 16, generator=g), cond, [f"caption {i}" for i in range(B)],
                      torch.full((B,), 640.0), torch.randn(1, 16, 16, 16, generator=g))
    return model, tokens, batch


def _step(model, tokens, batch, chunk):
    tokens.zero_grad(set_to_none=True)
    # a tau near the tiny model's errors, so that the negatives carry gradient
    out = contrastive_backward(SD3Backbone(_Pipe(model)), batch, pair_chunk=chunk, loss_kwargs={"tau": 2.0})
    return out.loss.clone(), [p.grad.clone() for p in tokens.parameters()]


def _assert_grads_close(got, expected) -> None:
    """Per tensor, to RTOL of the tensor's own scale: token gradients here are ~1e-6, below any
    fixed absolute tolerance that would still mean something."""
    for g, e in zip(got, expected):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e, rtol=RTOL, atol=RTOL * float(e.abs().max()))


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("chunk", [None, 4])
def test_compiled_step_equals_eager_and_does_not_recompile(chunk):
    """Loss and token gradients of a compiled step == eager (tolerance above), with all pairs in one
    pass and with the exact two-pass chunked path (9 pairs in chunks of 4: a partial last chunk);
    the second and third steps compile nothing new."""
    model, tokens, batch = _setup()
    handle = attach(model, tokens)
    loss_e, grads_e = _step(model, tokens, batch, chunk)
    assert any(g.abs().sum() > 0 for g in grads_e)

    torch._dynamo.reset()  # the blocks' code object may hold earlier tests' graphs, whose guards could pass
    before = _graphs()
    compiled = compile_blocks(model)
    # hitting the recompile limit would silently run eager (and still match): make it an error
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        loss_c, grads_c = _step(model, tokens, batch, chunk)  # first step: compiles
    after_first = _graphs()
    assert after_first > before, "nothing was compiled"
    with torch._dynamo.config.patch(error_on_recompile=True):  # steps 2 and 3 must reuse every graph
        for _ in range(2):
            loss_again, grads_again = _step(model, tokens, batch, chunk)
    assert _graphs() == after_first, "a later step recompiled"
    torch.testing.assert_close(loss_c, loss_e, rtol=RTOL, atol=ATOL)
    _assert_grads_close(grads_c, grads_e)
    torch.testing.assert_close(loss_again, loss_c, rtol=0, atol=0)  # compiled is deterministic
    compiled.remove()
    handle.remove()


def test_compiled_blocks_under_gradient_checkpointing_equal_eager():
    """The big-model recipes train with gradient checkpointing *and* compile: diffusers then calls each
    block through `torch.utils.checkpoint` (hooks and the compiled forward run again in the backward
    pass). Loss and token gradients == the eager step without checkpointing; the next step compiles nothing."""
    model, tokens, batch = _setup(seed=2)
    handle = attach(model, tokens)
    calls: list[int] = []
    counter = model.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    loss_e, grads_e = _step(model, tokens, batch, 4)
    eager_calls = len(calls)
    model.enable_gradient_checkpointing()
    torch._dynamo.reset()  # the blocks' code object keeps earlier tests' graphs, whose guards would pass here
    before = _graphs()
    compiled = compile_blocks(model)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            loss_c, grads_c = _step(model, tokens, batch, 4)
        assert _graphs() > before, "nothing was compiled"
        # 9 pairs in chunks of 4: 3 no-grad + 3 grad calls, and the 3 grad calls again in the backward
        assert (eager_calls, len(calls) - eager_calls) == (6, 9), "checkpointing did not re-run the blocks"
        counter.remove()
        after_first = _graphs()
        with torch._dynamo.config.patch(error_on_recompile=True):
            loss_again, _ = _step(model, tokens, batch, 4)
        assert _graphs() == after_first, "a later step recompiled"
    finally:
        compiled.remove()
        model.disable_gradient_checkpointing()
        handle.remove()
    torch.testing.assert_close(loss_c, loss_e, rtol=RTOL, atol=ATOL)
    _assert_grads_close(grads_c, grads_e)
    torch.testing.assert_close(loss_again, loss_c, rtol=0, atol=0)


def test_attach_disable_and_detach_stay_exact_with_compiled_blocks():
    """On a compiled model: attaching changes the output, `disabled()` and `remove()` give the compiled
    vanilla output bit for bit (the hooks run eagerly around the compiled forward, never baked in);
    removing the compilation gives the eager model's output bit for bit."""
    model, tokens, batch = _setup()
    x = batch.latents[:2]
    kw = dict(hidden_states=x, timestep=torch.full((2,), 500.0), encoder_hidden_states=batch.cond.embeds[:2],
              pooled_projections=batch.cond.pooled[:2], return_dict=False)
    with torch.no_grad():
        eager = model(**kw)[0]
        compiled = compile_blocks(model)
        vanilla = model(**kw)[0]
        handle = attach(model, tokens)
        with_tokens = model(**kw)[0]
        with handle.disabled():
            disabled = model(**kw)[0]
        handle.remove()
        detached = model(**kw)[0]
        compiled.remove()
        eager_again = model(**kw)[0]
    torch.testing.assert_close(vanilla, eager, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(with_tokens, vanilla, atol=1e-4)
    assert torch.equal(disabled, vanilla) and torch.equal(detached, vanilla)
    assert torch.equal(eager_again, eager)
    assert all("forward" not in b.__dict__ for b in model.transformer_blocks)


def test_a_block_compiles_without_graph_breaks():
    """dynamo's own account of a block's forward with tokens prepended: one graph, no breaks."""
    model, tokens, batch = _setup()
    block = model.transformer_blocks[0]
    hs = torch.randn(2, 64, 32)  # (B, n_img, D)
    ehs = torch.randn(2, 9, 32)  # (B, m + n_txt, D)
    temb = torch.randn(2, 32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block.forward)(hs, ehs, temb)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_repeated_blocks_come_from_the_model_or_the_family():
    sd3 = tiny_sd3_transformer(num_layers=2)
    assert repeated_blocks(sd3) == list(sd3.transformer_blocks)  # SD3 declares none: the family's
    from softrepa.tiny import tiny_sd15_pipeline

    unet = tiny_sd15_pipeline().unet
    blocks = repeated_blocks(unet)
    assert blocks and all(type(b).__name__ == "BasicTransformerBlock" for b in blocks)  # the model's own


def test_compile_config_and_double_compile_errors():
    with pytest.raises(ConfigError, match="CUDA graphs"):
        CompileConfig(mode="reduce-overhead")
    model = tiny_sd3_transformer(num_layers=2)
    compiled = compile_blocks(model, CompileConfig(backend="eager"))
    with pytest.raises(SoftTokensError, match="already compiled"):
        compile_blocks(model)
    compiled.remove()
    compile_blocks(model, CompileConfig(backend="eager")).remove()


def test_train_config_compile_mode_is_checked():
    from softrepa.config import load_config

    with pytest.raises(ConfigError, match="compile_mode"):
        load_config(None, {"compile": True, "compile_mode": "reduce-overhead"})


def test_train_cli_compile_flag(tmp_path):
    """`softrepa train --compile` sets the config field; the run trains with compiled blocks."""
    import yaml

    from softrepa.cli import main
    from softrepa.tiny import tiny_sd3_pipeline
    import numpy as np
    from PIL import Image

    tiny_sd3_pipeline(num_layers=2).save_pretrained(tmp_path / "sd3")
    data = tmp_path / "data"
    data.mkdir()
    for i, (name, rgb) in enumerate({"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20)}.items()):
        a = np.full((32, 32, 3), 255, np.uint8)
        a[8:24, 8 + i:24 + i] = rgb
        Image.fromarray(a).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {name} square")
    out = tmp_path / "run"
    args = ["train", "--compile", "--model", str(tmp_path / "sd3"), "--data", str(data), "--out", str(out),
            "--resolution", "32", "--batch_size", "3", "--max_steps", "2", "--num_workers", "0",
            "--checkpoint_every", "2", "--validation.every", "0", "--tokens.num_layers", "1",
            "--max_sequence_length", "8", "--no-progress"]
    before = _graphs()
    assert main(args) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["compile"] is True
    assert _graphs() > before, "the run did not compile its blocks"



@pytest.mark.parametrize("v", conformance.params())
def test_every_family_compiles_its_blocks_whole_with_tokens(v):
    """Every family's repeated blocks (each variant of tests/conformance.py) trace into whole graphs
    (fullgraph: a graph break is an error) with its token hooks attached, and give the eager prediction.
    dynamo's "eager" backend checks the tracing without inductor's code generation; the inductor path
    is covered on SD3 above."""
    from softrepa.backbone import backbone_for

    pipe = v.build()
    bb = backbone_for(pipe, **v.text_kw)
    bb.freeze()
    batch = conformance.pair_batch(bb)
    x_t = bb.add_noise(batch.latents, batch.noise.expand_as(batch.latents), batch.t)
    with attach(pipe, conformance.pair_tokens(pipe)), torch.no_grad():
        eager = bb.denoise(x_t, batch.t, batch.cond)
        compiled = compile_blocks(pipe, CompileConfig(backend="eager"))
        try:
            out = bb.denoise(x_t, batch.t, batch.cond)
        finally:
            compiled.remove()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
