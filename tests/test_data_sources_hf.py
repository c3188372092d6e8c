"""The Hugging Face data sources of `--data`, on small local data: an ImageFolder with metadata.jsonl
(as `datasets`' imagefolder reads it), webdataset shards (skip-and-count for bad samples), a
`save_to_disk` folder and a Hub dataset id (a recording stand-in for `load_dataset`, and the real one
offline); bad columns / ids are one-line errors naming them."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softrepa.cli import main
from softrepa.data import HFPairDataset, ShardPairDataset, build_dataset, check_data_spec
from softrepa.errors import DatasetError

needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="needs datasets (pip install 'softrepa[datasets]')")
COLOURS = [(230, 20, 20), (20, 20, 230), (20, 200, 20), (230, 230, 20), (10, 10, 10), (150, 20, 200)]


def _png(i: int, fmt: str = "PNG") -> bytes:
    a = np.full((24, 24, 3), 255, np.uint8)
    a[4:16, 4 + i % 4:16 + i % 4] = COLOURS[i % len(COLOURS)]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------- ImageFolder
def _imagefolder(root: Path) -> Path:
    (root / "train").mkdir(parents=True)
    rows = []
    for i in range(4):
        (root / "train" / f"{i}.png").write_bytes(_png(i))
        rows.append({"file_name": f"{i}.png", "text": f"square number {i}"})
    rows.append({"file_name": "4.png", "text": "   "})  # blank caption: skipped, counted
    (root / "train" / "4.png").write_bytes(_png(4))
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_imagefolder_with_metadata_jsonl(tmp_path):
    root = _imagefolder(tmp_path / "if")
    ds = build_dataset(root, size=16)
    assert len(ds) == 4 and ds.skipped["empty_caption"] == 1
    assert [r.captions for r in ds.records] == [(f"square number {i}",) for i in range(4)]
    assert ds.records[0].key == "train/0.png"
    item = ds[2]
    assert item["pixels"].shape == (3, 16, 16) and item["caption"] == "square number 2"


@needs_datasets
def test_imagefolder_reads_as_datasets_imagefolder_does(tmp_path):
    import datasets

    root = _imagefolder(tmp_path / "if")
    ref = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    ours = build_dataset(root, size=16)
    assert sorted(c for c in ref["text"] if c.strip()) == sorted(r.captions[0] for r in ours.records)


def test_imagefolder_caption_column_errors_name_it(tmp_path):
    root = tmp_path / "if"
    root.mkdir()
    (root / "a.png").write_bytes(_png(0))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "label": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"metadata.jsonl: no caption column.*columns: \['file_name', 'label'\]"):
        build_dataset(root, size=16)
    ds = build_dataset({"type": "imagefolder", "path": root, "caption_column": "label"}, size=16)
    assert ds.records[0].captions == ("x",)


# --------------------------------------------------------------------------- webdataset
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(root: Path) -> Path:
    root.mkdir(parents=True)
    with tarfile.open(root / "shard-000000.tar", "w") as t:
        for i in range(3):
            _add(t, f"s{i}.png", _png(i))
            _add(t, f"s{i}.txt", f"shape {i}\nanother caption {i}\n".encode())
        _add(t, "nocap.png", _png(5))                                    # missing_caption
        _add(t, "badutf.png", _png(5))
        _add(t, "badutf.txt", b"caf\xe9")                                # caption_not_utf8
    with tarfile.open(root / "shard-000001.tar", "w") as t:
        for i in range(3, 5):
            _add(t, f"dir/s{i}.jpg", _png(i, "JPEG"))
            _add(t, f"dir/s{i}.json", json.dumps({"caption": f"shape {i}", "width": 24}).encode())
        _add(t, "broken.jpg", b"\xff\xd8 not a jpeg")                    # unreadable_image (at load)
        _add(t, "broken.txt", b"a broken picture")
        _add(t, "onlytext.txt", b"no picture")                           # missing_image
        _add(t, "badjson.png", _png(1))
        _add(t, "badjson.json", b"{nope")                                # malformed_row
    return root


def test_webdataset_shards_skip_and_count_bad_samples(tmp_path, caplog):
    root = _shards(tmp_path / "wds")
    for spec in (str(root / "shard-{000000..000001}.tar"), str(root / "*.tar"), str(root)):
        ds = build_dataset(spec, size=16)
        assert isinstance(ds, ShardPairDataset)
        assert [r.key for r in ds.records] == ["shard-000000.tar/s0", "shard-000000.tar/s1", "shard-000000.tar/s2",
                                               "shard-000001.tar/dir/s3", "shard-000001.tar/dir/s4",
                                               "shard-000001.tar/broken"]
        assert dict(ds.skipped) == {"missing_caption": 1, "caption_not_utf8": 1, "missing_image": 1,
                                    "malformed_row": 1}
    assert ds.records[0].captions == ("shape 0", "another caption 0")
    items = [ds[i] for i in range(len(ds))]
    assert items[3]["caption"] == "shape 3" and items[3]["pixels"].shape == (3, 16, 16)
    # the undecodable sample is named, counted and replaced by the next loadable one
    assert items[5]["key"] == "shard-000000.tar/s0" and ds.skipped["unreadable_image"] == 1
    assert "shard-000001.tar/broken" in caplog.text
    one = build_dataset(root / "shard-000000.tar", size=16)
    assert len(one) == 3


def test_webdataset_truncated_shard_keeps_what_precedes_the_damage(tmp_path):
    root = _shards(tmp_path / "wds")
    data = (root / "shard-000000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    ds = build_dataset(cut, size=16)
    assert ds.skipped["truncated_shard"] >= 1 and 1 <= len(ds) < 3
    assert build_dataset(root / "shard-000000.tar", size=16).skipped["truncated_shard"] == 0
    with pytest.raises(DatasetError, match=r"no \.tar shard found"):
        build_dataset(str(tmp_path / "none-*.tar"), size=16)
    with pytest.raises(DatasetError, match=r"1 shard\(s\) missing"):
        build_dataset(str(root / "shard-{000000..000002}.tar"), size=16)


def test_train_cli_on_webdataset_shards(tmp_path):
    from softrepa.tiny import tiny_sd15_pipeline

    root = _shards(tmp_path / "wds")
    tiny_sd15_pipeline().save_pretrained(tmp_path / "sd15")
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tmp_path / "sd15"), "--data", str(root / "shard-{000000..000001}.tar"),
               "--output_dir", str(out), "--resolution", "32", "--batch_size", "3", "--max_steps", "2",
               "--num_workers", "0", "--validation.every", "0", "--tokens.init", "normal", "--log_every", "1"])
    assert rc == 0 and (out / "tokens.safetensors").is_file()
    with pytest.raises(DatasetError, match="no .tar shard found"):
        check_data_spec(str(tmp_path / "missing-*.tar"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        check_data_spec("./missing/folder")
    check_data_spec("owner/some-dataset")  # a Hub id: checked when loaded


# --------------------------------------------------------------------------- datasets
def _hf_dataset(n: int = 4):
    import datasets

    return datasets.Dataset.from_dict(
        {"img": [Image.open(io.BytesIO(_png(i))) for i in range(n)],
         "caption": [f"shape {i}" for i in range(n - 1)] + [""],
         "label": list(range(n))},
        features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"),
                                    "label": datasets.Value("int64")}))


@needs_datasets
def test_save_to_disk_folder_with_columns_and_split(tmp_path):
    import datasets

    _hf_dataset().save_to_disk(tmp_path / "flat")
    ds = build_dataset(tmp_path / "flat", size=16)  # image column guessed (the only Image), caption found
    assert isinstance(ds, HFPairDataset) and len(ds) == 3 and ds.skipped["empty_caption"] == 1
    assert ds[1]["caption"] == "shape 1" and ds[1]["pixels"].shape == (3, 16, 16)

    datasets.DatasetDict({"train": _hf_dataset(2), "validation": _hf_dataset(3)}).save_to_disk(tmp_path / "dd")
    val = build_dataset({"type": "hf_disk", "path": tmp_path / "dd", "split": "validation",
                         "image_column": "img", "caption_column": "caption"}, size=16)
    assert len(val) == 2
    with pytest.raises(DatasetError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        build_dataset({"type": "hf_disk", "path": tmp_path / "dd", "split": "test"}, size=16)
    with pytest.raises(DatasetError, match=r"no caption column 'text' \(columns: \['img', 'caption', 'label'\]\)"):
        build_dataset({"type": "hf_disk", "path": tmp_path / "flat", "caption_column": "text"}, size=16)
    with pytest.raises(DatasetError, match=r"no image column 'image'"):
        build_dataset({"type": "hf_disk", "path": tmp_path / "flat", "image_column": "image"}, size=16)


@needs_datasets
def test_hub_dataset_id_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split, revision))
        return _hf_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for spec in ("someone/squares", "hf:someone/squares", "hf://datasets/someone/squares"):
        assert len(build_dataset(spec, size=16)) == 3
    ds = build_dataset({"type": "hf", "path": "someone/squares", "name": "small", "split": "test",
                        "revision": "v1", "caption_column": "caption", "image_column": "img"}, size=16)
    assert calls == [("someone/squares", None, "train", None)] * 3 + [("someone/squares", "small", "test", "v1")]
    assert ds[0]["caption"] == "shape 0"


@needs_datasets
def test_unknown_hub_dataset_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    try:
        import datasets.config as dc

        monkeypatch.setattr(dc, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:
        pass
    with pytest.raises(DatasetError) as e:
        build_dataset("nobody/no-such-dataset-xyz", size=16)
    msg = str(e.value)
    assert "nobody/no-such-dataset-xyz" in msg and "\n" not in msg


def test_saved_config_holds_absolute_shard_patterns_and_spec_paths(tmp_path, monkeypatch):
    """A run resumed from another directory finds its shards / saved dataset (config.absolute_path)."""
    from softrepa.config import absolute_path

    (tmp_path / "shards").mkdir()
    (tmp_path / "saved").mkdir()
    monkeypatch.chdir(tmp_path)
    assert absolute_path("shards/{000000..000009}.tar") == str(tmp_path / "shards" / "{000000..000009}.tar")
    assert absolute_path({"type": "hf_disk", "path": "saved", "split": "train"}) == {
        "type": "hf_disk", "path": str(tmp_path / "saved"), "split": "train"}
    assert absolute_path({"type": "hf", "path": "owner/name"}) == {"type": "hf", "path": "owner/name"}
    assert absolute_path("owner/name") == "owner/name"
