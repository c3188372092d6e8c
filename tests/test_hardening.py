"""Issue 26, resource exhaustion and tracebacks: every input is checked before it allocates, and what a
user can type ends as one line with exit code 2 (`softrepa.checks`), before any model loads.

The silently-wrong values and the user's files are `tests/test_hardening_inputs.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import softrepa
from softrepa.cli import main
from softrepa.config import load_config, parse_overrides
from softrepa.errors import ConfigError, DatasetError, SoftTokensError
from softrepa.tokens import SoftTokens, TokenLayout

SRC = str(Path(softrepa.__file__).resolve().parents[1])


def one_line_error(argv: list[str], capsys, monkeypatch=None) -> str:
    """Run the CLI: exit 2, one line on stderr, no traceback, and no model loaded; returns the line."""
    if monkeypatch is not None:
        import softrepa.cli.common as common

        def no_model(*a, **k):  # these inputs must be refused before the model loads
            raise AssertionError("the model was loaded")

        monkeypatch.setattr(common, "_load_model", no_model)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not ln.startswith(("INFO", "WARNING"))]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"softrepa {argv[0]}: error: "), err
    return lines[0]


def tokens_file(path: Path, layout: dict | None = None, base: torch.Tensor | None = None,
                raw_layout: str | None = None) -> Path:
    """A tokens file whose header says `layout` (or `raw_layout`) over a small real tensor."""
    from safetensors.torch import save_file

    real = TokenLayout("sd3", 8, 8, 2, 0, "block", (0,), (), 0)
    tensors = {"base": base if base is not None else SoftTokens(real).base.detach()}
    header = raw_layout if raw_layout is not None else json.dumps({**real.to_dict(), **(layout or {})})
    save_file(tensors, str(path), metadata={"softrepa_layout": header, "softrepa_version": "x"})
    return path


# ------------------------------------------------------------------------------ resource exhaustion
MEMORY_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, resource, sys
    from softrepa.cli import main
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # MB (Linux: KB)
    start, out = peak(), {}
    for name, argv in json.loads(sys.argv[1]).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        out[name] = [code, err.getvalue(), peak() - start]
    print(json.dumps(out))
""")


def test_size_cases_fail_in_bounded_memory_before_anything_loads(tmp_path):
    """A 136-byte option or a small file that declares a huge size is one line, and the process never
    grows by more than 200 MB (peak RSS from `resource.getrusage`, measured in a fresh process)."""
    huge = tokens_file(tmp_path / "huge.safetensors", {"token_dim": 50_000_000})
    wide = tokens_file(tmp_path / "wide.safetensors", {"token_dim": 4096, "num_tokens": 1024})  # within bounds
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 48 KB file, 400 M pixels
    Image.new("1", (10000, 10000)).save(tmp_path / "bomb1.png")  # 100 M: PIL only warns
    Image.new("RGB", (16, 16)).save(tmp_path / "small.png")
    model = "@assets/toy_sd3"
    cases = {
        "info_huge_layout": ["info", str(huge)],
        "info_layout_vs_tensor": ["info", str(wide)],
        "seeds": ["generate", "--model", model, "--prompts", "x", "--seeds", "0-1000000000", "--out", str(tmp_path / "g")],
        "size": ["edit", "--model", model, "--image", str(tmp_path / "small.png"), "--source-prompt", "a",
                 "--target-prompt", "b", "--size", "100000", "--out", str(tmp_path / "e")],
        "bomb": ["edit", "--model", model, "--image", str(tmp_path / "bomb.png"), "--source-prompt", "a",
                 "--target-prompt", "b", "--out", str(tmp_path / "e")],
        "bomb_warned_by_pil": ["edit", "--model", model, "--image", str(tmp_path / "bomb1.png"), "--source-prompt",
                               "a", "--target-prompt", "b", "--out", str(tmp_path / "e")],
        "num_tokens": ["train", "--config", "toy_sd3", "--tokens.num_tokens", "100000000", "--print-config"],
        "time_buckets": ["train", "--config", "toy_sd3", "--tokens.time_buckets", "100000000", "--print-config"],
        "resolution": ["train", "--config", "toy_sd3", "--resolution", "800000", "--print-config"],
    }
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"info_huge_layout": "'token_dim' must be <= 65536 (1..65536), got 50000000",
                "info_layout_vs_tensor": "tensor 'base' has shape (1, 2, 8), layout expects (1, 1024, 4096)",
                "seeds": "--seeds: '0-1000000000' makes more than 100000 seeds",
                "size": "--size: 100000x100000 is above the limit of 8192",
                "bomb": "bomb.png: not a readable image file (DecompressionBombError",
                "bomb_warned_by_pil": "10000x10000 pixels, above the limit",
                "num_tokens": "num_tokens must be <= 1024 (1..1024), got 100000000",
                "time_buckets": "time_buckets must be <= 1000 (0..1000)",
                "resolution": "resolution must be <= 8192 (8..8192)"}
    for name, (code, err, grown_mb) in res.items():
        assert code == 2 and "Traceback" not in err and expected[name] in err, (name, err)
        assert grown_mb < 200, (name, grown_mb)


def test_generate_refuses_more_images_than_the_limit(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(20)))
    line = one_line_error(["generate", "--model", "@assets/toy_sd3", "--prompts", str(prompts), "--seeds",
                           "0-99999", "--out", str(tmp_path / "g")], capsys, monkeypatch)
    assert "20 x 100000 images, more than the limit of 1000000" in line


@pytest.mark.parametrize("option,value,message", [
    ("--max-sequence-length", "0", "--max-sequence-length must be >= 1 (1..4096), got 0"),
    ("--max-sequence-length", "10000000", "--max-sequence-length must be <= 4096 (1..4096)"),
    ("--steps", "0", "--steps must be >= 1 (1..10000), got 0"),
    ("--steps", "100000000", "--steps must be <= 10000 (1..10000)"),
    ("--seeds", "99999999999999999999", "does not fit in 64 bits"),
    ("--seeds", "9" * 5000, "cannot parse"),
    ("--size", "9" * 5000, "cannot parse"),
])
def test_generate_sizes_steps_and_text_lengths_are_bounded(tmp_path, capsys, monkeypatch, option, value, message):
    line = one_line_error(["generate", "--model", "@assets/toy_sd3", "--prompts", "x", option, value,
                           "--out", str(tmp_path / "g")], capsys, monkeypatch)
    assert message in line


@pytest.mark.parametrize("argv,message", [
    (["--seed", "99999999999999999999999"], "--seed must be <= 18446744073709551615"),
    (["--bins", "100000000"], "--bins must be <= 1000 (1..1000)"),
    (["--batch-size", "100000"], "--batch-size must be <= 4096 (2..4096)"),
    (["--resolution", "100000"], "--resolution must be <= 8192 (8..8192)"),
    (["--scale", "nan"], "--scale must be a finite number"),
    (["--max-sequence-length", "0"], "--max-sequence-length must be >= 1 (1..4096)"),
])
def test_diagnose_options_are_bounded_before_the_model_loads(tmp_path, capsys, monkeypatch, argv, message):
    import softrepa.cli.diagnose as diagnose

    monkeypatch.setattr(diagnose, "run_diagnosis", lambda *a, **k: pytest.fail("the diagnosis ran"))
    line = one_line_error(["diagnose", "--model", "@assets/toy_sd3", "--data", str(tmp_path), *argv, "--out",
                           str(tmp_path / "d")], capsys)
    assert message in line


def test_an_edit_seed_beyond_64_bits_is_one_line(tmp_path, capsys, monkeypatch):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    line = one_line_error(["edit", "--model", "@assets/toy_sd3", "--image", str(tmp_path / "a.png"), "--source-prompt",
                           "a", "--target-prompt", "b", "--seed", str(1 << 70), "--out", str(tmp_path / "o")],
                          capsys, monkeypatch)
    assert "--seed must be <= 18446744073709551615" in line


@pytest.mark.parametrize("size,message", [("33", "--size 33x33: both sides must be multiples of 8 for this model"),
                                          ("64", "--size 64x64: this model renders at most 32 pixels a side")])
def test_a_size_the_loaded_model_cannot_render_is_one_line(tmp_path, capsys, size, message):
    """Checked once the model is known (diffusers raised a bare ValueError in its forward)."""
    line = one_line_error(["generate", "--model", "@assets/toy_sd3", "--prompts", "x", "--steps", "1", "--size", size,
                           "--no-progress", "--out", str(tmp_path / "g")], capsys)
    assert message in line and not (tmp_path / "g" / "metadata.jsonl").exists()


def test_a_deeply_nested_layout_header_is_one_line(tmp_path, capsys):
    path = tokens_file(tmp_path / "deep.safetensors", raw_layout="[" * 100_000 + "]" * 100_000)
    assert "invalid 'softrepa_layout' metadata: not valid JSON (nested too deeply)" in one_line_error(
        ["info", str(path)], capsys)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64])
def test_token_tensors_that_are_not_floating_point_are_refused(tmp_path, dtype):
    path = tokens_file(tmp_path / "t.safetensors", base=torch.ones(1, 2, 8, dtype=dtype))
    with pytest.raises(SoftTokensError, match=f"tensor 'base' is {'BOOL' if dtype is torch.bool else 'I64'}, "
                                              "expected floating point"):
        softrepa.load_soft_tokens(path)


def test_layout_fields_of_the_wrong_type_are_one_line(tmp_path, capsys):
    path = tokens_file(tmp_path / "t.safetensors", {"token_dim": "8"})
    assert "layout field 'token_dim': expected an integer, got '8'" in one_line_error(["info", str(path)], capsys)


def test_a_csv_field_over_128_kb_names_the_line(tmp_path):
    from softrepa.data import build_dataset

    (tmp_path / "m.csv").write_text("image,caption\na.png,ok\nb.png," + "x" * 200_000 + "\n")
    with pytest.raises(DatasetError, match=r"m\.csv', line 3: field larger than field limit"):
        build_dataset(tmp_path / "m.csv", size=8)


# ------------------------------------------------------------------------------ tracebacks
@pytest.mark.parametrize("value", ["@assets/toy_sd3", "`x", "%x", "[x", "{x", "!!python/name:os.system", "no",
                                   "0755", "yes", "{000000..000009}.tar"])
def test_overrides_are_typed_by_the_schema_not_by_yaml(value):
    for key in ("model", "data", "output_dir"):
        cfg = load_config("toy_sd3", parse_overrides([f"--{key}", value]))
        assert getattr(cfg, key) == value  # a string field keeps the text as typed


def test_structured_overrides_still_parse_and_bad_ones_are_config_errors():
    cfg = load_config("toy_sd3", parse_overrides(["--tokens.layers", "[0, 2]", "--validation.seeds", "0,1",
                                                  "--data", "{type: folder, path: x}", "--log_with", "null",
                                                  "--lr", "1e-3", "--shared_noise", "no"]))
    assert cfg.tokens.layers == (0, 2) and cfg.validation.seeds == [0, 1] and cfg.data == {"type": "folder", "path": "x"}
    assert cfg.log_with is None and cfg.lr == 1e-3 and cfg.shared_noise is False
    with pytest.raises(ConfigError, match=r"--tokens\.layers: not valid YAML"):
        load_config("toy_sd3", parse_overrides(["--tokens.layers", "[0, 2"]))
    with pytest.raises(ConfigError, match="max_steps: expected int"):
        load_config("toy_sd3", parse_overrides(["--max_steps", "`x"]))


def test_a_yaml_number_for_a_string_field_is_refused_not_renamed(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: '@assets/toy_sd3'\noutput_dir: 0755\n")
    with pytest.raises(ConfigError, match="output_dir: expected a string, got the YAML int 493; quote the value"):
        load_config(cfg)


@pytest.mark.parametrize("text,message", [
    ("clip: [\n", r"m\.yaml: not valid YAML \(line 2\)"),
    ("clip: {a: 1}\nclip: {a: 2}\n", "duplicate key 'clip'"),
    (b"clip: '\xff'\n", r"metrics config .*m\.yaml: not UTF-8 text \(invalid byte on line 1"),
    ("- 1\n- 2\n", "expected a mapping of metric sections"),
])
def test_a_malformed_metrics_config_is_one_line(tmp_path, capsys, text, message):
    import re

    (tmp_path / "img.png").write_bytes(b"")
    cfg = tmp_path / "m.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = one_line_error(["evaluate", "--images", str(tmp_path), "--metrics", "world", "--metrics-config", str(cfg),
                           "--out", str(tmp_path / "ev")], capsys)
    assert re.search(message, line), line


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys, monkeypatch, command):
    argv = (["generate", "--model", "@assets/toy_sd3", "--prompts", "x"] if command == "generate"
            else ["evaluate", "--images", str(tmp_path), "--metrics", "world"])
    line = one_line_error([*argv, "--device", "cuda:7", "--out", str(tmp_path / "o")], capsys, monkeypatch)
    assert "--device cuda:7:" in line and ("no CUDA device" in line or "only" in line)
    assert "not a torch device: 'gpu0'" in one_line_error([*argv, "--device", "gpu0", "--out", str(tmp_path / "o")],
                                                          capsys, monkeypatch)


@pytest.mark.parametrize("coco", [{"images": 5, "annotations": []}, {"images": [1, "x"], "annotations": [[1], None]},
                                  {"images": [{"id": [1], "file_name": "a.png"}],
                                   "annotations": [{"image_id": {"a": 1}, "caption": "c"}]}])
def test_a_coco_file_of_the_wrong_types_is_one_line_or_counted(tmp_path, capsys, monkeypatch, coco):
    from softrepa.data import build_dataset

    path = tmp_path / "captions_x.json"
    path.write_text(json.dumps(coco))
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError):  # no usable pair, or the lists named; never a TypeError
        build_dataset(path, size=8, images=tmp_path / "images")
    line = one_line_error(["generate", "--model", "@assets/toy_sd3", "--prompts", str(path), "--out",
                           str(tmp_path / "g")], capsys, monkeypatch)
    assert str(path) in line


def test_ctrl_c_during_the_imports_is_one_line_and_exit_130():
    """Ctrl-C while torch / diffusers import: one line, exit 130. How long the imports take depends
    on the machine (0.5 s warm, several seconds loaded), so the signal goes at several delays: every
    run it interrupts after softrepa's handler is in place must end so, and at least one must."""
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    interrupted = 0
    for delay in (0.15, 0.3, 0.45, 0.6, 0.8):
        # the child starts with Ctrl-C's default disposition, as from a shell: a SIGINT ignored in
        # this test process (an earlier test or the runner may set that) would be inherited
        proc = subprocess.Popen([sys.executable, "-m", "softrepa", "info", "x.safetensors"], env=env,
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 130:
            assert err == "softrepa info: interrupted\n", err[-1000:]
            interrupted += 1
        else:  # finished before the signal (exit 2: no such file), or signalled before softrepa started
            assert proc.returncode == 2 or "KeyboardInterrupt" in err or proc.returncode < 0, err[-1000:]
    assert interrupted, "no delay landed during the imports"


def test_non_utf8_configs_and_prompts_name_the_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "c.yaml").write_bytes(b"model: x\ndata: '\xff'\n")
    assert f"config {tmp_path / 'c.yaml'}: not UTF-8 text (invalid byte on line 2" in one_line_error(
        ["train", "--config", str(tmp_path / "c.yaml"), "--print-config"], capsys)
    for name in ("p.txt", "p.jsonl", "p.json"):
        (tmp_path / name).write_bytes(b"a cat\n\xfe\xff\n")
        line = one_line_error(["generate", "--model", "@assets/toy_sd3", "--prompts", str(tmp_path / name), "--out",
                               str(tmp_path / "g")], capsys, monkeypatch)
        assert f"--prompts {tmp_path / name}: not UTF-8 text (invalid byte on line 2" in line


def test_a_300_character_file_name_in_a_manifest_names_its_line(tmp_path, capsys, caplog):
    from softrepa.data import build_dataset

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "caption": "ok"}, {"image": "x" * 300 + ".png", "caption": "long"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_dataset(tmp_path / "m.jsonl", size=8)  # the row is skipped, the manifest is used
    assert len(ds) == 1 and ds.skipped["malformed_row"] == 1
    assert f"{tmp_path / 'm.jsonl'}:2: unusable image path (File name too long)" in caplog.text
    edits = tmp_path / "e.jsonl"
    edits.write_text(json.dumps({"image": "x" * 300 + ".png", "source_prompt": "a", "target_prompt": "b"}) + "\n")
    line = one_line_error(["edit", "--model", "@assets/toy_sd3", "--manifest", str(edits), "--out",
                           str(tmp_path / "o")], capsys)
    assert f"{edits}: row 1: unusable image path (File name too long)" in line


@pytest.mark.parametrize("data,message", [("/nonexistent", "--data: '/nonexistent' does not exist"),
                                          ("no", "--data: 'no' does not exist"), ("", "--data is empty")])
def test_a_missing_or_empty_data_path_says_so(tmp_path, capsys, data, message):
    line = one_line_error(["train", "--config", "toy_sd3", "--data", data, "--out", str(tmp_path / "run")], capsys)
    assert message in line
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("command", ["generate", "train", "evaluate"])
def test_an_out_that_is_a_file_is_one_clear_line(tmp_path, capsys, monkeypatch, command):
    out = tmp_path / "results"
    out.write_text("mine")
    argv = {"generate": ["generate", "--model", "@assets/toy_sd3", "--prompts", "x", "--out", str(out)],
            "train": ["train", "--config", "toy_sd3", "--data", str(tmp_path), "--output_dir", str(out / "run")],
            "evaluate": ["evaluate", "--images", str(tmp_path), "--metrics", "world", "--out", str(out)]}[command]
    line = one_line_error(argv, capsys, monkeypatch)
    assert f"{out} is a file, not a folder" in line and "Errno" not in line
    assert out.read_text() == "mine"
