"""Training data: (image, caption) pairs from COCO / image folders / manifests / ImageFolders with
metadata.jsonl / webdataset shards / Hugging Face datasets, batching.

    ds = build_dataset("coco/annotations/captions_train2017.json", size=512, seed=0)
    loader = DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate_pairs, num_workers=8)
    for epoch in range(n):
        ds.set_epoch(epoch)          # before iterating: workers copy the dataset per epoch
        for batch in loader: ...     # {"pixels": (B,3,S,S) in [-1,1], "captions": [...], "indices": (B,)}

Each item is one image; its caption is drawn among the image's captions with a generator
seeded by (seed, epoch, index), so a run is reproducible and every caption is seen over epochs.

Robustness. Blank captions, images without captions and missing files are dropped when the
index is built (counted in `dataset.skipped`, a Counter by reason). Images that fail to decode
are only discovered when loaded: `__getitem__` then counts "unreadable_image", remembers the
index as bad, and deterministically returns the next loadable index (index+1, index+2, ...
wrapping around). The returned item's "index" is the substitute's, so a batch may hold a
duplicate pair; the loss's duplicate-caption mask makes such a duplicate no negative.
`collate_pairs` also drops `None` items, for datasets that signal bad samples that way.
With DataLoader workers each worker counts its own load-time skips (and logs them).

The latent cache (`LatentCache`) lives in `softrepa.latent_cache` and is re-exported here.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .data_sources import (
    IMAGE_EXTENSIONS,
    SHARD_SEP,
    DatasetError,
    Record,
    SkipLog,
    coco_records,
    expand_shards,
    folder_records,
    hf_records,
    imagefolder_records,
    is_saved_dataset,
    manifest_records,
    metadata_files,
    open_hf_dataset,
    shard_records,
)
from .checks import image_size_ok, upright_8bit
from .errors import ConfigError, UsageError
from .latent_cache import LatentCache, LatentCacheError

logger = logging.getLogger("softrepa.data")

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}
SOURCE_TYPES = ("coco", "folder", "manifest", "imagefolder", "webdataset", "hf", "hf_disk")

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "LatentCache",
    "LatentCacheError",
    "HFPairDataset",
    "PairDataset",
    "Record",
    "ShardPairDataset",
    "build_dataset",
    "check_data_spec",
    "collate_pairs",
    "load_image",
    "preprocess_image",
]


# --------------------------------------------------------------------------- images
def preprocess_image(image: Image.Image, size: int, resample: str = "bicubic") -> torch.Tensor:
    """RGB, shorter side resized to `size`, centre crop size x size, scaled to [-1, 1].

    Args:
        image: a PIL image of any mode (alpha is composited on white, not dropped to black).
        size: output side in pixels.
        resample: "bicubic" (default), "lanczos" or "bilinear".

    Returns:
        (3, size, size) float32 tensor in [-1, 1].
    """
    if size <= 0:
        raise UsageError(f"size must be positive, got {size}")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    # max(size, ...) guards against rounding the shorter side below `size`
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), resample=RESAMPLE[resample], reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.uint8)  # (size, size, 3)
    pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, size, size) uint8
    return pixels.to(torch.float32) / 127.5 - 1.0


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image (PIL is lazy; decoding here surfaces corrupt files).

    Args:
        path: image file path.
    """
    with Image.open(path) as im:
        image_size_ok(im, path)  # a decompression bomb is refused before it is decoded
        im.load()
        # a copy (closing the file releases the decoded core of a file-backed image), upright, 8-bit
        return upright_8bit(im.copy())


# --------------------------------------------------------------------------- dataset
class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of (image, caption) pairs, one item per image.

    Args:
        records: the images and their captions (see `softrepa.data_sources`).
        size: output resolution (square).
        seed: seed of the per-epoch caption choice.
        resample: resize filter ("bicubic", "lanczos", "bilinear").
        source: a description of where the records came from (for messages).
        skipped: index-time skip counts to start from.
        max_warnings: individual warnings logged for load-time skips before only counting.
    """

    def __init__(
        self,
        records: Sequence[Record],
        size: int,
        seed: int = 0,
        resample: str = "bicubic",
        source: str = "<records>",
        skipped: Mapping[str, int] | None = None,
        max_warnings: int = 5,
    ):
        if resample not in RESAMPLE:
            raise ConfigError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
        if not records:
            raise DatasetError(f"dataset {source!r} has no usable (image, caption) pair; skipped: {dict(skipped or {})}")
        self.records = list(records)
        self.size, self.seed, self.resample, self.source = int(size), int(seed), resample, source
        self.epoch = 0
        self._log = SkipLog(max_warnings)
        self._log.counts.update(skipped or {})
        self._bad: set[int] = set()  # indices known to fail decoding (per process)

    @property
    def skipped(self) -> Counter:
        """Skipped samples by reason (index time + load time in this process)."""
        return self._log.counts

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose caption draw `__getitem__` uses.

        Args:
            epoch: epoch number (any int).
        """
        self.epoch = int(epoch)

    def caption_index(self, index: int, epoch: int | None = None) -> int:
        """Which of image `index`'s captions is used in `epoch` (default: the current one).

        A generator seeded by (seed, epoch, index) through numpy's SeedSequence: independent of
        the order in which items are loaded, of the number of workers, and of the platform.
        """
        n = len(self.records[index].captions)
        if n == 1:
            return 0
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, index])
        return int(rng.integers(n))

    def caption(self, index: int, epoch: int | None = None) -> str:
        """The caption of image `index` in `epoch` (default: the current one)."""
        return self.records[index].captions[self.caption_index(index, epoch)]

    def open_image(self, record: Record) -> Image.Image:
        """The decoded image of a record (subclasses read shards / datasets rows)."""
        return load_image(record.image)

    def describe(self, record: Record) -> str:
        """How messages name a record's image (a file path here)."""
        return record.image

    def _load(self, index: int) -> dict[str, Any] | None:
        rec = self.records[index]
        try:
            image = self.open_image(rec)
        except FileNotFoundError:
            self._log.skip("missing_image", self.describe(rec))
            return None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; never crash a run
            self._log.skip("unreadable_image", f"{self.describe(rec)} ({type(e).__name__}: {e})")
            return None
        return {
            "pixels": preprocess_image(image, self.size, self.resample),  # (3, S, S)
            "caption": self.caption(index),
            "index": index,
            "key": rec.key,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item `index`, or the next loadable one when its image cannot be decoded.

        Returns:
            {"pixels": (3, size, size) float32 in [-1, 1], "caption": str, "index": int, "key": str}
        """
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(index)
        index %= n
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            item = self._load(j)
            if item is not None:
                return item
            self._bad.add(j)
        raise DatasetError(f"dataset {self.source!r}: no image could be loaded; skipped: {dict(self.skipped)}")

    def __repr__(self) -> str:
        return f"PairDataset({self.source!r}, items={len(self)}, size={self.size}, seed={self.seed}, epoch={self.epoch})"


class ShardPairDataset(PairDataset):
    """A `PairDataset` over webdataset shards: records point at `shard.tar::offset:size`, the
    image bytes are read by seeking there (indexed access: seeded epochs and exact resume work
    as with files). Undecodable images are skipped and counted like any other source's."""

    def open_image(self, record: Record) -> Image.Image:
        import io

        shard, _, where = record.image.rpartition(SHARD_SEP)
        offset, size = (int(x) for x in where.split(":"))
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError("the shard ends inside the sample")
        with Image.open(io.BytesIO(data)) as im:
            image_size_ok(im, self.describe(record))
            im.load()
            return upright_8bit(im.copy())

    def describe(self, record: Record) -> str:
        shard = record.image.rpartition(SHARD_SEP)[0]
        return f"sample {record.key} of {shard}"


class HFPairDataset(PairDataset):
    """A `PairDataset` over a `datasets.Dataset`: records point at `<source>::<row>`; the image
    column is decoded when the item is loaded (a PIL image, or a dict with bytes / path)."""

    def __init__(self, records: Sequence[Record], size: int, hf_dataset: Any, image_column: str, **kw: Any):
        super().__init__(records, size, **kw)
        self.hf_dataset, self.image_column = hf_dataset, image_column

    def open_image(self, record: Record) -> Image.Image:
        import io

        row = int(record.image.rpartition(SHARD_SEP)[2])
        value = self.hf_dataset[row][self.image_column]
        if isinstance(value, dict):  # an undecoded Image feature / a plain struct
            value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, (str, os.PathLike)):
            value = Image.open(value)
        if not isinstance(value, Image.Image):
            raise TypeError(f"column {self.image_column!r} holds {type(value).__name__}, not an image")
        image_size_ok(value, self.describe(record))
        value.load()
        return upright_8bit(value)

    def describe(self, record: Record) -> str:
        return f"row {record.image.rpartition(SHARD_SEP)[2]} of {self.source} (column {self.image_column!r})"


def collate_pairs(batch: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Stack items into a batch; `None` items are dropped.

    Args:
        batch: items of `PairDataset` (or any dataset yielding the same keys, or None).

    Returns:
        {"pixels": (B, 3, H, W) float tensor, "captions": list[str], "indices": (B,) LongTensor,
        "keys": list[str]} with B the number of non-None items.
    """
    items = [b for b in batch if b is not None]
    if not items:
        raise DatasetError("collate_pairs got a batch without any usable item")
    return {
        "pixels": torch.stack([b["pixels"] for b in items]),  # (B, 3, H, W)
        "captions": [b["caption"] for b in items],
        "indices": torch.tensor([int(b["index"]) for b in items], dtype=torch.long),  # (B,)
        "keys": [b.get("key", str(b["index"])) for b in items],
    }


# --------------------------------------------------------------------------- factory
def _is_shard_spec(text: str) -> bool:
    import re

    return text.endswith(".tar") or bool(re.search(r"\{\d+\.\.\d+\}", text)) or (
        any(c in text for c in "*?[") and ".tar" in text)


def _hub_dataset_id(text: str) -> str | None:
    """`hf://datasets/owner/name`, `hf:owner/name` or a bare `owner/name` -> "owner/name"."""
    import re

    for prefix in ("hf://datasets/", "hf:"):
        if text.startswith(prefix):
            return text[len(prefix):]
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not text.endswith((".json", ".jsonl", ".csv", ".tar")):
        return text
    return None


def _spec_from_path(path: Path, images) -> dict[str, Any]:
    text = str(path)
    if not path.exists() and _is_shard_spec(text):
        return {"type": "webdataset", "path": text}
    if path.is_dir():
        if is_saved_dataset(path):
            return {"type": "hf_disk", "path": path}
        if metadata_files(path):
            return {"type": "imagefolder", "path": path}
        if any(p.suffix == ".tar" for p in path.iterdir()) and not any(
                p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
            return {"type": "webdataset", "path": text}
        return {"type": "folder", "path": path}
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return {"type": "webdataset", "path": text}
    if suffix in (".jsonl", ".csv"):
        return {"type": "manifest", "path": path}
    if suffix == ".json":
        return {"type": "coco", "annotations": path, "images": images}
    if not path.exists():
        hub = _hub_dataset_id(text)
        if hub is not None:
            return {"type": "hf", "path": hub}
        raise DatasetError(
            f"dataset path {str(path)!r} does not exist (expected an image folder, a .jsonl/.csv "
            "manifest, a COCO captions .json, webdataset .tar shards or a Hugging Face dataset id)"
        )
    raise DatasetError(
        f"cannot tell the dataset type of {str(path)!r}: expected an image folder, a .jsonl/.csv "
        "manifest or a COCO captions .json"
    )


def build_dataset(
    spec: str | os.PathLike | Mapping[str, Any],
    size: int,
    seed: int = 0,
    *,
    images: str | os.PathLike | None = None,
    resample: str = "bicubic",
    check_files: bool = True,
    max_items: int | None = None,
    image_key: str = "image",
    caption_key: str = "caption",
) -> PairDataset:
    """Build a `PairDataset` from a path or an explicit spec.

    A path picks the source by what it is: a folder -> image folder with .txt captions;
    `.jsonl` / `.csv` -> manifest; `.json` -> COCO captions (images from `images`, or guessed
    next to it: `coco/annotations/captions_X.json` -> `coco/X`). A dict names the type:
    {"type": "coco", "annotations": ..., "images": ...}, {"type": "folder", "path": ...},
    {"type": "manifest", "path": ..., "image_key": ..., "caption_key": ...}, and:

    * a folder with `metadata.jsonl` / `.csv` (`file_name`, `text`): a Hugging Face ImageFolder
      ({"type": "imagefolder", "path": ..., "caption_column": ...});
    * `.tar` files, a folder of them, `shards/{000000..000009}.tar` or a glob: webdataset shards
      of `key.jpg|png|webp` + `key.txt|json` ({"type": "webdataset", "path": ..., "caption_column": ...});
    * a folder written by `datasets`' `save_to_disk` ({"type": "hf_disk", "path": ..., "split": ...,
      "image_column": ..., "caption_column": ...});
    * a Hub dataset id `owner/name` (also `hf:owner/name`, `hf://datasets/owner/name`), loaded with
      `datasets.load_dataset` ({"type": "hf", "path": ..., "name": config, "split": "train",
      "revision": ..., "image_column": ..., "caption_column": ...}); needs `softrepa[datasets]`.

    Column defaults: image "image" (or the only Image column); caption the first of text, caption,
    captions, prompt. A local path always wins over a Hub id of the same spelling.

    Args:
        spec: path or dict as above.
        size: output resolution (square side).
        seed: seed of the per-epoch caption choice.
        images: COCO image folder when `spec` is a path to a .json file.
        resample: resize filter ("bicubic", "lanczos", "bilinear").
        check_files: drop records whose image file does not exist (one stat per image).
        max_items: keep only the first `max_items` usable records (quick runs, debugging).
        image_key: manifest image column / field.
        caption_key: manifest caption column / field.

    Raises:
        DatasetError: missing path, unknown layout, or no usable (image, caption) pair.
    """
    if isinstance(spec, Mapping):
        spec = dict(spec)
    elif not str(spec).strip():  # Path("") is the current folder: never scan it by accident
        raise DatasetError("data is empty: give the dataset with --data (or data: in the config)")
    else:
        hub = _hub_dataset_id(str(spec)) if str(spec).startswith("hf:") else None
        spec = {"type": "hf", "path": hub} if hub else _spec_from_path(Path(spec).expanduser(), images)
    kind = spec.pop("type", None)
    log = SkipLog()
    cls, extra = PairDataset, {}
    if kind == "coco":
        source = str(spec["annotations"])
        records = coco_records(spec["annotations"], spec.get("images"), log, check_files)
    elif kind == "folder":
        source = str(spec["path"])
        records = folder_records(spec["path"], log, check_files)
    elif kind == "manifest":
        source = str(spec["path"])
        records = manifest_records(
            spec["path"], log, check_files, spec.get("image_key", image_key), spec.get("caption_key", caption_key)
        )
    elif kind == "imagefolder":
        source = str(spec["path"])
        records = imagefolder_records(spec["path"], log, check_files, spec.get("caption_column"))
    elif kind == "webdataset":
        source = str(spec["path"])
        records = shard_records(spec["path"], log, spec.get("caption_column"))
        cls = ShardPairDataset
    elif kind in ("hf", "hf_disk"):
        source = str(spec["path"])
        ds = open_hf_dataset(source, split=spec.get("split", "train"), from_disk=kind == "hf_disk",
                             name=spec.get("name"), revision=spec.get("revision"))
        records, column = hf_records(ds, source, log, spec.get("image_column"), spec.get("caption_column"))
        cls, extra = HFPairDataset, {"hf_dataset": ds, "image_column": column}
    else:
        raise DatasetError(f"dataset spec type must be one of {SOURCE_TYPES}, got {kind!r}")
    log.summary(f"dataset {source!r}")
    if max_items is not None:
        records = records[: int(max_items)]
    if not records:
        raise DatasetError(
            f"dataset {source!r} has no usable (image, caption) pair (expected {kind} data); "
            f"skipped: {dict(log.counts)}"
        )
    logger.info("dataset %r: %d images (%s)", source, len(records), kind)
    return cls(records, size, seed=seed, resample=resample, source=source, skipped=log.counts, **extra)


def check_data_spec(spec: Any, option: str = "--data") -> None:
    """Fail in milliseconds on a `--data` that cannot be a dataset (before any model loads).

    A local path must exist; webdataset shard patterns must match shards; Hub dataset ids
    (`owner/name`, `hf:owner/name`, `hf://datasets/owner/name`) and dict specs pass (they are
    checked when loaded).

    Args:
        spec: the data spec (string or mapping).
        option: the option name for the message.
    Raises:
        FileNotFoundError: a missing local path; DatasetError: a shard pattern matching nothing.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return
    text = str(spec)
    if not text.strip():
        raise DatasetError(f"{option} is empty: give the dataset (a folder, manifest, COCO .json, shards or a Hub id)")
    path = Path(text).expanduser()
    if path.exists() or text.startswith(("hf:", "hf://")):
        return
    if _is_shard_spec(text):
        expand_shards(text)
        return
    if _hub_dataset_id(text) is None:
        raise FileNotFoundError(f"{option}: {text!r} does not exist (no such file or folder)")
