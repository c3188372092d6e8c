"""`softrepa generate` and `softrepa.generate`: resume, metadata, tokens, API == CLI, --compare, errors."""

from __future__ import annotations

import json
import logging
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import softrepa
import softrepa.runfolder
from softrepa import SoftTokens, SoftTokensConfig
from softrepa.cli import main
from softrepa.prompts import parse_seeds, parse_size, read_prompts, warn_long_prompts

STEPS, SIZE = "2", "16"
ROW_KEYS = {"file", "prompt", "prompt_index", "seed", "cfg", "steps", "height", "width", "model", "tokens",
            "tokens_sha256", "family", "dtype", "max_sequence_length", "softrepa_version"}


def _randomize(tokens, std=1.0, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tokens.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return tokens


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny SD3 pipeline (T5 included, so that from_pretrained finds every component),
    SD3 tokens, SD1.5 tokens (wrong family) and a prompts file."""
    from softrepa.tiny import tiny_sd3_pipeline, tiny_unet

    root = tmp_path_factory.mktemp("gen")
    pipe = tiny_sd3_pipeline(num_layers=6, with_t5=True)
    pipe.save_pretrained(root / "sd3")
    sd3 = softrepa.save_soft_tokens(_randomize(SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2))),
                                    root / "sd3_tokens.safetensors")
    sd15 = softrepa.save_soft_tokens(SoftTokens.for_model(tiny_unet()), root / "sd15_tokens.safetensors")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    return {"model": str(root / "sd3"), "tokens": str(sd3), "sd15_tokens": str(sd15), "prompts": str(prompts)}


def _cli(assets, out, *extra):
    return main(["generate", "--model", assets["model"], "--prompts", assets["prompts"], "--steps", STEPS,
                 "--size", SIZE, "--max-sequence-length", "8", "--no-progress", "--out", str(out), *extra])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_resume_metadata_and_api_match(assets, tmp_path):
    out = tmp_path / "run"
    assert _cli(assets, out, "--tokens", assets["tokens"], "--seeds", "0-1") == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000_s0.png", "00000_s1.png", "00001_s0.png", "00001_s1.png"]
    rows = _rows(out / "metadata.jsonl")
    assert len(rows) == 4 and all(set(r) >= ROW_KEYS for r in rows)
    r = rows[0]
    assert (r["family"], r["steps"], r["cfg"], r["height"], r["width"]) == ("sd3", 2, 4.0, 16, 16)
    assert r["tokens"] == assets["tokens"] and r["tokens_sha256"] == softrepa.runfolder.file_sha256(assets["tokens"])
    assert r["softrepa_version"] == softrepa.__version__ and r["model"] == assets["model"]
    assert not list(out.glob(".*.tmp"))

    # resume: nothing is regenerated, no duplicate rows
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert _cli(assets, out, "--tokens", assets["tokens"], "--seeds", "0-1") == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    assert len(_rows(out / "metadata.jsonl")) == 4
    # a deleted image is redone, and only that one; its row is not duplicated
    (out / "00001_s0.png").unlink()
    assert _cli(assets, out, "--tokens", assets["tokens"], "--seeds", "0-1") == 0
    assert (out / "00001_s0.png").is_file() and (out / "00000_s1.png").stat().st_mtime_ns == mtimes["00000_s1.png"]
    assert sorted(r["file"] for r in _rows(out / "metadata.jsonl")) == names

    # the Python API with the same seed reproduces the CLI image bit for bit; tokens change it
    pipe = softrepa.pipeline.load_pipeline(assets["model"])
    kw = dict(num_inference_steps=2, guidance_scale=4.0, height=16, width=16, max_sequence_length=8)
    handle = softrepa.load_into(pipe, assets["tokens"])
    api = pipe("a blue square", generator=torch.Generator().manual_seed(1), **kw).images[0]
    np.testing.assert_array_equal(np.asarray(api), _pixels(out / "00001_s1.png"))
    handle.remove()
    vanilla = pipe("a blue square", generator=torch.Generator().manual_seed(1), **kw).images[0]
    assert np.abs(np.asarray(vanilla, dtype=int) - np.asarray(api, dtype=int)).max() > 0

    # other settings in the same folder: a clear error, not a silent mix
    assert _cli(assets, out, "--tokens", assets["tokens"], "--seeds", "0-1", "--cfg", "3") == 2


def test_generate_images_function_and_long_prompt_warning(assets, tmp_path, caplog):
    from softrepa.generate import generate_images

    pipe = softrepa.pipeline.load_pipeline(assets["model"])
    cls = type(pipe)
    with softrepa.load_into(pipe, assets["tokens"]), \
            mock.patch.object(cls, "__call__", autospec=True, side_effect=cls.__call__) as calls:
        long_prompt = "a very long prompt " * 8  # > 77 characters: the tiny tokenizer is character level
        with caplog.at_level(logging.WARNING, logger="softrepa.prompts"):
            rows = generate_images(pipe, [long_prompt], [5], tmp_path, steps=2, height=16, width=16,
                                   max_sequence_length=8, progress=False)
        assert "truncated" in caplog.text and calls.call_count == 1
        generate_images(pipe, [long_prompt], [5], tmp_path, steps=2, height=16, width=16,
                        max_sequence_length=8, progress=False)
        assert calls.call_count == 1  # second run: no pipeline call
    assert rows[0]["file"] == "00000_s5.png" and rows[0]["tokens"] == "<in-memory>"


def test_compare_writes_grids(assets, tmp_path):
    out = tmp_path / "cmp"
    assert _cli(assets, out, "--tokens", assets["tokens"], "--seeds", "0,1", "--max-prompts", "1", "--compare") == 0
    grid = out / "compare" / "00000.png"
    assert grid.is_file()
    with Image.open(grid) as g:
        assert g.width > 2 * 16 and g.height > 2 * 16
    for sub in ("vanilla", "tokens"):
        rows = _rows(out / sub / "metadata.jsonl")
        assert [r["file"] for r in rows] == ["00000_s0.png", "00000_s1.png"]
    assert _rows(out / "vanilla" / "metadata.jsonl")[0]["tokens"] is None
    assert _rows(out / "tokens" / "metadata.jsonl")[0]["tokens"] == assets["tokens"]
    assert not np.array_equal(_pixels(out / "vanilla" / "00000_s0.png"), _pixels(out / "tokens" / "00000_s0.png"))


def test_tokens_for_another_family_exit_2(assets, tmp_path, capsys):
    assert _cli(assets, tmp_path / "x", "--tokens", assets["sd15_tokens"]) == 2
    err = capsys.readouterr().err
    assert "family" in err and "sd15" in err and "sd3" in err
    assert not list((tmp_path / "x").glob("*.png"))


def test_parsers(tmp_path):
    assert parse_seeds("0-3,7,2") == [0, 1, 2, 3, 7]
    assert parse_seeds("5") == [5]
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("a-b")
    assert parse_size("512") == (512, 512) and parse_size("768x1024") == (768, 1024) and parse_size(None) is None
    with pytest.raises(ValueError, match="--size"):
        parse_size("big")
    assert read_prompts("a cat on a mat") == ["a cat on a mat"]
    with pytest.raises(FileNotFoundError):
        read_prompts("missing_prompts.txt")
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "one"}\n\n{"prompt": "two"}\n')
    assert read_prompts(str(jl)) == ["one", "two"]
    jl.write_text('{"caption": "one"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        read_prompts(str(jl))
    coco = tmp_path / "captions_val2017.json"
    coco.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}, {"id": 9, "file_name": "c.jpg"}],
        "annotations": [{"image_id": 3, "caption": "B first "}, {"image_id": 7, "caption": "A first"},
                        {"image_id": 3, "caption": "B second"}]}))
    assert read_prompts(str(coco)) == ["A first", "B first"]  # images in file order, first caption
    assert read_prompts(str(coco), max_prompts=1) == ["A first"]


def test_warn_long_prompts_counts():
    from softrepa.tiny import make_clip_tokenizer

    class P:
        tokenizer = make_clip_tokenizer(77)

    assert warn_long_prompts(P(), ["short", "x" * 200]) == 1
