"""Speed options of the training step (`softrepa.speedups`, issue 25), what a CPU can check.

The options (SDPA backend, fp8 linear layers) validate their values, refuse what the device lacks in
one line before the model loads, reach the step's forward (and leave the flags as they were), and do
not change the step's numbers where the CPU runs them. fp8 itself needs a GPU with float8 tensor
cores: here only its refusals and the module swap's bookkeeping (with a stand-in for torchao) are
checked; `benchmarks/speed_precision.py` measures its precision on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from softrepa import attach
from softrepa.backbone import backbone_for
from softrepa.cli import main
from softrepa.config import load_config, parse_overrides, save_config
from softrepa.errors import ConfigError, MissingDependencyError
from softrepa.pairs import contrastive_backward
from softrepa.resume import check_resumable
from softrepa.speedups import (ATTENTION_BACKENDS, SpeedConfig, attention_backend, check_attention, check_fp8,
                               check_speed, convert_fp8, fp8_eligible)
from softrepa.tiny import tiny_sd3_pipeline, tiny_sd3_transformer
from tests import conformance

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _one_line(e: pytest.ExceptionInfo, option: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and option in msg, msg
    return msg


# ------------------------------------------------------------------ options and refusals
def test_speed_section_defaults_off_and_validates_from_config_and_overrides():
    cfg = load_config(None, {})
    assert cfg.speed == SpeedConfig() and cfg.speed.describe() == "default"
    cfg = load_config(None, parse_overrides(["--speed.attention", "math", "--speed.fp8", "true"]))
    assert (cfg.speed.attention, cfg.speed.fp8) == ("math", True)
    assert cfg.speed.describe() == "attention math + fp8"
    with pytest.raises(ConfigError) as e:
        load_config(None, parse_overrides(["--speed.attention", "fast"]))
    assert all(name in _one_line(e, "speed.attention") for name in ATTENTION_BACKENDS)
    with pytest.raises(ConfigError) as e:
        load_config(None, parse_overrides(["--speed.fp8", "maybe"]))
    _one_line(e, "speed.fp8")
    with pytest.raises(ConfigError) as e:
        load_config(None, parse_overrides(["--speed.turbo", "true"]))
    assert "speed.turbo" in str(e.value)


def test_cpu_runs_auto_math_and_flash_and_refuses_the_cuda_only_backends():
    for name in ("auto", "math", "flash"):  # torch has a CPU flash kernel; "auto" picks it
        check_attention(name, CPU, half=False)
    for name in ("efficient", "cudnn"):
        with pytest.raises(ConfigError) as e:
            check_attention(name, CPU, half=True)
        assert "needs a CUDA GPU" in _one_line(e, "speed.attention")
    with pytest.raises(ConfigError) as e:
        check_attention("flash", torch.device("mps"), half=True)
    assert "auto or math" in _one_line(e, "speed.attention")


def test_cuda_backend_rules_by_capability_build_and_dtype(monkeypatch):
    """A stand-in GPU: the rules depend on the capability, the torch build and the compute dtype."""
    import softrepa.speedups as S

    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(S, "_capability", lambda device: (7, 5))
    check_attention("efficient", CUDA, half=False)  # every CUDA GPU, fp32 too
    for name in ("flash", "cudnn"):
        with pytest.raises(ConfigError) as e:
            check_attention(name, CUDA, half=True)
        assert "8.0" in _one_line(e, "speed.attention") and "7.5" in str(e.value)
    monkeypatch.setattr(S, "_capability", lambda device: (9, 0))
    for name in ("flash", "cudnn"):
        check_attention(name, CUDA, half=True)
        with pytest.raises(ConfigError) as e:
            check_attention(name, CUDA, half=False)
        assert "bf16" in _one_line(e, "speed.attention")
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        check_attention("flash", CUDA, half=True)
    assert "not built" in _one_line(e, "speed.attention")


def test_fp8_refused_on_cpu_on_older_gpus_and_without_torchao(monkeypatch):
    import softrepa.speedups as S

    with pytest.raises(ConfigError) as e:
        check_fp8(CPU)
    assert "8.9" in _one_line(e, "speed.fp8")
    with pytest.raises(ConfigError) as e:  # the device check comes first: installing torchao would not help
        check_speed(SpeedConfig(fp8=True), CPU, half=True)
    _one_line(e, "speed.fp8")
    monkeypatch.setattr(S, "_capability", lambda device: (8, 0))  # A100: no float8 tensor cores
    with pytest.raises(ConfigError) as e:
        check_fp8(CUDA)
    assert "8.0" in _one_line(e, "speed.fp8")
    monkeypatch.setattr(S, "_capability", lambda device: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(MissingDependencyError) as e:
        check_fp8(CUDA)
    assert "pip install torchao" in _one_line(e, "speed.fp8")
    with pytest.raises(MissingDependencyError):
        convert_fp8(nn.Linear(16, 16))


# ------------------------------------------------------------------ the attention context
def _sdpa_spy(monkeypatch, with_grad_mode: bool = False) -> list[tuple[bool, ...]]:
    """Record ([grad enabled,] flash enabled, math enabled) at every SDPA call diffusers makes."""
    calls: list[tuple[bool, ...]] = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        grad = (torch.is_grad_enabled(),) if with_grad_mode else ()
        calls.append(grad + (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_math_flash_and_auto_give_the_same_loss_and_gradients_on_a_tiny_sd3(monkeypatch):
    pipe = tiny_sd3_pipeline()
    bb = backbone_for(pipe)
    bb.freeze()
    batch = conformance.pair_batch(bb, n=4)
    tokens = conformance.pair_tokens(pipe)
    calls = _sdpa_spy(monkeypatch)
    results, flags = {}, {}
    with attach(pipe, tokens):
        for name in ("auto", "math", "flash"):
            tokens.zero_grad(set_to_none=True)
            calls.clear()
            with attention_backend(name):
                # tau near the tiny model's errors (~3.8): the contrastive gradient is not ~0 there
                out = contrastive_backward(bb, batch, loss_kwargs={"tau": 4.0})
            results[name] = (out.loss.detach(), torch.cat([p.grad.flatten() for p in tokens.parameters()
                                                           if p.grad is not None]))
            flags[name] = set(calls)
    assert flags["math"] == {(False, True)} and flags["flash"] == {(True, False)} and flags["auto"] == {(True, True)}
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()  # restored
    loss, grad = results["auto"]
    assert float(grad.norm()) > 0
    for name in ("math", "flash"):  # other kernels, other float sums: fp32 round-off apart (bf16: ~1e-2)
        torch.testing.assert_close(results[name][0], loss, rtol=1e-5, atol=0)
        assert float((results[name][1] - grad).norm() / grad.norm()) < 1e-4, name
    torch.testing.assert_close(results["flash"][1], grad, rtol=0, atol=0)  # on a CPU, auto is torch's flash


def test_a_backend_that_cannot_run_a_call_is_one_line_naming_the_option():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ConfigError) as e:
        with attention_backend("efficient"):
            F.scaled_dot_product_attention(q, q, q)
    assert "use auto" in _one_line(e, "speed.attention")
    with pytest.raises(ValueError, match="boom"):  # other errors pass through unchanged
        with attention_backend("math"):
            raise ValueError("boom")


# ------------------------------------------------------------------ the fp8 swap (stand-in torchao)
class _FakeFloat8Linear(nn.Linear):
    pass


def _fake_torchao(monkeypatch) -> list[str]:
    """torchao.float8.convert_to_float8_training as torchao does it: swap the Linear modules the
    filter accepts for a subclass sharing their weight. Returns the fqns it was offered."""
    offered: list[str] = []

    def convert_to_float8_training(model, module_filter_fn=None, config=None):
        for fqn, module in list(model.named_modules()):
            if type(module) is nn.Linear:
                offered.append(fqn)
                if module_filter_fn(module, fqn):
                    new = _FakeFloat8Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                            device="meta")
                    new.weight, new.bias = module.weight, module.bias
                    parent, _, name = fqn.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, name, new)
        return model

    pkg, sub = types.ModuleType("torchao"), types.ModuleType("torchao.float8")
    sub.convert_to_float8_training = convert_to_float8_training
    pkg.float8 = sub
    monkeypatch.setitem(sys.modules, "torchao", pkg)
    monkeypatch.setitem(sys.modules, "torchao.float8", sub)
    return offered


def test_fp8_swap_takes_only_eligible_linears_and_restores_the_exact_model(monkeypatch):
    offered = _fake_torchao(monkeypatch)
    model = tiny_sd3_transformer(num_layers=2).requires_grad_(False)
    model.proj_out.register_forward_hook(lambda m, i, o: None)  # a hooked layer must keep its hook
    before = dict(model.named_modules())
    x = dict(hidden_states=torch.randn(1, 16, 8, 8), encoder_hidden_states=torch.randn(1, 5, 64),
             pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]))
    with torch.no_grad():
        ref = model(**x, return_dict=False)[0]
    swap = convert_fp8(model)
    swapped = {fqn for fqn, m in model.named_modules() if isinstance(m, _FakeFloat8Linear)}
    expected = {fqn for fqn in offered if fp8_eligible(before[fqn])}
    assert swapped == expected == set(swap.converted) and len(swap) > 4
    assert "proj_out" not in swapped and type(model.proj_out) is nn.Linear
    for fqn in swapped:  # the weights are shared, never copied
        assert model.get_submodule(fqn).weight is before[fqn].weight
    swap.remove()
    assert all(model.get_submodule(fqn) is before[fqn] for fqn in swapped)
    with torch.no_grad():
        assert torch.equal(model(**x, return_dict=False)[0], ref)
    swap.apply()  # the same float8 objects again (compiled code keeps its cache)
    assert all(model.get_submodule(fqn) is swap.converted[fqn] for fqn in swapped)
    with swap:
        pass
    assert all(model.get_submodule(fqn) is before[fqn] for fqn in swapped)


# ------------------------------------------------------------------ the trainer and the CLI
@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    from softrepa.tiny import tiny_sd15_pipeline

    root = tmp_path_factory.mktemp("speed")
    tiny_sd15_pipeline().save_pretrained(root / "sd15")
    (root / "data").mkdir()
    for i, rgb in enumerate([(230, 20, 20), (20, 20, 230), (20, 200, 20)]):
        a = np.full((40, 40, 3), 255, np.uint8)
        a[8 + i:28 + i, 10:30] = rgb
        Image.fromarray(a).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(f"a square of colour {i}\n")
    return root


def _train(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(root / "sd15"), "--data", str(root / "data"), "--output_dir", str(out),
            "--resolution", "32", "--batch_size", "3", "--max_steps", "1", "--num_workers", "0",
            "--validation.every", "0", "--loss.tau", "2.0", "--no-progress", *extra]


@pytest.mark.parametrize("extra", [("--speed.attention", "cudnn"), ("--speed.attention", "efficient"),
                                   ("--speed.fp8", "true")], ids=["cudnn", "efficient", "fp8"])
def test_cli_refuses_what_the_cpu_lacks_in_one_line_before_the_model_loads(toy_files, tmp_path, monkeypatch,
                                                                           capsys, extra):
    import softrepa.train as T

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the speed options were checked")

    monkeypatch.setattr(T, "load_pipeline", no_load)
    assert main(_train(toy_files, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("softrepa train: error: speed.") and extra[0][2:] in err[0], err


def test_the_trainer_runs_the_step_on_the_chosen_backend(toy_files, tmp_path, monkeypatch):
    """The denoiser's attention in the step (with grad: all pairs in one pass) runs on the chosen
    backend; the frozen text encoders, outside the step (no grad), keep torch's choice."""
    calls = _sdpa_spy(monkeypatch, with_grad_mode=True)
    assert main(_train(toy_files, tmp_path / "math", "--speed.attention", "math")) == 0
    step = {c[1:] for c in calls if c[0]}
    assert step == {(False, True)} and {c[1:] for c in calls if not c[0]} == {(True, True)}
    assert torch.backends.cuda.flash_sdp_enabled()  # and the flags are back after the step
    calls.clear()
    assert main(_train(toy_files, tmp_path / "flash", "--speed.attention", "flash")) == 0  # torch's CPU kernel
    assert {c[1:] for c in calls if c[0]} == {(True, False)}
    calls.clear()
    assert main(_train(toy_files, tmp_path / "auto")) == 0
    assert {c[1:] for c in calls if c[0]} == {(True, True)}


def test_speed_options_may_change_on_resume(tmp_path):
    """Like compile: how the step is computed, not what it trains."""
    saved = tmp_path / "config.yaml"
    save_config(load_config(None, {}), saved)
    check_resumable(load_config(None, parse_overrides(["--speed.attention", "math", "--speed.fp8", "true"])), saved)
    with pytest.raises(ConfigError):
        check_resumable(load_config(None, {"batch_size": 3}), saved)


# ------------------------------------------------------------------ the benchmark scripts' CPU paths
def _run(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_speed_precision_runs_on_cpu_and_skips_what_needs_a_gpu(tmp_path):
    out = tmp_path / "precision.md"
    proc = _run(sys.executable, "benchmarks/speed_precision.py", "--tiny", "--steps", "2", "--lockstep", "1",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert "(the spread)" in rows["fp32 (spread)"]
    for ran in ("attention=math", "attention=flash"):
        cells = [c.strip() for c in rows[ran].split("|")]
        assert 0.99 < float(cells[3]) <= 1.0 + 1e-6 and cells[7] in ("yes", "NO")
    for skipped in ("attention=efficient", "attention=cudnn", "fp8", "compile+attention=cudnn+fp8"):
        assert "skipped: speed." in rows[skipped]


def test_train_step_side_by_side_takes_the_speed_options(tmp_path):
    out = tmp_path / "step.md"
    proc = _run(sys.executable, "benchmarks/train_step.py", "--tiny", "--side-by-side", "--batch", "2",
                "--text-len", "8", "--chunk", "none", "--iters", "1", "--warmup", "0", "--attention", "auto", "math",
                "cudnn", "--fp8", "--out", str(out), env={"TORCHDYNAMO_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "| softrepa compiled | attention math | all |" in text
    assert "| skipped | attention cudnn: speed.attention" in text and "| skipped | fp8: speed.fp8" in text


@pytest.mark.slow  # ~30 s: four stages, each its own process
def test_gpu_suite_dry_run_runs_every_default_stage_on_cpu(tmp_path):
    proc = _run("bash", "benchmarks/gpu_suite.sh", "--dry-run",
                env={"PYTHON": sys.executable, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for stage in ("b4", "precision", "b16", "sample"):
        assert f"== {stage}: rc 0" in proc.stdout
    tables = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"train_step_dry-run-cpu_b4_speed.md", "speed_precision_dry-run-cpu.md",
            "train_step_dry-run-cpu_b16_speed.md", "sample_step_dry-run-cpu.md"} <= tables
    assert not (ROOT / "benchmarks" / "results" / "speed_precision_dry-run-cpu.md").exists()
