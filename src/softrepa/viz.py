"""Pictures a user looks at: labelled image grids and training curves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .errors import RunFolderError


def to_pil(images: Sequence[np.ndarray] | np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) floats in [0, 1] (pipeline "np" output) or PIL images -> PIL list."""
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
        else:
            out.append(Image.fromarray((np.clip(np.asarray(im), 0, 1) * 255).round().astype(np.uint8)))
    return out


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, min_cell: int = 96) -> Image.Image:
    """Rows of equally sized images with optional labels on the left / top.

    Small images are upscaled (nearest) to at least `min_cell` pixels so that labels fit.
    """
    w, h = rows[0][0].size
    factor = max(1, int(np.ceil(min_cell / max(w, h))))
    cw, ch = w * factor, h * factor
    left = 0 if not row_labels else min(220, 7 * max(len(s) for s in row_labels) + 8)
    top = 0 if not col_labels else 18
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (left + ncol * cw, top + len(rows) * ch), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * cw + 3, 3), label[: cw // 7], fill="black")
    for r, row in enumerate(rows):
        if row_labels:
            draw.text((3, top + r * ch + ch // 2 - 6), row_labels[r][: left // 7], fill="black")
        for c, im in enumerate(row):
            grid.paste(im.resize((cw, ch), Image.NEAREST), (left + c * cw, top + r * ch))
    return grid


def difference_image(a: Image.Image, b: Image.Image, gain: float = 4.0) -> tuple[Image.Image, float]:
    """Where two images of the same size differ: |a - b| per pixel, amplified, and its mean.

    Args:
        a, b: RGB images of the same size (e.g. the same seed without and with tokens).
        gain: brightness factor of the picture (small differences stay visible; clipped at 255).
    Returns:
        (picture of gain * |a - b|, mean |a - b| over pixels and channels in 0..255).
    Raises:
        ValueError: the sizes differ.
    """
    if a.size != b.size:
        raise ValueError(f"difference_image: sizes differ ({a.size} vs {b.size})")
    d = np.abs(np.asarray(a.convert("RGB"), np.float32) - np.asarray(b.convert("RGB"), np.float32))
    return Image.fromarray(np.clip(d * gain, 0, 255).round().astype(np.uint8)), float(d.mean())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def plot_training_curves(metrics_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Loss and in-batch retrieval accuracy against step, from a run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(metrics_path) if "loss" in r]
    if not rows:
        raise RunFolderError(f"{metrics_path}: no training rows to plot")
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [r["loss"] for r in rows], lw=1, alpha=0.4, label="loss")
    a.plot(steps, _smooth([r["loss"] for r in rows]), lw=2, label="smoothed")
    a.set_xlabel("step"), a.set_ylabel("contrastive loss"), a.legend()
    b.plot(steps, [r["accuracy"] for r in rows], lw=1, alpha=0.4, label="accuracy")
    b.plot(steps, _smooth([r["accuracy"] for r in rows]), lw=2, label="smoothed")
    b.set_xlabel("step"), b.set_ylabel("in-batch retrieval accuracy"), b.set_ylim(0, 1), b.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _smooth(x: Sequence[float], k: int = 0) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    k = k or max(1, len(x) // 20)
    if k <= 1:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    head = c[1:k] / np.arange(1, k)
    return np.concatenate([head, (c[k:] - c[:-k]) / k])
