"""softrepa.data: sources, deterministic caption choice, robustness, preprocessing, latent cache."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softrepa.data import (
    DatasetError,
    LatentCache,
    LatentCacheError,
    PairDataset,
    build_dataset,
    collate_pairs,
    preprocess_image,
)


def _png(path: Path, color=(255, 0, 0), size=(24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _coco(root: Path, n: int = 4, caps_per_image: int = 5, layout: str = "standard") -> Path:
    """A miniature COCO: coco/annotations/captions_train2017.json + coco/train2017/*.jpg."""
    img_dir = root / "coco" / "train2017"
    images, anns = [], []
    for i in range(n):
        name = f"{i:012d}.jpg"
        img = Image.new("RGB", (30 + i, 20), (10 * i, 0, 0))
        img_dir.mkdir(parents=True, exist_ok=True)
        img.save(img_dir / name)
        images.append({"id": 100 + i, "file_name": name, "height": 20, "width": 30 + i})
        for k in range(caps_per_image):
            anns.append({"id": len(anns), "image_id": 100 + i, "caption": f"image {i} caption {k}"})
    path = root / "coco" / "annotations" / "captions_train2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


# --------------------------------------------------------------------------- sources
def test_coco_loads_with_guessed_and_explicit_image_dir(tmp_path):
    ann = _coco(tmp_path)
    ds = build_dataset(ann, size=16, seed=0)
    assert isinstance(ds, PairDataset) and len(ds) == 4
    item = ds[2]
    assert item["pixels"].shape == (3, 16, 16)
    assert item["caption"].startswith("image 2 caption") and item["index"] == 2
    assert item["key"] == "000000000002.jpg"
    ds2 = build_dataset({"type": "coco", "annotations": str(ann), "images": str(tmp_path / "coco" / "train2017")}, 16)
    assert [r.captions for r in ds2.records] == [r.captions for r in ds.records]
    assert len(ds.records[0].captions) == 5


def test_folder_with_txt_captions(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "a.png")
    (root / "a.txt").write_text("a red square\n\n  another caption  \n")
    _png(root / "sub" / "b.jpg", (0, 255, 0)).rename(root / "sub" / "b.jpg")
    (root / "sub" / "b.txt").write_text("green")
    Image.new("RGB", (20, 20)).save(root / "c.webp")
    (root / "c.txt").write_text("webp one")
    _png(root / "nocap.png")  # no caption file -> skipped
    ds = build_dataset(root, size=8)
    assert [r.key for r in ds.records] == ["a.png", "c.webp", "sub/b.jpg"]
    assert ds.records[0].captions == ("a red square", "another caption")
    assert ds.skipped["missing_caption"] == 1
    assert ds[1]["pixels"].shape == (3, 8, 8)


def test_jsonl_and_csv_manifests_resolve_relative_paths(tmp_path):
    data = tmp_path / "set"
    _png(data / "img" / "x.png")
    _png(data / "img" / "y.png", (0, 0, 255))
    abs_img = _png(tmp_path / "elsewhere" / "z.png")
    jl = data / "train.jsonl"
    rows = [
        {"image": "img/x.png", "caption": "x one"},
        {"image": "img/y.png", "caption": ["y one", "y two"]},
        {"image": str(abs_img), "caption": "z"},
        {"image": "img/x.png", "caption": "x two"},  # merged into x's record
    ]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = build_dataset(jl, size=8)
    assert len(ds) == 3
    assert ds.records[0].captions == ("x one", "x two")
    assert ds.records[0].image == str(data / "img" / "x.png")
    assert ds.records[2].image == str(abs_img)
    assert ds[2]["caption"] == "z"

    cs = data / "train.csv"
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerow(["img/x.png", "x, with a comma"])
        w.writerow(["img/y.png", "y"])
    ds = build_dataset({"type": "manifest", "path": cs}, size=8)
    assert [r.captions for r in ds.records] == [("x, with a comma",), ("y",)]
    assert ds[0]["pixels"].shape == (3, 8, 8)


def test_csv_without_columns_is_a_clear_error(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path,text\na.png,hello\n")
    with pytest.raises(DatasetError, match="columns"):
        build_dataset(p, size=8)


# --------------------------------------------------------------------------- captions per epoch
def test_random_caption_is_deterministic_per_seed_epoch_and_varies(tmp_path):
    ann = _coco(tmp_path, n=6, caps_per_image=5)
    a, b = build_dataset(ann, 8, seed=3), build_dataset(ann, 8, seed=3)
    per_epoch = []
    for epoch in range(6):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        caps_a = [a[i]["caption"] for i in range(len(a))]
        assert caps_a == [b[i]["caption"] for i in reversed(range(len(b)))][::-1]  # order-independent
        assert caps_a == [a.caption(i, epoch) for i in range(len(a))]
        per_epoch.append(caps_a)
    assert len({tuple(c) for c in per_epoch}) > 1  # varies across epochs
    seen = {c for caps in per_epoch for c in caps}
    assert len(seen) > 6  # several captions of the same image get used
    other_seed = build_dataset(ann, 8, seed=4)
    assert [other_seed.caption(i, 0) for i in range(6)] != per_epoch[0] or [
        other_seed.caption(i, 1) for i in range(6)
    ] != per_epoch[1]


# --------------------------------------------------------------------------- robustness
def test_corrupt_image_and_empty_caption_are_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "imgs"
    for name in ["a", "b", "c", "d"]:
        _png(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"caption {name}")
    (root / "b.png").write_bytes(b"this is not a png at all")  # corrupt: found at load time
    (root / "c.txt").write_text("   \n\t\n")  # blank: dropped at index time
    with caplog.at_level(logging.WARNING, logger="softrepa.data"):
        ds = build_dataset(root, size=8)
        assert len(ds) == 3 and ds.skipped["empty_caption"] == 1
        item = ds[1]  # b.png is corrupt -> the next index (d.png) deterministically
        assert item["index"] == 2 and item["caption"] == "caption d"
        assert ds.skipped["unreadable_image"] == 1
        assert ds[1]["index"] == 2 and ds.skipped["unreadable_image"] == 1  # remembered, not retried
        batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert "b.png" in caplog.text and "c.png" in caplog.text
    assert batch["pixels"].shape == (3, 3, 8, 8)
    assert batch["indices"].tolist() == [0, 2, 2]


def test_image_deleted_after_indexing_and_corrupt_coco_entries(tmp_path):
    ann = _coco(tmp_path, n=3)
    data = json.loads(ann.read_text())
    data["annotations"].append({"image_id": 999, "caption": "orphan"})
    data["images"].append({"id": 7, "file_name": "gone.jpg"})  # missing file
    data["annotations"].append({"image_id": 7, "caption": "x"})
    data["images"].append({"id": 8, "file_name": "000000000000.jpg"})  # no captions at all
    ann.write_text(json.dumps(data))
    ds = build_dataset(ann, 8)
    assert len(ds) == 3
    assert ds.skipped["missing_image"] == 1 and ds.skipped["empty_caption"] == 1
    assert ds.skipped["unknown_image_id"] == 1
    Path(ds.records[0].image).unlink()
    assert ds[0]["index"] == 1 and ds.skipped["missing_image"] == 2


def test_all_images_unreadable_raises(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.png").write_bytes(b"garbage")
    (root / "a.txt").write_text("cap")
    ds = build_dataset(root, 8)
    with pytest.raises(DatasetError, match="no image could be loaded"):
        ds[0]


def test_missing_path_and_empty_dataset_raise(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="nope"):
        build_dataset(missing, 8)
    with pytest.raises(DatasetError, match="nope.jsonl"):
        build_dataset(tmp_path / "nope.jsonl", 8)
    with pytest.raises(DatasetError, match="nope.json"):
        build_dataset({"type": "coco", "annotations": tmp_path / "nope.json", "images": tmp_path}, 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty.*no usable"):
        build_dataset(empty, 8)
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"image": "a.png", "caption": " "}) + "\n{not json\n")
    with pytest.raises(DatasetError, match="blank.jsonl") as err:
        build_dataset(blank, 8)
    assert "malformed_row" in str(err.value) and "empty_caption" in str(err.value)
    with pytest.raises(DatasetError, match="type"):
        build_dataset({"type": "parquet", "path": str(empty)}, 8)  # webdataset became a known type


def test_coco_without_image_folder_names_the_tried_paths(tmp_path):
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="val2017"):
        build_dataset(ann, 8)
    bad = tmp_path / "x" / "captions_train2017.json"
    (tmp_path / "train2017").mkdir()
    bad.parent.mkdir()
    bad.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="not a COCO captions file"):
        build_dataset(bad, 8)


# --------------------------------------------------------------------------- preprocessing
def test_preprocess_shape_range_and_centre_crop():
    arr = np.zeros((40, 100, 3), dtype=np.uint8)  # wide black image with a white middle band
    arr[:, 40:60] = 255
    x = preprocess_image(Image.fromarray(arr), 20)
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    # shorter side 40 -> 20, width 100 -> 50; the band lands on columns 20..30, the centre crop
    # keeps columns 15..35, so the band is crop columns 5..15 with black on both sides
    assert torch.allclose(x[:, :, 7:13], torch.ones(3, 20, 6), atol=0.02)
    assert torch.allclose(x[:, :, :3], -torch.ones(3, 20, 3), atol=0.02)
    assert torch.allclose(x[:, :, 17:], -torch.ones(3, 20, 3), atol=0.02)
    gray = preprocess_image(Image.new("L", (10, 30), 0), 10, resample="lanczos")
    assert gray.shape == (3, 10, 10) and torch.all(gray == -1.0)
    rgba = preprocess_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), 8)  # transparent -> white
    assert torch.all(rgba == 1.0)
    with pytest.raises(ValueError):
        preprocess_image(Image.new("RGB", (8, 8)), 0)


def test_collate_pairs_drops_none():
    items = [{"pixels": torch.zeros(3, 4, 4), "caption": f"c{i}", "index": i} for i in range(3)]
    batch = collate_pairs([items[0], None, items[2]])
    assert batch["pixels"].shape == (2, 3, 4, 4)
    assert batch["captions"] == ["c0", "c2"]
    assert batch["indices"].dtype == torch.long and batch["indices"].tolist() == [0, 2]
    with pytest.raises(DatasetError):
        collate_pairs([None])


def test_dataloader_with_workers(tmp_path):
    ann = _coco(tmp_path, n=4)
    ds = build_dataset(ann, 8, seed=1)
    ds.set_epoch(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_pairs, num_workers=2)
    caps = [c for b in loader for c in b["captions"]]
    assert caps == [ds.caption(i, 2) for i in range(4)]


# --------------------------------------------------------------------------- latent cache
def test_latent_cache_round_trip_shape_check_and_atomic_files(tmp_path):
    d = tmp_path / "cache"
    cache = LatentCache(d, shape=(4, 8, 8), meta={"vae": "tiny", "size": 64})
    lat = torch.randn(4, 8, 8)
    assert "img/a.png" not in cache and cache.get("img/a.png") is None
    cache.put("img/a.png", lat)
    assert "img/a.png" in cache
    got = cache.get("img/a.png")
    assert got.dtype == torch.float16 and got.shape == (4, 8, 8)
    torch.testing.assert_close(got, lat.half())
    assert LatentCache.bytes_per_item((16, 64, 64)) == 131_072
    assert LatentCache.bytes_per_item((4, 64, 64)) == 32_768

    with pytest.raises(LatentCacheError, match="shape"):
        cache.put("img/b.png", torch.randn(16, 8, 8))
    with pytest.raises(LatentCacheError, match="shape"):
        LatentCache(d, shape=(16, 8, 8))
    with pytest.raises(LatentCacheError, match="tiny"):
        LatentCache(d, meta={"vae": "other", "size": 64})
    reopened = LatentCache(d)  # shape and meta come from cache.json
    assert reopened.shape == (4, 8, 8)
    torch.testing.assert_close(reopened.get("img/a.png"), lat.half())

    # a stored latent of another shape (e.g. a file copied from another cache) is rejected on read
    other = LatentCache(tmp_path / "other", shape=(4, 4, 4))
    other.put("img/a.png", torch.zeros(4, 4, 4))
    other.path_for("img/a.png").replace(cache.path_for("img/a.png"))
    with pytest.raises(LatentCacheError, match="shape"):
        cache.get("img/a.png")

    with pytest.raises(LatentCacheError, match="finite"):
        cache.put("img/c.png", torch.full((4, 8, 8), 1e6))
    # no temporary files left behind by writes, failed or not
    assert not [p for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_latent_cache_damaged_entry_is_a_miss_and_first_put_fixes_shape(tmp_path):
    cache = LatentCache(tmp_path / "c")
    assert cache.shape is None
    cache.put("k", torch.ones(2, 3, 3))
    assert cache.shape == (2, 3, 3)
    assert LatentCache(tmp_path / "c").shape == (2, 3, 3)
    cache.path_for("k").write_bytes(b"\x00\x01truncated")
    assert cache.get("k") is None
    cache.put("k", torch.ones(2, 3, 3))
    assert torch.equal(cache.get("k"), torch.ones(2, 3, 3, dtype=torch.float16))
