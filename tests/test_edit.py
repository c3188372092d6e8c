"""FlowEdit (`softrepa.edit`) and `softrepa edit`: the pure loop's identities, seeds, tokens, eps form,
errors, manifests. The identities on every family's models (same prompt and CFG, n_max = 0) and the
edit CLI on every family: tests/test_conformance.py."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import softrepa
from softrepa.backbone import backbone_for
from softrepa.cli import main
from softrepa.cli.edit import add_arguments as add_edit_arguments
from softrepa.edit import edit_image, edit_latents, encode_source, image_to_pixels, size_multiple, working_size
from softrepa.flowedit import EditConds, FlowEditParams, flowedit_latents, guide
from softrepa.runfolder import open_image as load_source_image

FAST = dict(steps=4, n_max=3, src_cfg=2.0, tar_cfg=2.0)


@pytest.fixture(scope="module")
def sd3():
    from softrepa.tiny import tiny_sd3_pipeline

    return tiny_sd3_pipeline(num_layers=6)


@pytest.fixture(scope="module")
def sd15():
    from softrepa.tiny import tiny_sd15_pipeline

    return tiny_sd15_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    from softrepa.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


def _image(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _latents(pipe, w, h):
    return encode_source(backbone_for(pipe), image_to_pixels(_image(w, h), (h, w)))


# ----------------------------------------------------------------------------- the pure loop
def _toy(x, sigma, cond):
    """A denoiser whose velocity depends on x, sigma and the cond rows (N, 1, 1, 1)."""
    return torch.tanh(x) * cond + sigma * x.flip(-1)


def test_pure_loop_identities_and_branches():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 4, generator=g)
    sigmas = torch.linspace(1, 0, 7)
    src = torch.tensor([0.0, 0.0, 1.0, 2.0]).view(4, 1, 1, 1)  # (uncond, uncond, cond, cond) for B = 2
    tar = torch.tensor([0.0, 0.0, 3.0, -1.0]).view(4, 1, 1, 1)
    conds, same = EditConds(src, tar), EditConds(src, src)
    p = FlowEditParams(steps=6, n_max=5, n_min=0, src_cfg=2.0, tar_cfg=2.0)
    assert torch.equal(flowedit_latents(_toy, z, sigmas, conds, FlowEditParams(steps=6, n_max=0)), z)
    assert torch.equal(flowedit_latents(_toy, z, sigmas, same, p), z)
    a = flowedit_latents(_toy, z, sigmas, conds, p)
    assert torch.equal(a, flowedit_latents(_toy, z, sigmas, conds, p))
    assert not torch.allclose(a, z)
    assert not torch.allclose(a, flowedit_latents(_toy, z, sigmas, conds, FlowEditParams(**{**p.to_dict(), "seed": 1})))
    # the joint single-call form gives the same result as two calls
    joint = EditConds(src, tar, torch.cat([src, tar]))
    torch.testing.assert_close(flowedit_latents(_toy, z, sigmas, joint, p), a)
    # n_min and n_avg branches run and change the result
    for extra in ({"n_min": 2}, {"n_avg": 3}, {"guidance": "authors"}):
        b = flowedit_latents(_toy, z, sigmas, conds, FlowEditParams(**{**p.to_dict(), **extra}))
        assert b.shape == z.shape and torch.isfinite(b).all() and not torch.allclose(a, b)


def test_guidance_conventions_and_validation():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert guide(u, c, 2.0).item() == 5.0  # u + s (c - u)
    assert guide(u, c, 2.0, "authors").item() == 7.0  # c + s (c - u)
    with pytest.raises(ValueError, match="n_max"):
        FlowEditParams(steps=50, n_max=51).validate()
    with pytest.raises(ValueError, match="n_min"):
        FlowEditParams(n_max=3, n_min=4).validate()
    with pytest.raises(ValueError, match="guidance"):
        FlowEditParams(guidance="other").validate()
    assert working_size(40, 24, 4, None, 32) == (20, 32)
    assert working_size(1000, 700, 16, (1024, 1024)) == (1024, 1024)


# ----------------------------------------------------------------------------- real (tiny) models
def test_seeds_tokens_and_guidance_sd3(sd3):
    z = _latents(sd3, 32, 24)
    p = FlowEditParams(**FAST)

    def run(**kw):
        return edit_latents(sd3, z, ["a red circle"], ["a blue square"], FlowEditParams(**{**p.to_dict(), **kw}),
                            max_sequence_length=8)  # short T5 context: a fast test

    a = run()
    assert torch.equal(a, run())
    assert not torch.allclose(a, run(seed=1))
    assert not torch.allclose(a, run(guidance="authors"))
    tokens = softrepa.SoftTokens.for_model(sd3, softrepa.SoftTokensConfig(num_layers=2, init_std=1.0))
    with softrepa.attach(sd3, tokens):
        with_tokens = run()
    assert not torch.allclose(a, with_tokens, atol=1e-4)
    assert torch.equal(a, run())  # detached: vanilla again


def _time_ids_seen(pipe):
    """A forward pre-hook on the UNet recording every time_ids (N, 6) it is called with; returns (list, handle)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

    return seen, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_sdxl_size_conditioning_and_output_size(sdxl):
    """A non-square image is conditioned on its (H, W), not a square, and comes back at its own size."""
    img = _image(14, 10)  # 10 x 14 px: within the native 16 px, size multiple 2 -> works at 10 x 14
    seen, handle = _time_ids_seen(sdxl)
    try:
        out = edit_image(sdxl, img, "a red circle", "a blue square", FlowEditParams(steps=3, n_max=2))
        z = _latents(sdxl, 14, 10)  # (1, 4, 5, 7): edit_latents' default is the latent's pixel size
        edit_latents(sdxl, z, ["a red circle"], ["a blue square"], FlowEditParams(steps=3, n_max=1))
    finally:
        handle.remove()
    assert out.size == img.size
    want = torch.tensor([10.0, 14.0, 0.0, 0.0, 10.0, 14.0])  # (original H, W, crop top, left, target H, W)
    assert len(seen) >= 3 and all(torch.equal(t, want.expand_as(t)) for t in seen)
    # an explicit resolution is honoured, square or (H, W)
    cond = backbone_for(sdxl).encode_prompts(["a"], resolution=(24, 8))
    assert cond.extra["time_ids"].tolist() == [[24.0, 8.0, 0.0, 0.0, 24.0, 8.0]]
    square = backbone_for(sdxl).encode_prompts(["a"], resolution=12).extra["time_ids"]
    assert square.tolist() == [[12.0, 12.0, 0.0, 0.0, 12.0, 12.0]]


def test_long_prompts_warn(sd15, caplog):
    """A prompt longer than the text encoder reads is reported, as in generation; short ones are not."""
    z = _latents(sd15, 16, 12)
    p = FlowEditParams(steps=2, n_max=1)
    with caplog.at_level(logging.WARNING, logger="softrepa.prompts"):
        edit_latents(sd15, z, ["a red circle"], ["a blue square"], p)
        assert not [r for r in caplog.records if r.name == "softrepa.prompts"]
        edit_image(sd15, _image(16, 12), "a red circle", "a blue square " + "x" * 100, p)
    msgs = [r.getMessage() for r in caplog.records if r.name == "softrepa.prompts"]
    assert len(msgs) == 1 and "1 prompt(s)" in msgs[0] and "77" in msgs[0]


def test_resize_and_image_errors(sd15, tmp_path):
    img = _image(30, 20)  # not a multiple of the size unit, larger than the native 16 px
    out = edit_image(sd15, img, "a red circle", "a blue square", FlowEditParams(steps=3, n_max=2))
    assert out.size == (30, 20)
    assert size_multiple(sd15) == 2
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_source_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_source_image(bad)


# ----------------------------------------------------------------------------- CLI
def test_cli_cfg_flag_spellings():
    """--target-cfg / --source-cfg (the issue's names) and the --tar-cfg / --src-cfg aliases agree."""
    p = argparse.ArgumentParser()
    add_edit_arguments(p)
    base = ["--model", "m", "--out", "o"]
    new = p.parse_args(base + ["--target-cfg", "9,11,13", "--source-cfg", "2.5"])
    old = p.parse_args(base + ["--tar-cfg", "9,11,13", "--src-cfg", "2.5"])
    assert (new.tar_cfg, new.src_cfg) == (old.tar_cfg, old.src_cfg) == ("9,11,13", 2.5)
    assert p.parse_args(base).src_cfg is None and p.parse_args(base).tar_cfg is None  # the family preset decides
    assert "--target-cfg" in p.format_help() and "--source-cfg" in p.format_help()


@pytest.fixture(scope="module")
def sd15_dir(sd15, tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    sd15.save_pretrained(root / "sd15")
    return root / "sd15"


def test_cli_single_image_and_errors(sd15_dir, tmp_path, capsys, monkeypatch):
    _image(16, 12).save(tmp_path / "cat.png")
    base = ["edit", "--model", str(sd15_dir), "--source-prompt", "a cat", "--target-prompt", "a dog",
            "--no-progress", "--out", str(tmp_path / "out")]
    assert main(base + ["--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(base + ["--image", str(tmp_path / "cat.png"), "--steps", "10", "--n-max", "11"]) == 2
    assert "n_max" in capsys.readouterr().err
    assert main(base + ["--image", str(tmp_path / "cat.png"), "--steps", "3", "--n-max", "2"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["file"] == "cat.png" and rows[0]["n_max"] == 2 and rows[0]["tar_cfg"] == 13.5
    assert {"image", "source_prompt", "target_prompt", "steps", "n_min", "n_avg", "src_cfg", "guidance", "seed",
            "model", "tokens", "tokens_sha256", "family", "softrepa_version"} <= set(rows[0])
    with Image.open(tmp_path / "out" / "cat.png") as im:
        assert im.size == (16, 12)
    # a relative --image is recorded absolute: `evaluate` pairs edits with sources from any directory
    monkeypatch.chdir(tmp_path)
    assert main(base[:-1] + [str(tmp_path / "out2"), "--image", "cat.png", "--steps", "3", "--n-max", "2"]) == 0
    (row,) = [json.loads(x) for x in (tmp_path / "out2" / "metadata.jsonl").read_text().splitlines()]
    assert row["image"] == str((tmp_path / "cat.png").resolve())


def test_cli_manifest_sweep_resumes(sd15_dir, tmp_path):
    (tmp_path / "imgs").mkdir()
    _image(16, 12, 1).save(tmp_path / "imgs" / "a.png")
    _image(12, 16, 2).save(tmp_path / "imgs" / "b.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "imgs/a.png", "source_prompt": "a red circle", "target_prompt": "a blue circle"},
        {"image": "imgs/b.png", "source_prompt": "a red square", "target_prompt": "a red star"}]))
    out = tmp_path / "sweep"
    args = ["edit", "--model", str(sd15_dir), "--manifest", str(manifest), "--tar-cfg", "2,4", "--steps", "3",
            "--n-max", "2", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["cfg_2", "cfg_4"]  # .softrepa.lock
    for cfg in (2, 4):
        rows = [json.loads(x) for x in (out / f"cfg_{cfg}" / "metadata.jsonl").read_text().splitlines()]
        assert [r["file"] for r in rows] == ["00000_a.png", "00001_b.png"] and {r["tar_cfg"] for r in rows} == {cfg}
        assert rows[0]["image"] == str(tmp_path / "imgs" / "a.png")
    a2, a4 = (np.asarray(Image.open(out / f"cfg_{c}" / "00000_a.png")) for c in (2, 4))
    assert a2.shape == (12, 16, 3) and not np.array_equal(a2, a4)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    (out / "cfg_4" / "00001_b.png").unlink()
    assert main(args) == 0  # resumes: only the deleted image is redone
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.name != "00001_b.png" or "cfg_2" in str(p))
    assert len((out / "cfg_4" / "metadata.jsonl").read_text().splitlines()) == 2
    assert not list(out.rglob(".*.tmp"))


def test_cli_manifest_warns_long_prompts_once(sd15_dir, tmp_path, caplog):
    """Manifest mode checks every pending prompt up front: one warning per run, not per row or CFG."""
    _image(16, 12).save(tmp_path / "a.png")
    long = "a blue square " + "x" * 100
    rows = [{"image": "a.png", "source_prompt": "a red circle", "target_prompt": t} for t in (long, "a red star")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="softrepa.prompts"):
        assert main(["edit", "--model", str(sd15_dir), "--manifest", str(tmp_path / "m.jsonl"), "--target-cfg",
                     "2,3", "--steps", "2", "--n-max", "1", "--no-progress", "--out", str(tmp_path / "out")]) == 0
    msgs = [r.getMessage() for r in caplog.records if r.name == "softrepa.prompts"]
    assert len(msgs) == 1 and "1 prompt(s)" in msgs[0] and "xxxx" in msgs[0]


def test_cli_sdxl_folders_record_size_conditioning(sdxl, tmp_path, capsys):
    """SDXL edits record their (H, W) size conditioning; a folder made before it is not resumed into."""
    sdxl.save_pretrained(tmp_path / "sdxl")
    _image(14, 10).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["edit", "--model", str(tmp_path / "sdxl"), "--image", str(tmp_path / "a.png"), "--source-prompt",
            "a red circle", "--target-prompt", "a blue circle", "--steps", "2", "--n-max", "1", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    meta = out / "metadata.jsonl"
    (row,) = [json.loads(x) for x in meta.read_text().splitlines()]
    assert row["size_conditioning"] == "hw" and row["family"] == "sdxl"
    del row["size_conditioning"]  # what a folder edited before the fix looks like
    meta.write_text(json.dumps(row) + "\n")
    (out / row["file"]).unlink()
    capsys.readouterr()
    assert main(args) == 2  # refused with a message naming size_conditioning, nothing mixed in
    assert "size_conditioning" in capsys.readouterr().err
    assert not (out / row["file"]).exists()
