"""Index readers for the (image, caption) sources softrepa trains on.

Each reader turns one on-disk format into a list of `Record`s (an image path and its usable
captions) without opening any image; `softrepa.data` turns records into a torch Dataset.

Formats:
  * Hugging Face ImageFolder: images + `metadata.jsonl` / `metadata.csv` rows {file_name, text}.
  * webdataset shards: tar files of `key.jpg|png|webp` + `key.txt|json`, indexed (stdlib tarfile).
  * Hugging Face `datasets`: a Hub dataset id or a `save_to_disk` folder (image / caption columns).
  * COCO captions JSON (`annotations/captions_train2017.json`): {"images": [{"id", "file_name"}],
    "annotations": [{"image_id", "caption"}]} + an image folder. One record per image, all of its
    captions (COCO has ~5 per image).
  * Image folder: every `x.png|jpg|jpeg|webp` (searched recursively) with a sibling `x.txt`;
    each non-blank line of `x.txt` is one caption.
  * Manifests: JSONL rows {"image": path, "caption": str | [str, ...]} or CSV with columns
    `image,caption`. Relative paths are resolved against the manifest's folder. Rows naming the
    same image are merged into one record (so every source means "one item per image").

What cannot be used is skipped and counted by reason in a `SkipLog` (a `collections.Counter`
plus rate-limited logging), never raised: a 118k-image crawl must not die on one bad row.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .checks import path_problem
from .errors import DatasetError

logger = logging.getLogger("softrepa.data")

#: GIF (first frame), TIFF and BMP are read too: an image folder never leaves a file neither used nor counted
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Record:
    """One training image and its candidate captions.

    Attributes:
        image: absolute path of the image file.
        captions: non-empty, stripped captions (at least one).
        key: a stable identifier of the image (path relative to the source root), used as the
            latent-cache key and in logs.
    """

    image: str
    captions: tuple[str, ...]
    key: str


class SkipLog:
    """Counts skipped samples by reason and logs the first few with their file names.

    Args:
        max_warnings: how many individual warnings to log before only counting.
    """

    def __init__(self, max_warnings: int = 5):
        self.counts: Counter[str] = Counter()
        self.max_warnings = max_warnings
        self._warned = 0

    def skip(self, reason: str, detail: str) -> None:
        """Count one skipped sample; warn with its name while under the warning budget."""
        self.counts[reason] += 1
        if self._warned < self.max_warnings:
            self._warned += 1
            logger.warning("skipping sample (%s): %s", reason, detail)
            if self._warned == self.max_warnings:
                logger.warning("further skipped samples are only counted (see the summary)")

    def summary(self, what: str) -> None:
        """Log one line with the per-reason counts (nothing when nothing was skipped)."""
        if self.counts:
            logger.warning("%s: skipped %d sample(s): %s", what, sum(self.counts.values()), dict(self.counts))


def clean_captions(captions: Iterable[object]) -> tuple[str, ...]:
    """Strip captions and drop empty / whitespace-only / non-string ones (order kept)."""
    out = []
    for c in captions:
        if isinstance(c, str):
            c = c.strip()
            if c:
                out.append(c)
    return tuple(out)


def _require(path: Path, expected: str) -> Path:
    if not path.exists():
        raise DatasetError(f"dataset path {str(path)!r} does not exist (expected {expected})")
    return path


def _relkey(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # absolute manifest entries outside the manifest's folder
        return path.as_posix()


def _record(image: Path, captions: tuple[str, ...], key: str, log: SkipLog, check_files: bool) -> Record | None:
    if not captions:
        log.skip("empty_caption", str(image))
        return None
    if check_files and not image.is_file():
        log.skip("missing_image", str(image))
        return None
    return Record(str(image), captions, key)


# --------------------------------------------------------------------------- COCO
def guess_coco_images_dir(annotations: Path) -> Path:
    """Find the image folder of a COCO captions file laid out the usual way.

    `coco/annotations/captions_train2017.json` -> `coco/train2017`; also tried: `<split>` and
    `images` beside the JSON file, and `coco/images`.

    Args:
        annotations: path of the captions JSON file.
    """
    split = annotations.stem.split("captions_", 1)[-1]  # "train2017"
    parent = annotations.parent
    candidates = [parent.parent / split, parent / split, parent / "images", parent.parent / "images"]
    for c in candidates:
        if c.is_dir():
            return c
    tried = ", ".join(repr(str(c)) for c in candidates)
    raise DatasetError(
        f"no image folder found for COCO annotations {str(annotations)!r}; tried {tried}. "
        "Pass the folder explicitly: --data_images DIR (data_images: in the config)."
    )


def coco_records(annotations: str | os.PathLike, images: str | os.PathLike | None, log: SkipLog, check_files: bool = True) -> list[Record]:
    """Records of a COCO captions JSON file.

    Args:
        annotations: the captions JSON (COCO `captions_*.json` format).
        images: the image folder; guessed next to the JSON when None.
        log: where skipped samples are counted.
        check_files: skip records whose image file does not exist (one stat per image).
    """
    ann_path = _require(Path(annotations).expanduser(), "a COCO captions JSON file")
    img_dir = guess_coco_images_dir(ann_path) if images is None else _require(Path(images).expanduser(), "the COCO image folder")
    try:
        with open(ann_path, encoding="utf-8") as f:
            data = json.load(f)
        images_meta, anns = data["images"], data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f"{str(ann_path)!r} is not a COCO captions file with 'images' and 'annotations' ({e!r})"
        ) from e

    if not (isinstance(images_meta, list) and isinstance(anns, list)):
        raise DatasetError(f"{str(ann_path)!r}: 'images' and 'annotations' must be lists (a COCO captions file)")
    captions: dict[object, list[str]] = {}
    for a in anns:
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), (int, str)):
            log.skip("malformed_row", f"{ann_path}: annotation {str(a)[:80]}")
            continue
        captions.setdefault(a["image_id"], []).append(a.get("caption"))
    for m in images_meta:
        if not isinstance(m, dict):
            log.skip("malformed_row", f"{ann_path}: image entry {str(m)[:80]}")
    images_meta = [m for m in images_meta if isinstance(m, dict)]
    known = {m.get("id") for m in images_meta if isinstance(m.get("id"), (int, str))}
    orphans = sum(len(v) for k, v in captions.items() if k not in known)
    if orphans:  # annotations that point at no image: count once, they are not samples
        log.counts["unknown_image_id"] += orphans

    records = []
    for meta in images_meta:  # file order: deterministic
        name = meta.get("file_name")
        if not isinstance(name, str) or not name:
            log.skip("malformed_row", f"{ann_path}: image entry {meta!r}")
            continue
        key = meta.get("id")
        caps = captions.get(key, ()) if isinstance(key, (int, str)) else ()
        rec = _record(img_dir / name, clean_captions(caps), name, log, check_files)
        if rec is not None:
            records.append(rec)
    return records


# --------------------------------------------------------------------------- image folder
def folder_records(root: str | os.PathLike, log: SkipLog, check_files: bool = True) -> list[Record]:
    """Records of an image folder with `x.txt` caption files next to each image `x.<ext>`.

    Args:
        root: the folder (searched recursively; sorted, so the order is deterministic).
        log: where skipped samples are counted (images without a caption file count as
            "missing_caption", blank caption files as "empty_caption").
        check_files: unused (files are found by listing); kept for a uniform signature.
    """
    root = _require(Path(root).expanduser(), "a folder of images with .txt caption files")
    if not root.is_dir():
        raise DatasetError(f"dataset path {str(root)!r} is not a folder (expected images with .txt captions)")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    records = []
    for img in images:
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            log.skip("missing_caption", str(img))
            continue
        try:
            lines = txt.read_bytes().decode("utf-8").splitlines()
        except OSError as e:
            log.skip("unreadable_caption", f"{txt} ({e})")
            continue
        except UnicodeDecodeError as e:  # never train on U+FFFD replacement text
            log.skip("caption_not_utf8", f"{txt}: invalid UTF-8 at byte {e.start}")
            continue
        rec = _record(img, clean_captions(lines), _relkey(img, root), log, check_files=False)
        if rec is not None:
            records.append(rec)
    return records


# --------------------------------------------------------------------------- manifests
def _manifest_rows(path: Path, image_key: str, caption_key: str, log: SkipLog):
    """Yield (line number, image, captions) of a JSONL or CSV manifest; malformed rows are skipped."""
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    log.skip("malformed_row", f"{path}:{n}: invalid UTF-8 at byte {e.start} of the line")
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    image, cap = row[image_key], row.get(caption_key)
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.skip("malformed_row", f"{path}:{n}")
                    continue
                yield n, image, (cap if isinstance(cap, list) else [cap])
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # csv cannot skip one row of a file it cannot decode
            line = raw[:e.start].count(b"\n") + 1
            raise DatasetError(f"CSV manifest {str(path)!r}: invalid UTF-8 on line {line} (byte {e.start}); "
                               "save it as UTF-8") from e
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or image_key not in reader.fieldnames or caption_key not in reader.fieldnames:
                raise DatasetError(
                    f"CSV manifest {str(path)!r} needs columns {image_key!r} and {caption_key!r}, "
                    f"has {reader.fieldnames}"
                )
            try:
                for row in reader:
                    yield reader.line_num, row.get(image_key), [row.get(caption_key)]
            except csv.Error as e:  # e.g. a field over csv's 128 KB limit: the rest cannot be parsed reliably
                raise DatasetError(f"CSV manifest {str(path)!r}, line {reader.line_num + 1}: {e}") from e


def manifest_records(
    path: str | os.PathLike,
    log: SkipLog,
    check_files: bool = True,
    image_key: str = "image",
    caption_key: str = "caption",
) -> list[Record]:
    """Records of a JSONL or CSV manifest; rows of the same image are merged.

    Args:
        path: the `.jsonl` / `.csv` manifest.
        log: where skipped samples are counted.
        check_files: skip records whose image file does not exist.
        image_key: the image column / JSON field.
        caption_key: the caption column / JSON field (JSONL: a string or a list of strings).
    """
    path = _require(Path(path).expanduser(), "a .jsonl or .csv manifest")
    base = path.parent
    merged: dict[Path, list[str]] = {}  # insertion-ordered: first appearance of each image
    for n, image, caps in _manifest_rows(path, image_key, caption_key, log):
        if not isinstance(image, str) or not image.strip():
            log.skip("malformed_row", f"{path}:{n}")
            continue
        img = Path(image.strip()).expanduser()
        img = img if img.is_absolute() else base / img
        problem = path_problem(img)
        if problem:  # a 300-character file name: this row is skipped, not the whole manifest
            log.skip("malformed_row", f"{path}:{n}: {problem}")
            continue
        merged.setdefault(img, []).extend(c for c in caps if c is not None)
    records = []
    for img, caps in merged.items():
        rec = _record(img, clean_captions(caps), _relkey(img, base), log, check_files)
        if rec is not None:
            records.append(rec)
    return records


# --------------------------------------------------------------------------- ImageFolder + metadata
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def metadata_files(root: Path) -> list[Path]:
    """The `metadata.jsonl` / `metadata.csv` files of a Hugging Face ImageFolder (any depth, sorted)."""
    return sorted(p for name in METADATA_FILES for p in root.rglob(name) if p.is_file())


def imagefolder_records(root: str | os.PathLike, log: SkipLog, check_files: bool = True,
                        caption_key: str | None = None) -> list[Record]:
    """Records of a Hugging Face ImageFolder: images with `metadata.jsonl` / `.csv` rows
    {"file_name": path relative to the metadata file, "text": caption (or a list)}.

    The layout `datasets.load_dataset("imagefolder", data_dir=root)` and diffusers' training
    scripts (`--train_data_dir`) read; read here without `datasets`, since it is a manifest.

    Args:
        root: the folder.
        log: where skipped samples are counted.
        check_files: skip rows whose image file does not exist.
        caption_key: the caption column (default: the first of text, caption, captions, prompt
            that the metadata has).
    Raises:
        DatasetError: no metadata file, or a metadata file without `file_name` / the caption column
            (named, with the columns it has).
    """
    root = _require(Path(root).expanduser(), "an ImageFolder with metadata.jsonl")
    files = metadata_files(root)
    if not files:
        raise DatasetError(f"{str(root)!r}: no metadata.jsonl or metadata.csv (expected an ImageFolder)")
    records: list[Record] = []
    for meta in files:
        key = caption_key or _caption_column(meta)
        for rec in manifest_records(meta, log, check_files, image_key="file_name", caption_key=key):
            records.append(Record(rec.image, rec.captions, _relkey(Path(rec.image), root)))
    return records


def _caption_column(meta: Path) -> str:
    """The caption column of a metadata file: the first known name its first row / header has."""
    names: list[str] = []
    with open(meta, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if meta.suffix == ".csv":
        names = [n.strip() for n in next(csv.reader([first]), [])]
    else:
        try:
            names = list(json.loads(first))
        except (ValueError, TypeError):
            names = []
    for cand in CAPTION_COLUMNS:
        if cand in names:
            return cand
    raise DatasetError(f"{meta}: no caption column: expected one of {list(CAPTION_COLUMNS)} "
                       f"(columns: {names}); name it with caption_key")


#: caption column names tried, in order, when none is given
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")


# --------------------------------------------------------------------------- webdataset shards
# Shards are read with the stdlib `tarfile` rather than the `webdataset` package: training needs
# random access (a seeded permutation per epoch, exact resume), so the shards are indexed once
# (member offsets) and each sample is read by seeking to it; `webdataset` streams sequentially.
SHARD_SEP = "::"
#: shards one brace range may name
MAX_SHARDS = 1_000_000


def expand_shards(spec: str) -> list[Path]:
    """Shard files of a spec: one `.tar`, a brace range `data/{000000..000099}.tar`, a glob
    `data/*.tar`, or a folder of `.tar` files (sorted).

    Args:
        spec: as above.
    Raises:
        DatasetError: nothing matches (the spec is named).
    """
    import glob
    import re

    m = re.search(r"\{(\d{1,12})\.\.(\d{1,12})\}", spec)
    if m:  # webdataset's brace notation, zero-padded to the width written
        lo, hi, width = int(m[1]), int(m[2]), len(m[1])
        if not 0 < hi - lo + 1 <= MAX_SHARDS:  # {0..999999999} would be a list of 10^9 names
            raise DatasetError(f"webdataset {spec!r}: the range {m[0]} must name 1 to {MAX_SHARDS} shards")
        names = [spec[:m.start()] + str(i).zfill(width) + spec[m.end():] for i in range(lo, hi + 1)]
        paths = [Path(n).expanduser() for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"webdataset {spec!r}: {len(missing)} shard(s) missing, e.g. {missing[:3]}")
        return paths
    path = Path(spec).expanduser()
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
    elif any(c in spec for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(str(path)))
    else:
        paths = [path] if path.is_file() else []
    if not paths:
        raise DatasetError(f"webdataset {spec!r}: no .tar shard found")
    return paths


def _sample_key(name: str) -> tuple[str, str]:
    """("dir/x", "jpg") of a member "dir/x.jpg"; webdataset's rule: the extension starts at the
    first dot of the file name, so "x.seg.png" belongs to sample "x"."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _shard_caption(data: bytes, ext: str, caption_key: str | None) -> list[object]:
    text = data.decode("utf-8")  # UnicodeDecodeError: counted by the caller
    if ext == "txt":
        return text.splitlines()
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for key in ([caption_key] if caption_key else CAPTION_COLUMNS):
        if key in obj:
            v = obj[key]
            return v if isinstance(v, list) else [v]
    raise ValueError(f"no caption field ({caption_key or ', '.join(CAPTION_COLUMNS)})")


def shard_records(spec: str | os.PathLike, log: SkipLog, caption_key: str | None = None) -> list[Record]:
    """Records of webdataset shards: tar files of samples `key.jpg|png|webp` + `key.txt` or `key.json`.

    Each record's `image` is `shard.tar::offset:size` (read by `softrepa.data.ShardPairDataset`);
    `key` is `shard.tar/key`. Bad samples are skipped and counted, never raised: no image
    ("missing_image"), no caption ("missing_caption"), a caption that is not UTF-8 / valid JSON
    ("caption_not_utf8" / "malformed_row"), blank captions ("empty_caption"), a shard cut short
    ("truncated_shard": its samples up to the damage are kept). Undecodable images are found
    when loaded ("unreadable_image").

    Args:
        spec: see `expand_shards`.
        log: where skipped samples are counted.
        caption_key: the field of `.json` captions (default: text, caption, captions, prompt).
    """
    import tarfile

    records: list[Record] = []
    for shard in expand_shards(str(spec)):
        samples: dict[str, dict[str, object]] = {}
        file_size = shard.stat().st_size
        end = 0  # where the last member's (padded) data ends
        cut: set[str] = set()  # samples with a member running past the end of the file
        dup: set[str] = set()  # keys with two images or two captions (webdataset keeps the last silently)
        try:
            with tarfile.open(shard, "r:") as tar:  # "r:": uncompressed, so members can be seeked to
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _sample_key(m.name)
                    end = max(end, m.offset_data + -(-m.size // 512) * 512)
                    if m.offset_data + m.size > file_size:
                        cut.add(key)
                        continue
                    s = samples.setdefault(key, {})
                    is_image = "." + ext in IMAGE_EXTENSIONS
                    # the same member twice, or two images for one key: which one is meant? (reported)
                    if ext in s.setdefault("exts", set()) or (is_image and "image" in s):
                        dup.add(key)
                    s["exts"].add(ext)
                    if is_image:
                        s["image"] = (m.offset_data, m.size)
                    elif ext == "txt" or (ext == "json" and "caption" not in s):  # .txt wins over .json
                        s["caption"] = (ext, tar.extractfile(m).read())
        except (tarfile.TarError, OSError, EOFError) as e:
            if not samples:
                raise DatasetError(f"webdataset shard {str(shard)!r} is not a readable tar file ({e})") from e
            cut.add(f"<after the last readable member: {e}>")
        # tarfile stops quietly at the end of a cut file: a shard without its end-of-archive blocks
        # (two zero records after the last member) lost its tail
        if end and end + 1024 > file_size:
            cut.add("<end of archive missing>")
        for key in sorted(cut):
            samples.pop(key, None)
            log.skip("truncated_shard", f"{shard}: sample {key} is cut short; the shard's earlier samples are used")
        for key in sorted(dup - cut):
            samples.pop(key, None)
            log.skip("duplicate_key", f"{shard}: sample key {key!r} has two images or two captions")
        for key, s in samples.items():
            name = f"{shard.name}/{key}"
            if "image" not in s:
                log.skip("missing_image", name)
                continue
            if "caption" not in s:
                log.skip("missing_caption", name)
                continue
            ext, data = s["caption"]
            try:
                caps = _shard_caption(data, ext, caption_key)
            except UnicodeDecodeError as e:
                log.skip("caption_not_utf8", f"{name}.{ext}: invalid UTF-8 at byte {e.start}")
                continue
            except ValueError as e:
                log.skip("malformed_row", f"{name}.{ext}: {e}")
                continue
            captions = clean_captions(caps)
            if not captions:
                log.skip("empty_caption", name)
                continue
            offset, size = s["image"]
            records.append(Record(f"{shard}{SHARD_SEP}{offset}:{size}", captions, name))
    return records


# --------------------------------------------------------------------------- Hugging Face datasets
def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def open_hf_dataset(path: str, *, split: str = "train", from_disk: bool = False, name: str | None = None,
                    revision: str | None = None) -> object:
    """A `datasets.Dataset`: `load_from_disk(path)` or `load_dataset(path, name, split=, revision=)`.

    Args:
        path: a saved-dataset folder, or a Hub dataset id (the Hub cache and HF_HUB_OFFLINE /
            HF_DATASETS_OFFLINE apply).
        split: the split (of a DatasetDict / a Hub dataset).
        from_disk: `path` is a `save_to_disk` folder.
        name: the Hub dataset's configuration.
        revision: the Hub dataset's revision.
    Raises:
        DatasetError: `datasets` is not installed, the dataset / split cannot be loaded (one line
            naming the id or folder).
    """
    try:
        import datasets
    except ImportError as e:
        raise DatasetError(f"data {path!r}: Hugging Face datasets need the datasets package: "
                           "pip install 'softrepa[datasets]'") from e
    try:
        if from_disk:
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetError(f"data {path!r}: no split {split!r} (splits: {list(ds)})")
                ds = ds[split]
            return ds
        return datasets.load_dataset(path, name, split=split, revision=revision)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types (hub, offline, split, schema)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        what = "the saved dataset" if from_disk else "no such local path, and cannot load the Hugging Face dataset"
        raise DatasetError(f"data {path!r}: {what} ({type(e).__name__}: {first})") from e


def hf_records(ds: object, source: str, log: SkipLog, image_column: str | None = None,
               caption_column: str | None = None) -> tuple[list[Record], str]:
    """Records of a `datasets.Dataset`: `image` is `<source>::<row>`, read by `softrepa.data.HFPairDataset`.

    Only the caption column is read here; images are decoded when loaded.

    Args:
        ds: the dataset.
        source: its id / folder (for keys and messages).
        log: where skipped samples are counted.
        image_column: the image column (default: "image", else the only column of Image type).
        caption_column: the caption column (default: text, caption, captions, prompt).
    Returns:
        (records, the image column used).
    Raises:
        DatasetError: a named column is missing, or none can be guessed (the columns are listed).
    """
    columns = list(ds.column_names)
    features = getattr(ds, "features", {}) or {}
    if image_column is None:
        images = [c for c in columns if type(features.get(c)).__name__ == "Image"]
        image_column = "image" if "image" in columns else (images[0] if len(images) == 1 else None)
        if image_column is None:
            raise DatasetError(f"data {source!r}: cannot tell the image column (columns: {columns}); "
                               "give image_column")
    if image_column not in columns:
        raise DatasetError(f"data {source!r}: no image column {image_column!r} (columns: {columns})")
    if caption_column is None:
        caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if caption_column is None:
            raise DatasetError(f"data {source!r}: no caption column, expected one of {list(CAPTION_COLUMNS)} "
                               f"(columns: {columns}); give caption_column")
    if caption_column not in columns:
        raise DatasetError(f"data {source!r}: no caption column {caption_column!r} (columns: {columns})")
    records = []
    for i, cap in enumerate(ds[caption_column]):
        caps = clean_captions(cap if isinstance(cap, list) else [cap])
        if not caps:
            log.skip("empty_caption", f"{source} row {i}")
            continue
        records.append(Record(f"{source}{SHARD_SEP}{i}", caps, f"{source}/{i}"))
    return records, image_column
