"""Analytic judge for the toy world: read colours, shapes, positions and relations from pixels.

No learning: pixels are assigned to palette colours by their "absorption" relative to the
estimated background (a blurred edge pixel lies on the line from the background to the object
colour, so projecting onto that line and thresholding at half way recovers the crisp shape under
blur and brightness shifts), 8-connected components give objects, and third / fourth cumulants
of each object's soft mass, which a Gaussian blur leaves unchanged, give the shape (an upright
triangle is skewed vertically; a square's mass spreads further along the diagonals than along
the axes, a plus-shaped cross's the other way round, a circle's equally).
`degrade` simulates a VAE round trip (blur + noise + colour shift) for robustness checks, and
`judge_accuracy` measures the judge on fresh renders.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .world import COLOURS, PALETTE, POSITIONS, RELATIONS, SHAPES, Scene, WorldDataset, parse_prompt

_PAL = np.array([PALETTE[c] for c in COLOURS], np.float64) / 255.0


@dataclass
class Detection:
    """One object read from an image; coordinates normalised to the image side (y down)."""

    colour: str
    shape: str
    cx: float
    cy: float
    area: float  # fraction of the image
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1
    fill: float  # area / bounding-box area: ~1 square, ~0.79 circle, ~0.55 triangle
    skew: float  # blur-invariant vertical skew (x1000): ~-21 upright triangle, 0 otherwise
    aniso: float  # blur-invariant square-ness (x1000): ~4.2 square, ~0 circle / triangle, ~-6.5 cross

    @property
    def position(self) -> str:
        """left/right/top/bottom: the dominant direction of the centroid from the image centre."""
        dx, dy = self.cx - 0.5, self.cy - 0.5
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"


def to_float_array(image) -> np.ndarray:
    """HxWx3 float64 in [0, 1] from a PIL image or uint8 / float array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {a.shape}")
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)


def _background(img: np.ndarray) -> np.ndarray:
    # The one-pixel frame is background in every scene of the world; the median ignores
    # the odd object pixel that reaches it and the noise.
    frame = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return np.median(frame, axis=0)


def _absorption(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position `t` along, and relative distance `resid` from, each background->palette line."""
    bg = _background(img)
    d = bg - img  # absorption: how much each channel is darker than the background
    a = bg - _PAL  # (4, 3) absorption of each palette colour on this background
    norm2 = (a * a).sum(-1)
    t = d @ a.T / norm2  # (H, W, 4)
    resid = np.linalg.norm(d[..., None, :] - t[..., None] * a, axis=-1) / np.sqrt(norm2)
    return t, resid


def _labels(t: np.ndarray, resid: np.ndarray, min_strength: float, max_residual: float,
            decide_at: float = 0.15) -> np.ndarray:
    # Hue first, strength second: the colour is the nearest line among those the pixel has moved
    # along at all; only then is the pixel foreground if it is at least `min_strength` of the
    # way. (Choosing among lines with t >= 0.5 lets a half-covered red edge pixel, t_red ~0.49,
    # pass as yellow, whose line it is further from but further along.)
    resid = np.where(t >= decide_at, resid, np.inf)
    best = resid.argmin(-1)
    r = np.take_along_axis(resid, best[..., None], -1)[..., 0]
    tb = np.take_along_axis(t, best[..., None], -1)[..., 0]
    return np.where((r <= max_residual) & (tb >= min_strength), best, -1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as boolean masks (numpy label propagation)."""
    if not mask.any():
        return []
    # Propagate on the crop around the mask only: most of a world image is background.
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]
    h, w = crop.shape
    lab = np.where(crop, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(lab, 1)
        nb = np.max([p[i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)
        new = np.where(crop, nb, 0)
        if np.array_equal(new, lab):
            break
        lab = new
    out = []
    for v in np.unique(lab[lab > 0]):
        m = np.zeros_like(mask)
        m[y0:y1, x0:x1] = lab == v
        out.append(m)
    return out


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    h, w = mask.shape
    p = np.pad(mask, r)
    return np.any([p[i:i + h, j:j + w] for i in range(2 * r + 1) for j in range(2 * r + 1)], axis=0)


def _soft_moments(w: np.ndarray) -> tuple[float, float]:
    """Blur-invariant shape moments of a soft mask (weights w), scaled by its mass.

    Returns (skew, aniso), both x1000. Cumulants of order >= 3 of a Gaussian are zero, so a
    Gaussian blur leaves the third and fourth cumulants of the mass distribution unchanged:
    `skew` (3rd cumulant along y) is ~-21 for an upright triangle and 0 for symmetric shapes;
    `aniso` (4th cumulant along the diagonals minus along the axes) is ~4.2 for an axis-aligned
    square, 0 for a circle, ~0.1 for the triangle and ~-6.5 for the plus-shaped cross (its mass
    lies along the axes).
    """
    ys, xs = np.nonzero(w)
    area = w[ys, xs].sum()  # soft area: exact under blur and anti-aliasing, unlike a pixel count
    if area <= 0:
        return 0.0, 0.0
    wt = w[ys, xs] / area
    x, y = xs - (wt * xs).sum(), ys - (wt * ys).sum()

    def k4(p):
        return (wt * p**4).sum() - 3 * (wt * p**2).sum() ** 2

    axis = (k4(x) + k4(y)) / 2
    diag = (k4((x + y) / np.sqrt(2)) + k4((x - y) / np.sqrt(2))) / 2
    return 1e3 * (wt * y**3).sum() / area**1.5, 1e3 * (diag - axis) / area**2


def _classify_shape(skew: float, aniso: float) -> str:
    # Decision points sit about half way between the ideal values (see `_soft_moments`).
    if skew < -8.5:
        return "triangle"
    if aniso > 1.8:
        return "square"
    return "cross" if aniso < -3.0 else "circle"


def read_image(image, min_area: float = 0.008) -> list[Detection]:
    """Detect the objects in an image, largest first.

    Args:
        image: RGB image (PIL or HxWx3 uint8/float array).
        min_area: blobs smaller than this fraction of the image are ignored (noise, edge pixels
            that flipped to a neighbouring colour).
    """
    img = to_float_array(image)
    t, resid = _absorption(img)
    labels = _labels(t, resid, 0.5, 0.45)
    # Soft ownership for the moments: faint edge pixels belong to the colour whose line they are
    # nearest to, so a neighbour's blurred tail is not counted as this object's mass.
    soft = _labels(t, resid, 0.15, 0.6)
    h, w = labels.shape
    dets = []
    for k, colour in enumerate(COLOURS):
        for m in _components(labels == k):
            area = int(m.sum())
            if area < max(3, min_area * h * w):
                continue
            ys, xs = np.nonzero(m)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            weights = np.where((_dilate(m, 2) & (soft == k)) | m, np.clip(t[..., k], 0, 1), 0.0)
            skew, aniso = _soft_moments(weights)
            dets.append(Detection(
                colour, _classify_shape(skew, aniso), (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h,
                area / (h * w), (x0 / w, y0 / h, x1 / w, y1 / h), area / float((y1 - y0) * (x1 - x0)),
                float(skew), float(aniso)))
    return sorted(dets, key=lambda d: -d.area)


def relation_of(a: Detection, b: Detection) -> str:
    """Relation of a to b along the dominant axis: "left of", "right of", "above" or "below"."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _as_scene(scene) -> Scene:
    return parse_prompt(scene) if isinstance(scene, str) else scene


def judge_scene(image, scene: Scene | str, detections: list[Detection] | None = None) -> dict:
    """Check an image against a scene/prompt, per attribute category.

    Existence semantics (the prompt does not say "only"): single-object prompts ask whether some
    object has the colour (`colour`), some the shape (`shape`), and whether an object of the
    asked colour (else shape, else any) sits at the position (`position`). Two-object prompts ask
    whether both colours / both shapes appear on distinct objects, whether both colour-shape
    bindings appear (`binding`), and whether the two objects (bound ones where they exist, else
    matched by colour) stand in the relation (`relation`). Inapplicable categories are None.

    Args:
        image: RGB image (PIL or array).
        scene: a `Scene` or a prompt of this world (parsed with `parse_prompt`).
        detections: precomputed `read_image(image)` (saves time when judging many prompts).
    Returns:
        dict with colour, shape, position, binding, relation (bool or None), all_ok (every
        attribute of the prompt satisfied by the same objects), count_ok (as many objects as
        asked for), and objects (the detections, as dicts).
    """
    scene = _as_scene(scene)
    dets = read_image(image) if detections is None else detections
    res = {"colour": False, "shape": False, "position": None, "binding": None, "relation": None}
    if len(scene.objects) == 1:
        o = scene.objects[0]
        res["colour"] = any(d.colour == o.colour for d in dets)
        res["shape"] = any(d.shape == o.shape for d in dets)
        cand = ([d for d in dets if d.colour == o.colour] or [d for d in dets if d.shape == o.shape] or dets)
        res["position"] = any(d.position == scene.position for d in cand)
        all_ok = any(d.colour == o.colour and d.shape == o.shape and d.position == scene.position
                     for d in dets)
    else:
        a, b = scene.objects
        pairs = [(i, j) for i in range(len(dets)) for j in range(len(dets)) if i != j]

        def match(pred):
            return [(i, j) for i, j in pairs if pred(dets[i], a) and pred(dets[j], b)]

        by_colour = match(lambda d, o: d.colour == o.colour)
        bound = match(lambda d, o: d.colour == o.colour and d.shape == o.shape)
        res["colour"] = bool(by_colour)
        res["shape"] = bool(match(lambda d, o: d.shape == o.shape))
        res["binding"] = bool(bound)

        def related(i, j):
            return relation_of(dets[i], dets[j]) == scene.relation

        res["relation"] = any(related(i, j) for i, j in (bound or by_colour))
        all_ok = any(related(i, j) for i, j in bound)
    res["all_ok"] = bool(all_ok)
    res["count_ok"] = len(dets) == len(scene.objects)
    res["objects"] = [asdict(d) for d in dets]
    return res


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = img
    for axis in (0, 1):  # separable; edge padding keeps the background colour at the border
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1))
    return out


def degrade(image, rng: np.random.Generator, sigma=(0.7, 1.0), noise=(0.03, 0.05), shift: float = 0.03,
            strength: float = 1.0):
    """Simulate a tiny-VAE round trip: Gaussian blur, additive noise and a slight colour shift.

    Args:
        image: RGB image (PIL or array); the result has the same type (uint8 for PIL/uint8 input).
        rng: numpy generator for the random parameters and noise.
        sigma: range of the blur sigma in pixels.
        noise: range of the Gaussian noise std (0..1 intensity scale).
        shift: max per-channel colour offset and gain deviation.
        strength: multiplies all three (0 = unchanged, 2 = twice as strong).
    """
    img = to_float_array(image)
    out = _gauss_blur(img, strength * rng.uniform(*sigma))
    gain = 1 + strength * rng.uniform(-shift, shift, 3)
    offset = strength * rng.uniform(-shift, shift, 3)
    out = out * gain + offset + rng.normal(0, strength * rng.uniform(*noise), out.shape)
    out = np.clip(out, 0, 1)
    if isinstance(image, Image.Image):
        return Image.fromarray(np.rint(out * 255).astype(np.uint8))
    return np.rint(out * 255).astype(np.uint8) if np.asarray(image).dtype == np.uint8 else out


def features(image) -> np.ndarray:
    """A 70-d descriptor for Fréchet-distance quality: colour, layout, shape, sharpness, noise.

    Parts: background colour (3); square roots of a 3x3x3 colour histogram (27; the root keeps
    small bins such as edge colours visible); per palette colour, half the largest blob's area,
    centroid, fill and skew/20 (4 x 5); 4 x gradient-energy and noise statistics (4); 4x4 mean
    luminance (16). Blur lowers the gradients, noise raises the Laplacian median, colour shifts
    move the background/histogram, broken shapes move the geometry. The group weights were set
    so that on 300 vs 300 renders the sampling noise of layouts (FD ~0.02) stays well below the
    effect of `degrade` (FD ~0.1 at strength 0.5, ~0.5 at 1, ~1 at 2).

    Args:
        image: RGB image (PIL or array).
    """
    img = to_float_array(image)
    h, w, _ = img.shape
    bg = _background(img)
    q = np.clip((img * 3).astype(int), 0, 2)
    hist = np.bincount((q[..., 0] * 9 + q[..., 1] * 3 + q[..., 2]).ravel(), minlength=27) / (h * w)
    per_colour = np.zeros((4, 5))
    per_colour[:, 1:3] = 0.5
    for det in read_image(img, min_area=0.0):
        k = COLOURS.index(det.colour)
        if per_colour[k, 0] == 0:  # largest blob of each colour (detections come largest first)
            per_colour[k] = (det.area, det.cx, det.cy, det.fill, det.skew / 20)
    lum = img @ np.array([0.299, 0.587, 0.114])
    gx, gy = np.abs(np.diff(lum, axis=1)), np.abs(np.diff(lum, axis=0))
    lap = 4 * lum[1:-1, 1:-1] - lum[:-2, 1:-1] - lum[2:, 1:-1] - lum[1:-1, :-2] - lum[1:-1, 2:]
    sharp = [gx.mean() + gy.mean(), max(np.quantile(gx, 0.98), np.quantile(gy, 0.98)),
             np.abs(lap).mean(), np.median(np.abs(lap))]
    grid = lum[: h - h % 4, : w - w % 4].reshape(4, h // 4, 4, w // 4).mean(axis=(1, 3))
    return np.concatenate([bg, np.sqrt(hist), 0.5 * per_colour.ravel(), 4 * np.array(sharp), grid.ravel()])


def _perturb(scene: Scene, category: str, rng: np.random.Generator) -> Scene:
    """A wrong prompt that differs from `scene` only in `category` (for rejection checks)."""
    objs = list(scene.objects)
    k = rng.integers(len(objs))
    if category == "colour":
        others = [c for c in COLOURS if c not in {o.colour for o in objs}]
        objs[k] = type(objs[k])(others[rng.integers(len(others))], objs[k].shape)
    elif category == "shape":
        others = [s for s in SHAPES if s != objs[k].shape]
        objs[k] = type(objs[k])(objs[k].colour, others[rng.integers(len(others))])
    elif category == "position":
        others = [p for p in POSITIONS if p != scene.position]
        return Scene(tuple(objs), position=others[rng.integers(len(others))])
    elif category == "relation":
        others = [r for r in RELATIONS if r != scene.relation]
        return Scene(tuple(objs), relation=others[rng.integers(len(others))])
    elif category == "binding":  # swap the shapes between the two objects
        a, b = objs
        objs = [type(a)(a.colour, b.shape), type(b)(b.colour, a.shape)]
    return Scene(tuple(objs), position=scene.position, relation=scene.relation)


def _match(dets: list[Detection], gt) -> list[Detection | None]:
    """Ground-truth objects' detections: the assignment with least total centroid distance."""
    if len(dets) < len(gt):
        return [None] * len(gt)
    idx = range(len(dets))
    assignments = [(p,) for p in idx] if len(gt) == 1 else [(p, q) for p in idx for q in idx if p != q]

    def cost(a):
        return sum((dets[p].cx - o.cx) ** 2 + (dets[p].cy - o.cy) ** 2 for p, o in zip(a, gt))

    return [dets[p] for p in min(assignments, key=cost)]


def judge_accuracy(n: int = 300, seed: int = 12345, degraded: bool = False, size: int = 32,
                   strength: float = 1.0) -> dict:
    """Measure the judge on fresh renders (split "all"), per attribute.

    Reading accuracy compares what `read_image` finds with the ground truth (objects matched by
    nearest centroid): count, colour, shape (per object), position (single) and relation (pairs).
    Acceptance is the rate at which `judge_scene` passes the true prompt per category; rejection
    the rate at which it fails a prompt altered in just that category.

    Args:
        n: number of scenes.
        seed: dataset seed (use one not used for anything else).
        degraded: apply `degrade` to every render first.
        size: image side in pixels.
        strength: degradation strength (see `degrade`).
    Returns:
        {"read": {attr: acc}, "accept": {cat: acc}, "reject": {cat: acc}, "n": n}.
    """
    ds = WorldDataset(n, seed, "all", size)
    rng = np.random.default_rng([seed, 99])
    tallies: dict[str, dict[str, list]] = {"read": {}, "accept": {}, "reject": {}}

    def add(kind, key, ok):
        tallies[kind].setdefault(key, []).append(bool(ok))

    for i in range(n):
        scene = ds.scene(i)
        img = scene.to_array(size)
        if degraded:
            img = degrade(img, rng, strength=strength)
        dets = read_image(img)
        add("read", "count", len(dets) == len(scene.objects))
        gt = scene.objects
        matched = _match(dets, gt)
        for d, o in zip(matched, gt):  # a missing detection (None) counts as wrong
            add("read", "colour", d is not None and d.colour == o.colour)
            add("read", "shape", d is not None and d.shape == o.shape)
        if len(gt) == 1:
            add("read", "position", matched[0] is not None and matched[0].position == scene.position)
        else:
            add("read", "relation", None not in matched and relation_of(*matched) == scene.relation)
        verdict = judge_scene(img, scene, dets)
        cats = ["colour", "shape"] + (["position"] if len(gt) == 1 else ["binding", "relation"])
        for c in cats + ["all_ok"]:
            add("accept", c, verdict[c])
        for c in cats:
            if c == "binding" and gt[0].shape == gt[1].shape:
                continue  # swapping equal shapes does not change the prompt
            add("reject", c, not judge_scene(img, _perturb(scene, c, rng), dets)[c])
    out = {kind: {k: float(np.mean(v)) for k, v in d.items()} for kind, d in tallies.items()}
    out["n"] = n
    return out


__all__ = ["Detection", "degrade", "features", "judge_accuracy", "judge_scene",
           "read_image", "relation_of", "to_float_array"]
