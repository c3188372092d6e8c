"""The training loop: CLI run artefacts, exact resume after a hard kill, divergence, bad data."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import softrepa
from softrepa.cli import main
from softrepa.config import ConfigError
from softrepa.streams import STREAMS_VERSION

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20), "yellow": (230, 230, 20),
           "black": (10, 10, 10), "purple": (150, 20, 200)}


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    from softrepa.tiny import tiny_sd15_pipeline

    tiny_sd15_pipeline().save_pretrained(root / "sd15")
    data = root / "data"
    data.mkdir()
    for i, (name, rgb) in enumerate(COLOURS.items()):
        a = np.full((40, 40, 3), 255, np.uint8)
        a[8 + i:28 + i, 10:30] = rgb
        Image.fromarray(a).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {name} square\na square in {name}\n")
    return root


def _args(root: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--model", str(root / "sd15"), "--data", str(root / "data"), "--output_dir", str(out),
            "--resolution", "32", "--batch_size", "3", "--max_steps", str(steps), "--num_workers", "0",
            "--checkpoint_every", "2", "--log_every", "1", "--validation.every", "0", "--tokens.init", "normal",
            "--loss.tau", "2.0", "--loss.denoise_weight", "1.0", "--lr", "0.05", *extra]


def test_cli_run_writes_checkpoint_log_and_grid(toy_files, tmp_path):
    out = tmp_path / "run"
    args = _args(toy_files, out, 3, "--validation.every", "3", "--validation.steps", "2",
                 "--validation.resolution", "32", "--validation.prompts", "a red square,a blue square")
    assert main(args) == 0
    assert (out / "tokens.safetensors").is_file() and (out / "config.yaml").is_file()
    ck = out / "checkpoints" / "step_0000003"
    assert {p.name for p in ck.iterdir()} >= {"tokens.safetensors", "state.pt", "config.yaml", "tokens.json"}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"loss", "accuracy", "lr", "pairs_per_s"} <= set(r) for r in rows)
    grid = Image.open(out / "validation" / "step_0000003.png")
    assert grid.size[0] > 2 * 32 and grid.size[1] >= 2 * 32
    assert (out / "curves.png").is_file()
    tokens = softrepa.load_soft_tokens(out / "tokens.safetensors")
    assert tokens.layout.family == "sd15"


def test_resume_after_hard_kill_equals_uninterrupted(toy_files, tmp_path):
    # One thread in every process: bit-equality must not depend on how a machine's OpenMP
    # splits reductions between the killed child and this process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_equals_uninterrupted(toy_files, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _resume_equals_uninterrupted(toy_files, tmp_path, *extra):
    full = tmp_path / "full"
    assert main(_args(toy_files, full, 4, *extra)) == 0
    part = tmp_path / "part"
    # A separate process that dies with os._exit right after writing the step-2 checkpoint.
    script = textwrap.dedent(f"""
        import os, sys
        import torch
        torch.set_num_threads(1)
        import softrepa.train as T
        orig = T.Trainer.checkpoint
        def checkpoint(self):
            path = orig(self)
            if self.step == 2:
                os._exit(137)
            return path
        T.Trainer.checkpoint = checkpoint
        from softrepa.cli import main
        sys.exit(main({_args(toy_files, part, 4, *extra)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert not (part / "tokens.safetensors").exists()
    assert main(_args(toy_files, part, 4, *extra, "--resume")) == 0
    a = softrepa.load_soft_tokens(full / "tokens.safetensors")
    b = softrepa.load_soft_tokens(part / "tokens.safetensors")
    assert torch.equal(a.base, b.base) and torch.equal(a.time, b.time)
    start = softrepa.load_soft_tokens(full / "checkpoints" / "step_0000002" / "tokens.safetensors")
    assert not torch.equal(start.base, a.base)  # training moved the tokens
    la = [json.loads(x)["loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert la == lb
    return full, part


def test_agsm_resume_after_hard_kill_equals_uninterrupted(toy_files, tmp_path):
    """--objective agsm: psi+, psi- (sharing the time part) and both EMA copies survive a hard kill
    exactly; the final tokens.safetensors is the online psi+, tokens_negative.safetensors psi-."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full, part = _resume_equals_uninterrupted(toy_files, tmp_path, "--objective", "agsm",
                                                  "--agsm.ema_decay", "0.5", "--agsm.gamma_neg", "1.0")
    finally:
        torch.set_num_threads(threads)
    last = "checkpoints/step_0000004"
    for name in (f"{last}/tokens_negative.safetensors", f"{last}/ema_positive.safetensors",
                 f"{last}/ema_negative.safetensors"):
        a, b = softrepa.load_soft_tokens(full / name), softrepa.load_soft_tokens(part / name)
        assert torch.equal(a.base, b.base) and torch.equal(a.time, b.time), name
    # the final file holds both sets, psi+ as its main one, and names the objective
    final = full / "tokens.safetensors"
    assert softrepa.token_sets_of(final) == ["positive", "negative"]
    assert not (full / "tokens_negative.safetensors").exists()
    pos = softrepa.load_soft_tokens(final)
    neg = softrepa.load_soft_tokens(final, token_set="negative")
    assert torch.equal(softrepa.load_soft_tokens(final, token_set="positive").base, pos.base)
    b_neg = softrepa.load_soft_tokens(part / "tokens.safetensors", token_set="negative")
    assert torch.equal(neg.base, b_neg.base) and torch.equal(neg.time, b_neg.time)
    assert torch.equal(neg.base, softrepa.load_soft_tokens(full / last / "tokens_negative.safetensors").base)
    from softrepa.artifact import read_metadata

    assert read_metadata(final)["objective"] == "agsm"
    ema_pos = softrepa.load_soft_tokens(full / last / "ema_positive.safetensors")
    ema_neg = softrepa.load_soft_tokens(full / last / "ema_negative.safetensors")
    assert torch.equal(pos.time, neg.time) and torch.equal(ema_pos.time, ema_neg.time)  # one shared time part
    assert not torch.equal(pos.base, neg.base) and not torch.equal(pos.base, ema_pos.base)
    assert torch.equal(pos.base, softrepa.load_soft_tokens(full / last / "tokens.safetensors").base)  # online psi+
    ema_2 = softrepa.load_soft_tokens(full / "checkpoints" / "step_0000002" / "ema_positive.safetensors")
    assert not torch.equal(ema_2.base, ema_pos.base)  # the EMA moved between the checkpoints
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "positive", "negative", "accuracy"} <= set(rows[0])
    assert all(r["loss"] == pytest.approx(r["positive"] + r["negative"], rel=1e-6) for r in rows)


def test_agsm_ema_starts_as_a_copy_and_follows_the_decay(toy_files, tmp_path):
    from softrepa.config import load_config, parse_overrides
    from softrepa.train import Trainer

    args = _args(toy_files, tmp_path / "run", 2, "--objective", "agsm", "--agsm.ema_decay", "0.75")[1:]
    cfg = load_config(None, parse_overrides(args))
    trainer = Trainer(cfg, progress=False)
    try:
        pos, neg = trainer.token_sets["positive"], trainer.token_sets["negative"]
        assert neg.time is pos.time and not torch.equal(neg.base, pos.base)
        assert len(trainer.optimizer.param_groups[0]["params"]) == 3  # psi+ base, psi- base, the shared time
        for name, ema in trainer.ema_sets.items():
            online = trainer.token_sets[name]
            assert torch.equal(ema.base, online.base) and ema.base is not online.base and not ema.base.requires_grad
        expected = {n: [e.base.clone(), e.time.clone()] for n, e in trainer.ema_sets.items()}  # exact copies
        update = trainer._update_ema

        def spy():  # the EMA recurrence from the online tokens after each optimizer step
            for n, online in trainer.token_sets.items():
                expected[n] = [0.75 * e + 0.25 * o.detach() for e, o in zip(expected[n], (online.base, online.time))]
            update()

        trainer._update_ema = spy
        start = {n: t.base.clone() for n, t in trainer.token_sets.items()}
        trainer.lock.release()
        trainer.train()
        for name, ema in trainer.ema_sets.items():
            assert not torch.equal(trainer.token_sets[name].base, start[name])  # both sets trained
            torch.testing.assert_close(ema.base, expected[name][0], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(ema.time, expected[name][1], rtol=1e-6, atol=1e-7)
        assert trainer.ema_sets["negative"].time is trainer.ema_sets["positive"].time
    finally:
        if trainer.lock is not None:
            trainer.lock.release()


def _steps_losses(run: Path) -> tuple[list[int], list[float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def test_resume_past_a_checkpoint_logs_each_step_once(toy_files, tmp_path):
    """A run stopped at step 3 (checkpoint at 2) and resumed logs steps 1..5 once, as an uninterrupted run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full, part = tmp_path / "full", tmp_path / "part"
        assert main(_args(toy_files, full, 5)) == 0
        # the stopped run got one step past its step-2 checkpoint, and logged it
        assert main(_args(toy_files, part, 3)) == 0
        assert main(_args(toy_files, part, 5, "--resume", str(part / "checkpoints" / "step_0000002"))) == 0
    finally:
        torch.set_num_threads(threads)
    steps, losses = _steps_losses(part)
    assert steps == sorted(set(steps))  # strictly increasing: no step twice
    assert (steps, losses) == _steps_losses(full)
    assert steps == [1, 2, 3, 4, 5]


def test_trim_metrics_drops_later_and_cut_rows(tmp_path):
    from softrepa.resume import trim_metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "loss": 0.8}\n{"step": 4, "lo')
    assert trim_metrics(log, 2) == 2  # step 3, and the row the kill cut short
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'
    assert trim_metrics(log, 2) == 0 and trim_metrics(tmp_path / "missing.jsonl", 2) == 0


def test_checkpoint_state_does_not_grow_with_the_step(toy_files, tmp_path):
    """No per-step history in state.pt: the step-6 state is no larger than the step-2 one."""
    out = tmp_path / "run"
    assert main(_args(toy_files, out, 6, "--keep_checkpoints", "3")) == 0
    sizes = {s: (out / "checkpoints" / f"step_{s:07d}" / "state.pt").stat().st_size for s in (2, 4, 6)}
    assert sizes[6] == sizes[2], sizes
    state = torch.load(out / "checkpoints" / "step_0000006" / "state.pt", weights_only=True)
    assert state["extra"] == {"streams": STREAMS_VERSION}  # which random streams the run draws from


def _has_tensorboard() -> bool:
    # accelerate's TensorBoard tracker takes either package
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


@pytest.mark.skipif(_has_tensorboard(), reason="tensorboard is installed: the error path cannot happen")
def test_log_with_tensorboard_without_the_package_is_an_error(tmp_path):
    from softrepa.config import load_config
    from softrepa.train import Trainer

    cfg = load_config(None, {"log_with": "tensorboard", "output_dir": str(tmp_path / "run"), "model": "unused"})
    # raised before the (here non-existent) model is loaded: accelerate itself only warns
    with pytest.raises(ConfigError, match=r"log_with.*pip install tensorboard.*softrepa\[tensorboard\]"):
        Trainer(cfg)


@pytest.mark.skipif(not _has_tensorboard(), reason="needs tensorboard (pip install 'softrepa[tensorboard]')")
def test_log_with_tensorboard_writes_events(toy_files, tmp_path):
    out = tmp_path / "run"
    assert main(_args(toy_files, out, 2, "--log_with", "tensorboard")) == 0
    assert list(out.rglob("events.out.tfevents*"))


def test_linear_tau_schedule_reaches_the_loss(toy_files, tmp_path, monkeypatch):
    """`loss.tau_schedule: linear`: the logged i2t loss is the formula with tau(t) = tau_min + (tau_max - tau_min) t / 1000."""
    import softrepa.objectives.softrepa as objective
    from softrepa.loss import linear_tau

    seen = []
    orig = objective.softrepa_loss

    def spy(E, t, **kw):
        seen.append((E.detach().double(), torch.as_tensor(t).double(), kw))
        return orig(E, t, **kw)

    monkeypatch.setattr(objective, "softrepa_loss", spy)
    out = tmp_path / "run"
    # "neg" logits and small temperatures: the tiny model's errors differ by ~1e-3 between prompts,
    # so only a tau of that order moves the loss visibly away from log(3)
    # t pinned at 100 (tau 0.0019): at a large t the tiny model's errors are too alike for any tau
    assert main(_args(toy_files, out, 1, "--loss.form", "neg", "--loss.tau_schedule", "linear",
                      "--loss.tau_min", "0.001", "--loss.tau_max", "0.01", "--t_min", "100", "--t_max", "101")) == 0
    (E, t, kw), = seen
    assert isinstance(kw["tau"], linear_tau)

    def i2t(tau):  # CE of each image row over the prompts; captions all differ, so nothing masked
        logits = -E / tau
        return float((torch.logsumexp(logits, 1) - logits.diagonal()).mean())

    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["i2t"]
    assert logged == pytest.approx(i2t((0.001 + 0.009 * t / 1000).reshape(-1, 1)), rel=1e-5)
    assert float(t[0]) == 100.0
    assert logged != pytest.approx(i2t(2.0), rel=1e-2)  # the config's constant tau gives another loss


def test_nan_loss_stops_and_keeps_last_checkpoint(toy_files, tmp_path, monkeypatch):
    import softrepa.pairs as pairs

    out = tmp_path / "nan"
    assert main(_args(toy_files, out, 2)) == 0
    good = (out / "checkpoints" / "step_0000002" / "tokens.safetensors").read_bytes()
    orig = pairs.pair_errors
    monkeypatch.setattr(pairs, "pair_errors", lambda *a, **k: orig(*a, **k) * float("nan"))
    from softrepa.config import load_config, parse_overrides
    from softrepa.train import Trainer, TrainingDiverged

    cfg = load_config(None, parse_overrides(_args(toy_files, out, 4)[1:]))
    with pytest.raises(TrainingDiverged, match="step 3.*step_0000002"):
        Trainer(cfg).train(resume=True)
    assert (out / "checkpoints" / "step_0000002" / "tokens.safetensors").read_bytes() == good
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_bad_data_is_a_clear_error(toy_files, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = _args(toy_files, tmp_path / "r", 1)
    args[args.index("--data") + 1] = str(empty)
    assert main(args) == 2
    assert str(empty) in capsys.readouterr().err
    args[args.index("--data") + 1] = str(tmp_path / "missing")
    assert main(args) == 2


def test_corrupt_sample_does_not_stop_training(toy_files, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(toy_files / "data", data)
    (data / "0.png").write_bytes(b"not a png at all")
    (data / "1.txt").write_text("   \n")
    args = _args(toy_files, tmp_path / "r", 2)
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 0


def _union_common(toy_files: Path) -> list[str]:
    return ["--resolution", "32", "--max_steps", "2", "--num_workers", "0", "--validation.every", "0",
            "--tokens.init", "normal", "--loss.tau", "2.0", "--loss.symmetric", "true", "--lr", "0.05",
            "--model", str(toy_files / "sd15"), "--data", str(toy_files / "data")]


# every caption names one colour: "opposite" colour pairs give each image exactly one hard negative,
# so no random choice is involved and the rank layout cannot change which negatives are drawn
HARD = ["--negatives.per_image", "1", "--negatives.swap", "[]",
        "--negatives.flip", "[[red, blue], [green, yellow], [black, purple]]"]


@pytest.mark.parametrize("chunk,hard", [("3", False), ("null", False), ("3", True)])
def test_two_process_gloo_equals_single_process_union_batch(toy_files, tmp_path, chunk, hard):
    """torchrun, 2 CPU ranks x 2 images (negatives gathered across ranks) == 1 process x 4 images;
    also with per-image hard negatives (their error rows are gathered like E's)."""
    common = _union_common(toy_files) + (HARD if hard else [])
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), "-m", "softrepa.cli", "train",
                           "--output_dir", str(dist_out), "--batch_size", "2", "--pair_chunk", chunk, *common],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", "--output_dir", str(single_out), "--batch_size", "4", *common]) == 0
    _assert_union_batch_equal(dist_out, single_out)
    if hard:  # the hard negatives were really scored
        rows = [json.loads(x) for x in (dist_out / "metrics.jsonl").read_text().splitlines()]
        assert all("hard_accuracy" in r for r in rows)


@pytest.mark.parametrize("chunk", ["5", "null"])
def test_agsm_two_processes_equal_single_process_union_batch(toy_files, tmp_path, chunk):
    """--objective agsm under torchrun, 2 CPU ranks x 2 images == 1 process x 4 images: the loss
    reads every pair's prediction, EMA reference and target, gathered across ranks."""
    common = _union_common(toy_files) + ["--objective", "agsm", "--agsm.gamma_neg", "1.0", "--agsm.ema_decay", "0.5"]
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29700 + os.getpid() % 1000), "-m", "softrepa.cli", "train",
                           "--output_dir", str(dist_out), "--batch_size", "2", "--pair_chunk", chunk, *common],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", "--output_dir", str(single_out), "--batch_size", "4", *common]) == 0
    _assert_union_batch_equal(dist_out, single_out)
    neg_d = softrepa.load_soft_tokens(dist_out / "tokens.safetensors", token_set="negative")
    neg_s = softrepa.load_soft_tokens(single_out / "tokens.safetensors", token_set="negative")
    torch.testing.assert_close(neg_d.base, neg_s.base, atol=2e-4, rtol=0)  # psi- too


def test_accelerate_launch_two_processes_equal_single_process_union_batch(toy_files, tmp_path):
    """`accelerate launch`, 2 CPU processes x 2 images == 1 process x 4 images (as under torchrun).

    accelerate's `--cpu` starts ONE process whatever `--num_processes` says (its simple launcher;
    several CPU processes need MPI), so the two CPU ranks come from `--multi_gpu` with no visible
    GPU: accelerate's torch.distributed launcher, and gloo since CUDA is hidden.
    """
    common = _union_common(toy_files)
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    # no accelerate config file may be read (nor written) from the user's home: a fresh HF_HOME
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(30500 + os.getpid() % 1000),
                           "-m", "softrepa.cli", "train", "--output_dir", str(dist_out), "--batch_size", "2", *common],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", "--output_dir", str(single_out), "--batch_size", "4", *common]) == 0
    _assert_union_batch_equal(dist_out, single_out)


def test_accelerate_cpu_single_process_launch_warns(monkeypatch, caplog):
    from softrepa.train import _warn_single_process_launch

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with caplog.at_level(logging.WARNING, logger="softrepa.train"):
        _warn_single_process_launch(world=2)
        assert not caplog.records  # really distributed: nothing to say
        _warn_single_process_launch(world=1)
    assert "single process" in caplog.text and "torchrun" in caplog.text


def _assert_union_batch_equal(dist_out: Path, single_out: Path) -> None:
    a = softrepa.load_soft_tokens(dist_out / "tokens.safetensors")
    b = softrepa.load_soft_tokens(single_out / "tokens.safetensors")
    # Same math, different float summation order across ranks; Adam's g / sqrt(v) turns that noise
    # into tiny update differences on near-zero gradient entries: allow 0.4% of one lr step.
    torch.testing.assert_close(a.base, b.base, atol=2e-4, rtol=0)
    torch.testing.assert_close(a.time, b.time, atol=2e-4, rtol=0)
    assert (a.base - b.base).abs().mean() < 1e-5
    la = [json.loads(x)["loss"] for x in (dist_out / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (single_out / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(toy_files, tmp_path, precision):
    """bf16 autocast and fp16 autocast + GradScaler (chunked path) train and stay finite."""
    out = tmp_path / precision
    assert main(_args(toy_files, out, 2, "--mixed_precision", precision, "--pair_chunk", "4")) == 0
    tokens = softrepa.load_soft_tokens(out / "tokens.safetensors")
    assert torch.isfinite(tokens.base).all() and tokens.base.dtype == torch.float32


def test_resume_uses_the_saved_config_and_refuses_a_different_one(toy_files, tmp_path, capsys):
    """`--resume` without --config continues the run as configured; a config that trains
    differently is refused (naming the field) instead of silently mixing two recipes."""
    out = tmp_path / "run"
    assert main(_args(toy_files, out, 2)) == 0
    # only the run folder and a longer max_steps: everything else comes from out/config.yaml
    assert main(["train", "--output_dir", str(out), "--resume", "--max_steps", "3"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    capsys.readouterr()
    assert main(_args(toy_files, out, 4, "--resume", "--batch_size", "2")) == 2
    err = capsys.readouterr().err
    assert "batch_size: 3 -> 2" in err and "Resume without --config" in err
    assert main(["train", "--resume"]) == 2
    assert "needs the run's folder" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_run_training_claims_the_run_folder_before_anything_loads(toy_files, tmp_path, monkeypatch):
    """The library, not the CLI, refuses another run's folder (and --resume with --overwrite) at once."""
    import softrepa.train as T
    from softrepa.config import load_config, parse_overrides
    from softrepa.errors import RunFolderError

    def never(*a, **k):
        raise AssertionError("data or model loaded before the run folder was claimed")

    monkeypatch.setattr(T, "build_dataset", never)
    monkeypatch.setattr(T, "load_pipeline", never)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: other\ntokens: {}\nloss: {}\n")
    cfg = load_config(None, parse_overrides(_args(toy_files, run, 1)[1:]))
    with pytest.raises(RunFolderError, match="holds another run"):
        T.run_training(cfg)
    with pytest.raises(ConfigError, match="give one of them"):
        T.run_training(cfg, resume=True, overwrite=True)
    assert [p.name for p in run.iterdir() if not p.name.startswith(".softrepa")] == ["config.yaml"]  # the lock stays
    assert (run / "config.yaml").read_text() == "model: other\ntokens: {}\nloss: {}\n"
