"""Issue 26, silently wrong results and the user's files: a value that means nothing is refused, an image
is read as it looks, and softrepa never writes over or deletes what it did not create.

Resource exhaustion and tracebacks are `tests/test_hardening.py`.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import softrepa
from softrepa.cli import main
from softrepa.config import load_config, parse_overrides
from softrepa.errors import ConfigError, DatasetError, RunFolderError, SoftTokensError, UsageError
from softrepa.runfolder import METADATA, finished_rows, open_image

from .test_hardening import one_line_error

TOY = ["--model", "@assets/toy_sd3"]


# ------------------------------------------------------------------------------ images read as they look
def gray16(path: Path, value: int = 32896) -> Path:
    Image.fromarray(np.full((16, 24), value, dtype=np.uint16)).save(path)  # a 16-bit grayscale PNG ("I;16")
    return path


def test_16_bit_grayscale_pngs_keep_their_values_in_edit_training_and_evaluate(tmp_path):
    from softrepa.data import load_image, preprocess_image
    from softrepa.evaluation.common import load_rgb

    path = gray16(tmp_path / "g.png")  # 32896 / 65535 = mid gray, 128 in 8 bits
    assert Image.open(path).mode == "I;16"
    for image in (open_image(path), load_image(path).convert("RGB"), load_rgb(path)):
        assert np.asarray(image).min() == np.asarray(image).max() == 128  # was 255: all white
    pixels = preprocess_image(load_image(path), 8)
    assert torch.allclose(pixels, torch.full_like(pixels, 128 / 127.5 - 1), atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    from softrepa.data import load_image

    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    for image in (open_image(tmp_path / "r.jpg"), load_image(tmp_path / "r.jpg")):
        assert image.size == (20, 40)  # upright: portrait
        top = np.asarray(image.convert("RGB"))[2, 10]
        assert top[2] > 200 and top[0] < 60  # the blue half is on top once turned


@pytest.mark.parametrize("ext", ["gif", "tiff", "bmp"])
def test_gif_tiff_and_bmp_in_an_image_folder_are_read(tmp_path, ext):
    from softrepa.data import build_dataset

    Image.new("RGB", (16, 16), (0, 200, 0)).save(tmp_path / f"a.{ext}")
    (tmp_path / "a.txt").write_text("a green square\n")
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("black\n")
    ds = build_dataset(tmp_path, size=8)
    assert sorted(Path(r.image).name for r in ds.records) == [f"a.{ext}", "b.png"]
    green = ds[[Path(r.image).name for r in ds.records].index(f"a.{ext}")]["pixels"]
    assert green[1].mean() > 0.4 and green[0].mean() < -0.9


# ------------------------------------------------------------------------------ meaningless values
@pytest.mark.parametrize("argv,message", [
    (["--target-cfg", "nan"], "--target-cfg must be a finite number, got nan"),
    (["--target-cfg", "9,inf"], "--target-cfg must be a finite number, got inf"),
    (["--source-cfg", "nan"], "--source-cfg must be a finite number"),
    (["--steps", "0"], "--steps must be >= 1 (1..10000), got 0"),
])
def test_edit_refuses_nan_inf_and_zero_steps_before_the_model_loads(tmp_path, capsys, monkeypatch, argv, message):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    line = one_line_error(["edit", *TOY, "--image", str(tmp_path / "a.png"), "--source-prompt", "a", "--target-prompt",
                           "b", *argv, "--out", str(tmp_path / "o")], capsys, monkeypatch)
    assert message in line
    assert not (tmp_path / "o" / METADATA).exists()


@pytest.mark.parametrize("argv,message", [
    (["--cfg", "nan"], "--cfg must be a finite number, got nan"), (["--true-cfg", "inf"], "--true-cfg must be"),
    (["--steps", "0"], "--steps must be >= 1"), (["--max-prompts", "0"], "--max-prompts must be >= 1, got 0"),
])
def test_generate_refuses_values_that_meant_something_else(tmp_path, capsys, monkeypatch, argv, message):
    line = one_line_error(["generate", *TOY, "--prompts", "x", *argv, "--out", str(tmp_path / "o")], capsys, monkeypatch)
    assert message in line and not (tmp_path / "o" / METADATA).exists()


def test_metadata_rows_are_always_json():
    from softrepa.runfolder import append_row

    with pytest.raises(ValueError, match="not JSON compliant"):  # a NaN that slipped through is a bug, never a row
        append_row(Path("/nonexistent/never-written.jsonl"), {"cfg": float("nan")})


@pytest.mark.parametrize("row", ['{"prompt": null}', '{"prompt": 3}', '{"prompt": "  "}', '["a"]'])
def test_a_jsonl_prompt_that_is_not_a_string_names_its_line(tmp_path, row):
    from softrepa.prompts import read_prompts

    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n' + row + "\n")
    with pytest.raises(DatasetError, match=r"p\.jsonl:2: expected a JSON object with a non-empty string \"prompt\""):
        read_prompts(str(tmp_path / "p.jsonl"))


@pytest.mark.parametrize("overrides,message", [
    (["--loss.scale", "0"], "loss.scale must be > 0, got 0"),
    (["--loss.scale", "nan"], "loss.scale must be a finite number"),
    (["--loss.tau", "inf"], "loss.tau must be a finite number, got inf"),
    (["--loss.denoise_weight", "inf"], "loss.denoise_weight must be a finite number"),
    (["--loss.contrastive_weight", "0", "--loss.denoise_weight", "0"], "both 0: nothing would be learned"),
    (["--max_items", "-1"], "max_items must be >= 1, got -1"),
    (["--max_items", "0"], "max_items must be >= 1, got 0"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--max_sequence_length", "0"], "max_sequence_length must be >= 1"),
    (["--weight_decay", "nan"], "weight_decay must be a finite number"),
    (["--adam_betas", "[0.9, 1.5]"], "adam_betas must be two numbers in [0, 1)"),
    (["--schedule.eta_min", "inf"], "schedule.eta_min must be a finite number"),
    (["--validation.steps", "0"], "validation.steps must be >= 1"),
    (["--validation.guidance_scale", "nan"], "validation.guidance_scale must be a finite number"),
    (["--loss.tau_table", "[0.1, inf]", "--loss.tau_schedule", "calibrated"], "loss.tau_table must be a finite number"),
])
def test_training_settings_that_switch_learning_off_are_refused(overrides, message):
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("toy_sd3", parse_overrides(overrides))


def test_the_declared_positive_only_objective_is_still_accepted():
    cfg = load_config("toy_sd3", parse_overrides(["--objective", "positive_only", "--loss.contrastive_weight", "0"]))
    assert cfg.objective == "positive_only"
    cfg = load_config("toy_sd3", parse_overrides(["--loss.contrastive_weight", "0", "--loss.denoise_weight", "1"]))
    assert cfg.loss.denoise_weight == 1.0  # the toy demo's spelling of the control


def test_an_empty_data_never_scans_the_current_folder(tmp_path, monkeypatch):
    from softrepa.data import build_dataset, check_data_spec

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a caption that must not be trained on\n")
    with pytest.raises(DatasetError, match="data is empty"):
        build_dataset("", size=8)
    with pytest.raises(DatasetError, match="--data is empty"):
        check_data_spec("")


def test_duplicate_yaml_keys_are_reported(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: a\nloss:\n  tau: 0.1\n  tau: 0.2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML \(line 4\): duplicate key 'tau' \(first on line 3"):
        load_config(cfg)
    from softrepa.edit import read_manifest

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "e.yaml").write_text("- input_img: a.png\n  source_prompt: a\n  source_prompt: b\n  target_prompts: [c]\n")
    with pytest.raises(DatasetError, match="duplicate key 'source_prompt'"):
        read_manifest(tmp_path / "e.yaml")


def test_duplicate_webdataset_keys_are_counted_not_last_wins(tmp_path):
    from softrepa.data import build_dataset

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key in ("a", "b"):
            add(tar, f"{key}.png", png.getvalue())
            add(tar, f"{key}.txt", b"first caption")
        add(tar, "b.txt", b"second caption")  # the same member again
        add(tar, "c.png", png.getvalue())
        add(tar, "c.jpg", png.getvalue())  # two images for one key
        add(tar, "c.txt", b"c")
        add(tar, "d.png", png.getvalue())
        add(tar, "d.txt", b"txt caption")
        add(tar, "d.json", json.dumps({"caption": "json caption", "width": 8}).encode())  # metadata beside: fine
    ds = build_dataset(tmp_path / "s.tar", size=8)
    assert [r.key.split("/")[-1] for r in ds.records] == ["a", "d"]
    assert ds.records[1].captions == ("txt caption",)
    assert ds.skipped["duplicate_key"] == 2


def test_a_truncated_image_already_in_a_generate_folder_is_made_again(tmp_path, capsys):
    out = tmp_path / "g"
    argv = ["generate", *TOY, "--prompts", "a red circle", "--seeds", "0,1", "--steps", "2", "--size", "32",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    good = (out / "00000_s1.png").read_bytes()
    data = (out / "00000_s0.png").read_bytes()
    (out / "00000_s0.png").write_bytes(data[: len(data) // 2])  # cut, as a crash of a copy leaves it
    before = (out / "00000_s0.png").stat().st_mtime_ns
    assert finished_rows(out, {}, ()).keys() == {"00000_s1.png"}  # the cut one is not finished
    assert main(argv) == 0
    with Image.open(out / "00000_s0.png") as im:
        im.load()  # complete again
    assert (out / "00000_s0.png").read_bytes() == data and (out / "00000_s0.png").stat().st_mtime_ns != before
    assert (out / "00000_s1.png").read_bytes() == good
    rows = [json.loads(ln) for ln in (out / METADATA).read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == ["00000_s0.png", "00000_s1.png"]  # one row each


# ------------------------------------------------------------------------------ the user's files
def official_pth(tmp_path: Path) -> Path:
    torch.save(torch.randn(2, 4, 16), tmp_path / "dc_tokens.pth")  # SD3 block-space tokens: 2 layers, m 4
    return tmp_path / "dc_tokens.pth"


def import_args(pth: Path, out: Path) -> list[str]:
    return ["import-official", "--family", "sd3", "--dc-tokens", str(pth), "--out", str(out)]


def test_import_official_never_overwrites_a_json_it_did_not_write(tmp_path, capsys):
    pth = official_pth(tmp_path)
    mine = tmp_path / "coco.json"
    mine.write_text('{"images": []}')
    line = one_line_error(import_args(pth, tmp_path / "coco.safetensors"), capsys)
    assert f"{mine} exists and is not softrepa's layout copy" in line
    assert mine.read_text() == '{"images": []}' and not (tmp_path / "coco.safetensors").exists()
    (tmp_path / "notes.safetensors").write_bytes(b"my own bytes")
    assert "is not a softrepa tokens file" in one_line_error(import_args(pth, tmp_path / "notes.safetensors"), capsys)
    assert (tmp_path / "notes.safetensors").read_bytes() == b"my own bytes"
    # softrepa's own pair is replaced, as any re-run of the import
    assert main(import_args(pth, tmp_path / "t.safetensors")) == 0
    assert main(import_args(pth, tmp_path / "t.safetensors")) == 0
    assert softrepa.load_soft_tokens(tmp_path / "t.safetensors").layout.num_tokens == 4


def test_import_official_into_a_folder_writes_inside_it(tmp_path, capsys):
    pth = official_pth(tmp_path)
    folder = tmp_path / "tokens_dir"
    folder.mkdir()
    assert main(import_args(pth, folder)) == 0
    assert (folder / "tokens.safetensors").is_file() and (folder / "tokens.json").is_file()
    assert not (tmp_path / "tokens_dir.safetensors").exists()


def test_overwrite_removes_only_softreps_own_files_inside_the_artefact_folders(tmp_path):
    from softrepa.resume import claim_run_folder

    run = tmp_path / "run"
    own = ["config.yaml", "tokens.safetensors", "metrics.jsonl", "checkpoints/step_0000002/state.pt",
           "checkpoints/latest", "checkpoints/damaged.step_0000001/state.pt", "checkpoints/.step_0000003.x1.tmp/a", "validation/step_0000002.png",
           "softrepa/1700000000/events.out.tfevents.1.host"]
    mine = ["checkpoints/README.md", "validation/notes.md", "validation/step_2_by_hand.png",
            "softrepa/my_analysis.ipynb", "checkpoints/mine/step_0000009/x", "notes.txt"]
    for name in own + mine:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "config.yaml").write_text("model: m\ntokens: {}\nloss: {}\n")
    with pytest.raises(RunFolderError, match="holds another run"):
        claim_run_folder(run)
    claim_run_folder(run, overwrite=True)
    assert [n for n in own if (run / n).exists()] == []
    assert [n for n in mine if (run / n).read_text() != "x"] == []
    assert not (run / "softrepa" / "1700000000").exists()  # the log folder left empty goes too


@pytest.mark.parametrize("value", ["0755", "yes", "null_folder"])
def test_output_dir_override_stays_the_string_typed(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("toy_sd3", parse_overrides(["--output_dir", value]))
    assert cfg.output_dir == value


def test_evaluate_never_replaces_another_folders_results(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    out = tmp_path / "ev"
    out.mkdir()
    theirs = json.dumps({"images": str(tmp_path / "other_run"), "metrics": {"clip": {"mean": 0.3}}})
    (out / "results.json").write_text(theirs)
    argv = ["evaluate", "--images", str(tmp_path), "--metrics", "world", "--out", str(out)]
    line = one_line_error(argv, capsys)
    assert f"holds the results of {tmp_path / 'other_run'}" in line and "--overwrite" in line
    assert (out / "results.json").read_text() == theirs
    (out / "results.json").write_text("my own notes")
    assert "not softrepa's results file" in one_line_error(argv, capsys)
    from softrepa.evaluation.evaluate import check_results_folder

    check_results_folder(out, tmp_path, overwrite=True)  # --overwrite lets it through
    (out / "results.json").write_text(json.dumps({"images": str(tmp_path)}))
    check_results_folder(out, tmp_path)  # the same folder's results are redone without asking
    (out / "results.json").unlink()
    (out / "results.md").write_text("my table")
    with pytest.raises(RunFolderError, match="results.md without a results.json"):
        check_results_folder(out, tmp_path)


def test_parse_cfgs_and_size_refuse_what_would_be_silently_wrong():
    from softrepa.edit import parse_cfgs
    from softrepa.prompts import parse_size

    with pytest.raises(UsageError, match="--target-cfg must be a finite number"):
        parse_cfgs(float("nan"), 9.0)
    with pytest.raises(UsageError, match="above the limit"):
        parse_size("100x9000")
    assert parse_cfgs("9,11", 0.0) == [9.0, 11.0] and parse_size("64x32") == (64, 32)


def test_softtokens_layout_bounds_hold_from_python_too():
    from softrepa.tokens import SoftTokensConfig, TokenLayout

    with pytest.raises(SoftTokensError, match="token_dim must be <= 65536"):
        TokenLayout("sd3", 50_000_000, 8, 2, 0, "block", (0,), (), 0)
    with pytest.raises(SoftTokensError, match="num_tokens must be <= 1024"):
        SoftTokensConfig(num_tokens=100_000_000)


def test_a_metadata_line_that_is_not_utf8_or_not_a_row_is_dropped_like_a_cut_line(tmp_path):
    from softrepa.runfolder import read_rows

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / METADATA).write_bytes(b'{"file": "a.png", "cfg": 4.0}\n\xff\xfe\n[1, 2]\n{"cfg": NaN}\n' + b"[" * 100_000 + b"\n")
    assert read_rows(tmp_path / METADATA) == [{"file": "a.png", "cfg": 4.0}]
    assert finished_rows(tmp_path, {"cfg": 4.0}, ("cfg",)).keys() == {"a.png"}
    assert (tmp_path / METADATA).read_text() == '{"file": "a.png", "cfg": 4.0}\n'  # rewritten clean


@pytest.mark.parametrize("name,content,message", [
    ("metadata.jsonl", b'{"file": "a.png"}\n\xff\n', r"table .*metadata\.jsonl: not UTF-8 text \(invalid byte on line 2"),
    ("metadata.jsonl", b'{"file": "a.png"}\n{"file": \n', r"metadata\.jsonl:2: not valid JSON"),
    ("metadata.jsonl", b'{"file": "a.png"}\n[1]\n', "expected rows that are JSON objects"),
])
def test_evaluate_inputs_that_are_not_tables_are_one_line(tmp_path, capsys, name, content, message):
    import re

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / name).write_bytes(content)
    line = one_line_error(["evaluate", "--images", str(tmp_path), "--metrics", "world", "--out",
                           str(tmp_path / "ev")], capsys)
    assert re.search(message, line), line


def test_a_layout_whose_fields_are_each_in_bounds_but_whose_product_is_huge_is_refused():
    from softrepa.tokens import TokenLayout

    with pytest.raises(SoftTokensError, match="parameters, above the limit of 67108864"):
        TokenLayout("sd3", 65536, 65536, 1024, 1000, "block", tuple(range(24)), (), 0)


def test_a_webdataset_brace_range_is_bounded(tmp_path):
    from softrepa.data_sources import expand_shards

    with pytest.raises(DatasetError, match=r"the range \{0\.\.999999999\} must name 1 to 1000000 shards"):
        expand_shards(str(tmp_path / "{0..999999999}.tar"))
