"""What a run folder promises (docs/reliability.md): one run per folder, one writer at a time,
clean failures on full disks and damaged checkpoints, exact resume through a chain of real kills,
and a named error or a counted skip for every bad input."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import softrepa
from softrepa.cli import main
from softrepa.runlock import OWNER_FILE, RunFolderBusy, RunLock
from tests.test_train import _args, toy_files  # noqa: F401  (toy_files is a fixture)

REPO = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _tokens_equal(a: Path, b: Path) -> bool:
    ta, tb = softrepa.load_soft_tokens(a), softrepa.load_soft_tokens(b)
    return torch.equal(ta.base, tb.base) and (ta.time is None or torch.equal(ta.time, tb.time))


@pytest.fixture
def one_thread():
    """Bit-equal resumes must not depend on how OpenMP splits reductions between processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ one run per folder
def test_a_new_run_into_a_finished_runs_folder_is_refused_and_changes_nothing(toy_files, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(toy_files, run, 2)) == 0
    before = _digest(run)
    assert main(_args(toy_files, run, 3, "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "--resume" in err and "--overwrite" in err and "config.yaml" in err
    assert _digest(run) == before  # byte for byte: nothing written, nothing deleted


def test_overwrite_removes_the_old_run_first_and_never_mixes(toy_files, tmp_path):
    run = tmp_path / "run"
    assert main(_args(toy_files, run, 4)) == 0
    (run / "notes.txt").write_text("mine")  # not a run artefact: stays
    assert main(_args(toy_files, run, 2, "--overwrite")) == 0
    assert _steps(run) == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000002"]
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_again_cleanly(toy_files, tmp_path, one_thread):
    full, run = tmp_path / "full", tmp_path / "run"
    assert main(_args(toy_files, full, 3)) == 0
    assert main(_args(toy_files, run, 1, "--checkpoint_every", "5")) == 0
    import shutil

    shutil.rmtree(run / "checkpoints")  # as if killed after logging step 1, before any checkpoint
    (run / "tokens.safetensors").unlink()
    assert main(_args(toy_files, run, 3, "--resume")) == 0
    assert _steps(run) == [1, 2, 3]
    assert _tokens_equal(full / "tokens.safetensors", run / "tokens.safetensors")


def test_resume_into_a_folder_without_a_run_is_an_error(toy_files, tmp_path, capsys):
    assert main(_args(toy_files, tmp_path / "typo", 2, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_another_runs_checkpoint_never_resumes_into_a_folder_holding_a_run(toy_files, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(toy_files, a, 2)) == 0
    assert main(_args(toy_files, b, 4)) == 0
    before = _digest(b)
    assert main(_args(toy_files, b, 4, "--resume", str(a / "checkpoints" / "step_0000002"))) == 2
    assert "holds another run" in capsys.readouterr().err
    assert _digest(b) == before
    # into an empty folder it starts a new run from that state
    assert main(_args(toy_files, tmp_path / "c", 3, "--resume", str(a / "checkpoints" / "step_0000002"))) == 0
    assert _steps(tmp_path / "c") == [3]


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(toy_files, tmp_path, capsys):
    mine = tmp_path / "project"
    (mine / "validation").mkdir(parents=True)
    (mine / "validation" / "data.csv").write_text("keep")
    assert main(_args(toy_files, mine, 2, "--overwrite")) == 0  # no run there: nothing removed
    assert (mine / "validation" / "data.csv").read_text() == "keep"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("name: my experiment\n")
    assert main(_args(toy_files, other, 2, "--overwrite")) == 2
    assert "not a softrepa run" in capsys.readouterr().err
    assert (other / "config.yaml").read_text() == "name: my experiment\n"


# ------------------------------------------------------------------------------ one writer
def test_a_second_lock_on_a_folder_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderBusy, match=rf"pid {os.getpid()} on .* since "):
            RunLock(tmp_path).acquire()
    # a holder killed without releasing leaves only its owner record (the OS drops the lock)
    (tmp_path / OWNER_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / OWNER_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_second_process_on_a_training_folder_exits_at_once_and_the_first_finishes_cleanly(toy_files, tmp_path,
                                                                                            capsys):
    run = tmp_path / "run"
    slow = textwrap.dedent(f"""
        import sys, time
        import softrepa.train as T
        step = T.Trainer.train_step
        def slow_step(self, batch):  # a run long enough for the second process to meet it
            time.sleep(1.0)
            return step(self, batch)
        T.Trainer.train_step = slow_step
        from softrepa.cli import main
        sys.exit(main({_args(toy_files, run, 6, '--checkpoint_every', '3')!r}))
    """)
    first = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file():  # the first run is training
        assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "timeout"
        time.sleep(0.05)
    import softrepa.train as T

    def never(*a, **k):
        raise AssertionError("the second run read data or loaded a model")

    with pytest.MonkeyPatch.context() as mp:  # "at once": refused before any data or model is touched
        mp.setattr(T, "build_dataset", never)
        mp.setattr(T, "load_pipeline", never)
        for extra in ((), ("--resume",), ("--overwrite",)):  # whatever the second asks, the folder is taken
            assert main(_args(toy_files, run, 6, *extra)) == 2
            err = capsys.readouterr().err
            assert f"in use by pid {first.pid} on " in err and "Traceback" not in err, err
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def test_generate_output_folder_in_use_is_refused(tmp_path):
    from softrepa.generate import generate_images
    from softrepa.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline()
    with RunLock(tmp_path / "gen", "output folder"):
        with pytest.raises(RunFolderBusy, match="output folder is in use"):
            generate_images(pipe, ["a red square"], [0], tmp_path / "gen", steps=1, height=32, width=32, progress=False)


# ------------------------------------------------------------------------------ full disks, damaged checkpoints
def test_disk_full_inside_a_checkpoint_is_one_clear_error_and_resume_is_exact(toy_files, tmp_path, monkeypatch,
                                                                            one_thread, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(toy_files, full, 4)) == 0
    import softrepa.checkpoint as ck

    real = ck.atomic_write_bytes

    def failing(path, data):
        if Path(path).name == "state.pt" and ".step_0000004." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", failing)
    assert main(_args(toy_files, part, 4)) == 2
    err = capsys.readouterr().err
    assert "checkpoint step 4 not written" in err and "disk full" in err and "step_0000002 is intact" in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1 and "Traceback" not in err  # one line
    ckpts = part / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name != "latest") == ["step_0000002"]  # no partial folder
    assert (ckpts / "latest").read_text().strip() == "step_0000002"
    monkeypatch.setattr(ck, "atomic_write_bytes", real)
    assert main(_args(toy_files, part, 4, "--resume")) == 0
    assert _tokens_equal(full / "tokens.safetensors", part / "tokens.safetensors")
    assert _steps(part) == [1, 2, 3, 4]


def test_a_truncated_latest_state_falls_back_to_the_previous_checkpoint(toy_files, tmp_path, one_thread, caplog):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(toy_files, full, 6)) == 0
    assert main(_args(toy_files, part, 4)) == 0  # checkpoints 2 and 4
    state = part / "checkpoints" / "step_0000004" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        assert main(_args(toy_files, part, 6, "--resume")) == 0
    assert "step_0000004/state.pt is damaged" in caplog.text and "previous checkpoint step_0000002" in caplog.text
    assert _tokens_equal(full / "tokens.safetensors", part / "tokens.safetensors")
    assert _steps(part) == [1, 2, 3, 4, 5, 6]


def _torchrun(args: list[str], port_offset: int, script: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    target = [str(script)] if script else ["-m", "softrepa.cli"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(31500 + (os.getpid() + port_offset) % 1000), *target, *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def test_two_ranks_resume_from_the_checkpoint_rank_0_chooses(toy_files, tmp_path):
    """torchrun, 2 ranks. (1) Rank 1 alone sees the latest checkpoint as damaged: rather than resume
    from an older one while rank 0 resumes from the latest (ranks training apart), every rank stops
    with one error naming rank 1, and nothing in the folder changes. (2) The checkpoint really damaged:
    both ranks fall back to the previous one together; the result equals an uninterrupted 2-rank run."""
    full, part = tmp_path / "full", tmp_path / "part"
    two = ["--batch_size", "2", "--no-progress"]
    proc = _torchrun(_args(toy_files, full, 6) + two, 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _torchrun(_args(toy_files, part, 4) + two, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rank1_damage = tmp_path / "rank1_damage.py"
    rank1_damage.write_text(textwrap.dedent("""
        import os, sys
        import softrepa.train as T
        from softrepa.errors import RunFolderError
        real = T.load_checkpoint
        def load(path, *args, **kwargs):
            if os.environ.get("RANK") == "1" and "step_0000004" in str(path):
                raise RunFolderError(f"{path}/state.pt is damaged (seen by rank 1 only)")
            return real(path, *args, **kwargs)
        T.load_checkpoint = load
        from softrepa.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    before = _digest(part)
    proc = _torchrun(_args(toy_files, part, 6, "--resume") + two, 2, script=rank1_damage)
    assert proc.returncode != 0
    assert "rank 1 could not resume from the checkpoint rank 0 chose" in proc.stderr, proc.stderr[-3000:]
    after = _digest(part)
    assert {k: v for k, v in after.items() if k != "config.yaml"} == \
        {k: v for k, v in before.items() if k != "config.yaml"}  # no step trained, nothing moved or removed

    state = part / "checkpoints" / "step_0000004" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    proc = _torchrun(_args(toy_files, part, 6, "--resume") + two, 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "previous checkpoint step_0000002" in proc.stderr
    assert (part / "checkpoints" / "damaged.step_0000004").is_dir()
    assert _tokens_equal(full / "tokens.safetensors", part / "tokens.safetensors")
    assert _steps(part) == [1, 2, 3, 4, 5, 6]


def test_leftovers_of_killed_writers_are_removed_at_start(toy_files, tmp_path):
    run = tmp_path / "run"
    assert main(_args(toy_files, run, 2)) == 0
    junk = [run / ".latest.abc.tmp", run / ".tokens.safetensors.x1.tmp", run / "checkpoints" / ".latest.q.tmp"]
    for j in junk:
        j.write_bytes(b"half")
    (run / "checkpoints" / ".step_0000004.123-ab.tmp").mkdir()
    assert main(_args(toy_files, run, 3, "--resume")) == 0
    assert not any(p.name.endswith(".tmp") for p in run.rglob(".*"))


def test_resuming_an_older_checkpoint_then_again_leaves_no_gap(toy_files, tmp_path, one_thread):
    """Resume from step 2 of a 4-step run, stop at 3, resume `latest`: steps 1..5 logged once each."""
    run = tmp_path / "run"
    assert main(_args(toy_files, run, 4)) == 0
    assert main(_args(toy_files, run, 3, "--resume", str(run / "checkpoints" / "step_0000002"))) == 0
    assert not (run / "checkpoints" / "step_0000004").exists()  # the abandoned continuation
    assert main(_args(toy_files, run, 5, "--resume")) == 0
    assert _steps(run) == [1, 2, 3, 4, 5]


def test_a_chain_of_real_sigkills_ends_as_an_uninterrupted_run(toy_files, tmp_path, one_thread):
    """SIGKILL at random moments (writes slowed down so that some kills land inside checkpoint writes),
    resume after each: the tokens equal an uninterrupted run's and every step is logged once.

    Each kill waits until the process being killed has itself finished a random step (it says so in a
    progress file), then a random fraction of a second, so the kills happen whatever the machine's
    speed (a kill after a fixed delay could come after a fast machine had already finished)."""
    steps = 8
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(toy_files, full, steps)) == 0
    script = textwrap.dedent("""
        import sys, time
        import torch
        torch.set_num_threads(1)
        import softrepa.runfolder as rf
        real = rf.atomic_write_bytes
        def slow(path, data):  # widen the window in which a kill lands inside a write
            time.sleep(0.15)
            return real(path, data)
        rf.atomic_write_bytes = slow
        import softrepa.checkpoint as ck
        ck.atomic_write_bytes = slow
        import os
        import softrepa.train as T
        step = T.Trainer.train_step
        def slow_step(self, batch):  # every step leaves time for a kill after it, and says it is done
            time.sleep(0.2)
            row = step(self, batch)
            with open(os.environ["PROGRESS"], "w") as f:
                f.write(f"{os.getpid()} {self.step}")
            return row
        T.Trainer.train_step = slow_step
        from softrepa.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    rng = random.Random(0)
    targets = sorted(rng.sample(range(1, steps), 4))  # the step after which each kill comes
    progress = tmp_path / "progress"
    env = dict(os.environ, OMP_NUM_THREADS="1", PROGRESS=str(progress))

    def reached(pid: int, target: int) -> bool:
        try:
            who, done = map(int, progress.read_text().split())
        except (OSError, ValueError):  # not written yet, or read mid-write
            return False
        return who == pid and done >= target

    kills = 0
    while True:
        args = _args(toy_files, part, steps, *(["--resume"] if kills else []))
        proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills == len(targets):
            break
        deadline = time.time() + 180
        while not reached(proc.pid, targets[kills]) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        assert proc.poll() is None, f"run {kills + 1} ended before its kill: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    rc = proc.wait(timeout=300)
    assert rc == 0, proc.stderr.read()[-2000:]
    assert _tokens_equal(full / "tokens.safetensors", part / "tokens.safetensors")
    assert _steps(part) == list(range(1, steps + 1))


# ------------------------------------------------------------------------------ bad inputs
def test_invalid_utf8_captions_are_named_or_counted_in_every_source(tmp_path):
    import numpy as np
    from PIL import Image

    from softrepa.data import build_dataset
    from softrepa.errors import DatasetError

    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_bytes(b"a red square" if i else b"a r\xe9d square")  # latin-1
    ds = build_dataset(str(folder), 16)
    assert len(ds) == 2 and ds.skipped["caption_not_utf8"] == 1

    jsonl = tmp_path / "m.jsonl"
    rows = [json.dumps({"image": str(folder / f"{i}.png"), "caption": "a square"}).encode() for i in range(3)]
    rows[1] = b'{"image": "' + str(folder / "1.png").encode() + b'", "caption": "caf\xe9"}'
    jsonl.write_bytes(b"\n".join(rows) + b"\n")
    ds = build_dataset(str(jsonl), 16)
    assert len(ds) == 2 and ds.skipped["malformed_row"] == 1

    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes(b"image,caption\n" + str(folder / "0.png").encode() + b",ok\n"
                         + str(folder / "1.png").encode() + b",caf\xe9\n")
    with pytest.raises(DatasetError, match=r"m\.csv.*invalid UTF-8 on line 3"):
        build_dataset(str(csv_path), 16)


def test_empty_prompt_is_an_error(tmp_path, capsys):
    assert main(["generate", "--model", "@assets/toy_sd3", "--prompts", "", "--out", str(tmp_path / "g")]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_evaluate_names_a_truncated_image(tmp_path):
    from softrepa.evaluation.common import load_rgb
    from softrepa.errors import MetricError
    from PIL import Image

    path = tmp_path / "x.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(MetricError, match=r"x\.png: not a readable image"):
        load_rgb(path)


def test_edit_manifest_checks_every_source_image_before_editing(tmp_path):
    from softrepa.edit import edit_manifest
    from softrepa.tiny import tiny_sd3_pipeline
    from PIL import Image

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (32, 32), (10, 200, 10)).save(good)
    bad.write_bytes(b"not a png")
    rows = [{"image": str(good), "source_prompt": "a", "target_prompt": "b"},
            {"image": str(bad), "source_prompt": "a", "target_prompt": "b"}]
    with pytest.raises(ValueError, match=r"bad\.png: not a readable image"):
        edit_manifest(tiny_sd3_pipeline(num_layers=2), rows, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.png"))  # nothing edited before the check


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_import_official_refuses_a_malicious_pickle_naming_the_global(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"dc_tokens": _Payload()}, path, pickle_protocol=2)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc = main(["import-official", "--family", "sd3", "--dc-tokens", str(path), "--out", str(tmp_path / "t")])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "PWNED").exists()
    assert "evil.pth" in err and ("posix.system" in err or "os.system" in err), err
    assert "weights_only=False" not in err


def test_saved_config_records_absolute_paths_and_resumes_from_another_directory(toy_files, tmp_path, monkeypatch,
                                                                               one_thread):
    import yaml

    monkeypatch.chdir(toy_files)
    run = tmp_path / "run"
    args = _args(toy_files, run, 3)
    args[args.index("--data") + 1] = "data"  # relative to the cwd
    assert main(args[:args.index("--max_steps") + 1] + ["2"] + args[args.index("--max_steps") + 2:]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"] == str(toy_files / "data")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "--out", str(run), "--max_steps", "3", "--no-progress"]) == 0
    assert _steps(run) == [1, 2, 3]
