"""Index readers for the (image, caption) sources softrepa trains on.

Each reader turns one on-disk format into a list of `Record`s (an image path and its usable
captions) without opening any image; `softrepa.data` turns records into a torch Dataset.

Formats:
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

from .errors import DatasetError

logger = logging.getLogger("softrepa.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


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

    captions: dict[object, list[str]] = {}
    for a in anns:
        captions.setdefault(a.get("image_id"), []).append(a.get("caption"))
    known = {m.get("id") for m in images_meta}
    orphans = sum(len(v) for k, v in captions.items() if k not in known)
    if orphans:  # annotations that point at no image: count once, they are not samples
        log.counts["unknown_image_id"] += orphans

    records = []
    for meta in images_meta:  # file order: deterministic
        name = meta.get("file_name")
        if not isinstance(name, str) or not name:
            log.skip("malformed_row", f"{ann_path}: image entry {meta!r}")
            continue
        rec = _record(img_dir / name, clean_captions(captions.get(meta.get("id"), ())), name, log, check_files)
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
            for n, row in enumerate(reader, 2):  # line 1 is the header
                yield n, row.get(image_key), [row.get(caption_key)]


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
        merged.setdefault(img, []).extend(c for c in caps if c is not None)
    records = []
    for img, caps in merged.items():
        rec = _record(img, clean_captions(caps), _relkey(img, base), log, check_files)
        if rec is not None:
            records.append(rec)
    return records
