"""What `softrepa evaluate` scores: the images of a folder, their prompts and their pairs.

A folder of images with the generator's `metadata.jsonl` (one row per image with at least "file"
and "prompt"; edits add "source_image", or, as `softrepa edit` writes them, "image" (the source)
and "target_prompt" (scored against); an optional "reference_image" names a per-image
reference), or a prompt file (`--prompts`: .txt one prompt per line in sorted file order, or
.jsonl / .json / .csv with file + prompt). Constant metadata fields (guidance scale, steps,
tokens, ...) are the run's settings (`run_info`), which `softrepa compare` uses to detect CFG
sweeps.

Pairs (`image_pairs`, for the `PER_PAIR` metrics such as lpips): per image, the metadata
"source_image" (edits: edit vs source); else "reference_image"; else, with `--reference-captions
captions_val2017.json`, the COCO image whose caption was the prompt (metadata "prompt_index", as
`softrepa generate` numbers COCO prompts); else the `--reference` image with the same file stem.
Generation: the SoftREPA authors compare each COCO-prompt sample with the COCO image it was
captioned from. Every image needs a pair; the pairing used is recorded.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import DatasetError, UsageError
from .common import MetricError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Metadata keys that hold the (target) guidance scale, in the order they are looked up.
CFG_KEYS = ("tar_cfg", "target_guidance_scale", "tar_cfg_scale", "target_cfg", "guidance_scale", "cfg_scale", "cfg")


@dataclass
class EvalItem:
    """One image to score and what it is compared with."""

    file: str
    path: Path
    prompt: str | None = None
    source: Path | None = None
    reference: Path | None = None
    meta: dict = field(default_factory=dict)


def _resolve(base: Path, p: str | None) -> Path | None:
    if not p:
        return None
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def _read_table(path: Path) -> list[dict]:
    """Rows of a .jsonl / .json / .csv table; not UTF-8, not JSON or not rows: one line naming file and line."""
    from ..checks import json_loads, read_text

    if path.suffix not in (".jsonl", ".json", ".csv"):
        raise DatasetError(f"{path}: prompts must be .txt, .jsonl, .json or .csv")
    text = read_text(path, "table")
    if path.suffix == ".jsonl":
        rows = [json_loads(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif path.suffix == ".json":
        data = json_loads(text, str(path))
        rows = data if isinstance(data, list) else (
            [{"file": k, "prompt": v} for k, v in data.items()] if isinstance(data, dict) else None)
    else:
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as e:
            raise DatasetError(f"{path}: not a readable CSV table ({e})") from e
    if rows is None or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{path}: expected rows that are JSON objects (file, prompt, ...)")
    return rows


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def coco_image_order(captions: str | Path) -> list[str]:
    """COCO image file names in the order `softrepa generate --prompts captions.json` numbers them.

    The generator takes one prompt per image (its first non-empty caption), images in the file's
    "images" order, skipping images without a caption; prompt i therefore belongs to entry i here.

    Args:
        captions: a COCO captions JSON (e.g. captions_val2017.json).
    """
    from ..checks import json_loads, read_text

    data = json_loads(read_text(Path(captions), "--reference-captions"), str(captions))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list) or not all(isinstance(x, dict) for x in data["images"] + data["annotations"]):
        raise DatasetError(f"{captions}: expected a COCO captions file with 'images' and 'annotations' (lists of objects)")
    has = {a.get("image_id") for a in data["annotations"] if isinstance(a.get("image_id"), (int, str))
           and isinstance(a.get("caption"), str) and a["caption"].strip()}
    return [im.get("file_name") for im in data["images"] if isinstance(im.get("id"), (int, str)) and im["id"] in has]


def read_items(images: str | Path, prompts: str | Path | None = None,
               reference_captions: str | Path | None = None, reference: str | Path | None = None) -> list[EvalItem]:
    """The images of a folder with their prompts and pairs (see the module docstring).

    Args:
        images: folder of images (with or without metadata.jsonl).
        prompts: optional prompt file; overrides metadata prompts.
        reference_captions: COCO captions JSON the prompts were read from; with `reference`, pairs
            each image (metadata "prompt_index") with its COCO image (by file stem) for LPIPS.
        reference: the reference image folder (needed with `reference_captions`).
    """
    folder = Path(images)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    meta_path = folder / "metadata.jsonl"
    if meta_path.is_file():
        rows = _read_table(meta_path)
        if any("file" not in r for r in rows):
            raise DatasetError(f"{meta_path}: every row needs a 'file'")
    else:
        rows = [{"file": p.name} for p in list_images(folder)]
    if prompts is not None:
        pf = Path(prompts)
        if not pf.is_file():
            raise FileNotFoundError(f"prompt file not found: {pf}")
        if pf.suffix == ".txt":
            from ..checks import read_text

            lines = [s for s in read_text(pf, "--prompts").splitlines() if s.strip()]
            if len(lines) != len(rows):
                raise DatasetError(f"{pf} has {len(lines)} prompts for {len(rows)} images")
            for r, text in zip(rows, lines):
                r["prompt"] = text
        else:
            by_file = {str(r["file"]): r["prompt"] for r in _read_table(pf)}
            missing = [r["file"] for r in rows if str(r["file"]) not in by_file]
            if missing:
                raise DatasetError(f"{pf} has no prompt for {len(missing)} images, e.g. {missing[:3]}")
            for r in rows:
                r["prompt"] = by_file[str(r["file"])]
    # `softrepa generate` rows: file, prompt, cfg, tokens, ...; `softrepa edit` rows: file, image (the
    # source, absolute), source_prompt, target_prompt, tar_cfg, ... -> edits are scored against the target.
    items = [EvalItem(file=str(r["file"]), path=folder / str(r["file"]),
                      prompt=r.get("prompt") or r.get("target_prompt"),
                      source=_resolve(folder, r.get("source_image") or r.get("image")),
                      reference=_resolve(folder, r.get("reference_image")), meta=r) for r in rows]
    missing = [it.file for it in items if not it.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed images do not exist in {folder}, e.g. {missing[:3]}")
    if reference_captions is not None:
        if reference is None or not Path(reference).is_dir():
            raise UsageError("--reference-captions needs --reference, the folder of the COCO images")
        order = coco_image_order(reference_captions)
        by_stem = {p.stem: p for p in list_images(Path(reference))}
        for it in items:
            i = it.meta.get("prompt_index")
            if not isinstance(i, int) or not 0 <= i < len(order):
                raise DatasetError(f"{it.file}: metadata prompt_index {i!r} does not index {reference_captions}")
            if it.reference is None and it.source is None:
                it.reference = by_stem.get(Path(order[i]).stem, Path(reference) / order[i])
    if not items:
        raise DatasetError(f"no images in {folder}")
    return items


def run_info(items: Sequence[EvalItem]) -> dict:
    """Scalar metadata fields with one value across all rows (the run's settings), plus `cfg`."""
    skip = {"file", "prompt", "prompt_index", "image", "source_image", "reference_image", "seed", "index",
            "source_prompt", "target_prompt", "width", "height"}
    first = items[0].meta
    info = {k: v for k, v in first.items() if k not in skip and isinstance(v, (str, int, float, bool, type(None)))
            and all(it.meta.get(k) == v for it in items)}
    cfg = next((info[k] for k in CFG_KEYS if isinstance(info.get(k), (int, float))), None)
    if cfg is not None:
        info["cfg"] = float(cfg)
    return info


def image_pairs(items: Sequence[EvalItem], reference: Path | None, metric: str = "lpips") -> tuple[list[Path], str]:
    """The image each item is compared with by a `PER_PAIR` metric, and a description of the pairing.

    Args:
        items: the images (`read_items`).
        reference: the `--reference` folder (pairs by file stem), or None.
        metric: the metric's name, for messages.
    Raises:
        MetricError: an image without a pair, or a pair that does not exist.
    """
    by_stem = {p.stem: p for p in list_images(reference)} if reference is not None and reference.is_dir() else {}
    pairs, kinds, missing = [], set(), []
    for it in items:
        if it.source is not None:
            pairs.append(it.source)
            kinds.add("edit vs its source_image")
        elif it.reference is not None:
            pairs.append(it.reference)
            kinds.add("image vs its reference_image (metadata, or the COCO image of its prompt)")
        elif Path(it.file).stem in by_stem:
            pairs.append(by_stem[Path(it.file).stem])
            kinds.add("generated vs the --reference image with the same file name")
        else:
            missing.append(it.file)
    if missing:
        raise MetricError(f"{metric}: {len(missing)} images have no pair (no metadata source_image / reference_image "
                          f"and no same-named image in --reference), e.g. {missing[:3]}")
    absent = [str(p) for p in pairs if not p.is_file()]
    if absent:
        raise MetricError(f"{metric}: {len(absent)} paired images do not exist, e.g. {absent[:3]}")
    return pairs, "; ".join(sorted(kinds))



__all__ = ["CFG_KEYS", "EvalItem", "IMAGE_EXTS", "coco_image_order", "image_pairs", "list_images", "read_items",
           "run_info"]
