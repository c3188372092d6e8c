"""A seeded procedural world of small images with one or two coloured shapes.

Scenes are tiny (32x32 by default) light-background pictures of one object at a coarse
position ("a red circle on the left") or two objects in a spatial relation ("a red circle to
the left of a blue square"). Everything is a pure function of a seed, colours are crisp palette
colours, and shapes are drawn without anti-aliasing, so `judge.py` can read a picture back
exactly. A declared set of compositions is held out from training (`HELDOUT_PAIRINGS`,
`HELDOUT_TRIPLES`) so alignment can be measured on prompts a model never saw.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..errors import UsageError

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
# Well separated on a white background: each colour absorbs a different channel mix
# (red: G+B, green: R+B, blue: R+G, yellow: B), which is what the judge keys on.
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 215), "yellow": (235, 205, 30)}
POSITIONS = ("left", "right", "top", "bottom")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Colour-shape pairings that never occur in training (single or two-object scenes).
HELDOUT_PAIRINGS = (("green", "triangle"), ("yellow", "circle"))
# Two-object compositions held out from training, in canonical form (relation "left of" or
# "above"); "B right of A" is the same picture as "A left of B" and is held out with it. The
# attribute-swapped arrangement (e.g. red circle left of blue square) stays in training, so these
# test binding, not vocabulary.
HELDOUT_TRIPLES = (
    (("blue", "circle"), "left of", ("red", "square")),
    (("red", "triangle"), "left of", ("yellow", "square")),
    (("yellow", "triangle"), "left of", ("green", "circle")),
    (("green", "square"), "left of", ("blue", "triangle")),
    (("red", "circle"), "left of", ("green", "circle")),
    (("blue", "square"), "left of", ("yellow", "square")),
    (("yellow", "square"), "above", ("blue", "circle")),
    (("green", "circle"), "above", ("red", "triangle")),
    (("blue", "triangle"), "above", ("red", "circle")),
    (("red", "square"), "above", ("green", "square")),
    (("blue", "circle"), "above", ("yellow", "triangle")),
    (("red", "triangle"), "above", ("blue", "square")),
    (("green", "cross"), "left of", ("red", "triangle")),
    (("yellow", "cross"), "above", ("blue", "square")),
)
# Two-object prompts that contain a held-out pairing (held out because the pairing is).
_HELDOUT_PAIRING_SCENES = (
    (("green", "triangle"), "left of", ("red", "circle")),
    (("blue", "square"), "right of", ("green", "triangle")),
    (("green", "triangle"), "above", ("yellow", "square")),
    (("red", "circle"), "below", ("green", "triangle")),
    (("yellow", "circle"), "left of", ("blue", "triangle")),
    (("green", "square"), "right of", ("yellow", "circle")),
    (("yellow", "circle"), "above", ("red", "square")),
    (("blue", "circle"), "below", ("yellow", "circle")),
)

POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "in the left half", "on the left side of the image"),
    "right": ("on the right", "at the right side", "in the right half", "on the right side of the image"),
    "top": ("at the top", "near the top", "in the upper half", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "in the lower half", "at the bottom of the image"),
}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath"),
}
SINGLE_TEMPLATES = (
    "{obj} {pos}", "a picture of {obj} {pos}", "an image of {obj} {pos}", "{obj}, {pos}",
    "{label}: {obj}", "{pos}, {obj}", "there is {obj} {pos}", "a drawing of {obj} {pos}",
)
PAIR_TEMPLATES = (
    "{a} {rel} {b}", "a picture of {a} {rel} {b}", "an image of {a} {rel} {b}", "{a} is {rel} {b}",
    "{a} placed {rel} {b}", "there is {a} {rel} {b}", "a drawing of {a} {rel} {b}",
)


@dataclass(frozen=True)
class WorldObject:
    """One shape. Geometry is normalised to the image side (0..1, y down); None = not placed.

    `radius` is the circle radius; squares have the same area, triangles (apex up) a
    bounding box of 2.4 x 2.4 radius, crosses (plus signs) one of 2.3 x 2.3 radius.
    """

    colour: str
    shape: str
    cx: float | None = None
    cy: float | None = None
    radius: float | None = None
    rgb: tuple[int, int, int] | None = None

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects; single scenes have `position`, two-object ones `relation`.

    A two-object scene reads "objects[0] <relation> objects[1]". A scene from `parse_prompt`
    carries no geometry; `place_scene` adds it, and `render` draws it.
    """

    objects: tuple[WorldObject, ...]
    position: str | None = None
    relation: str | None = None
    background: tuple[int, int, int] = (245, 245, 245)

    def __post_init__(self):
        for o in self.objects:
            if o.colour not in PALETTE or o.shape not in SHAPES:
                raise ValueError(f"unknown object {o.colour!r} {o.shape!r}")
        if len(self.objects) == 1 and self.position not in POSITIONS:
            raise ValueError(f"single-object scene needs a position in {POSITIONS}, got {self.position!r}")
        if len(self.objects) == 2 and self.relation not in RELATIONS:
            raise ValueError(f"two-object scene needs a relation in {RELATIONS}, got {self.relation!r}")
        if len(self.objects) not in (1, 2):
            raise ValueError("a scene holds one or two objects")

    @property
    def spec(self) -> tuple:
        """Hashable semantic content (no geometry): what a prompt says."""
        if len(self.objects) == 1:
            o = self.objects[0]
            return ("single", o.colour, o.shape, self.position)
        a, b = self.objects
        return ("pair", a.colour, a.shape, self.relation, b.colour, b.shape)

    @property
    def prompt(self) -> str:
        """The canonical prompt (first phrase of every template list)."""
        return prompt(self)

    def render(self, size: int = 32, supersample: int = 4) -> Image.Image:
        """Draw the scene as an RGB PIL image.

        Args:
            size: image side in pixels.
            supersample: draw at this factor and box-filter down. The default 4 is simple
                anti-aliasing: interiors stay pure palette colours, edge pixels mix with the
                background, and a small circle no longer digitises into a near-square octagon
                (which made circle vs square ambiguous even to a person). 1 = no anti-aliasing.
        """
        return Image.fromarray(self.to_array(size, supersample))

    def to_array(self, size: int = 32, supersample: int = 4) -> np.ndarray:
        """Draw the scene as an HxWx3 uint8 array (see `render`)."""
        s = size * supersample
        # Pixel centres in normalised coordinates, so geometry is resolution independent.
        grid = (np.arange(s) + 0.5) / s
        x, y = np.meshgrid(grid, grid)
        img = np.empty((s, s, 3), np.float64)
        img[:] = self.background
        for o in self.objects:
            if o.cx is None:
                raise ValueError("scene has no geometry; call place_scene(scene, rng) first")
            img[_shape_mask(o, x, y)] = o.rgb if o.rgb is not None else PALETTE[o.colour]
        if supersample > 1:
            img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def to_dict(self) -> dict:
        """JSON-friendly form (see `Scene.from_dict`)."""
        return {
            "objects": [dict(colour=o.colour, shape=o.shape, cx=o.cx, cy=o.cy, radius=o.radius,
                             rgb=None if o.rgb is None else list(o.rgb)) for o in self.objects],
            "position": self.position, "relation": self.relation, "background": list(self.background),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = tuple(WorldObject(o["colour"], o["shape"], o.get("cx"), o.get("cy"), o.get("radius"),
                                 None if o.get("rgb") is None else tuple(o["rgb"])) for o in d["objects"])
        return cls(objs, d.get("position"), d.get("relation"), tuple(d.get("background", (245, 245, 245))))


def _shape_mask(o: WorldObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    dx, dy, r = x - o.cx, y - o.cy, o.radius
    if o.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if o.shape == "square":
        h = r * np.sqrt(np.pi) / 2  # equal area to the circle
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if o.shape == "cross":  # upright plus sign, arms 0.72 h thick
        h = 1.15 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= h) & (ay <= 0.36 * h)) | ((ay <= h) & (ax <= 0.36 * h))
    # Upright isosceles triangle in a 2.4r box centred on (cx, cy): half-width grows linearly
    # from 0 at the apex to 1.2r at the base.
    h = 1.2 * r
    frac = (dy + h) / (2 * h)
    return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= h * frac)


def prompt(scene: Scene) -> str:
    """Canonical prompt, e.g. "a red circle on the left" / "a red circle to the left of a blue square".

    Args:
        scene: the scene (geometry not needed).
    """
    if len(scene.objects) == 1:
        return f"{scene.objects[0].phrase} {POSITION_PHRASES[scene.position][0]}"
    a, b = scene.objects
    return f"{a.phrase} {RELATION_PHRASES[scene.relation][0]} {b.phrase}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption drawn from varied templates and phrasings (all parse back with `parse_prompt`).

    Args:
        scene: the scene to describe.
        rng: numpy generator choosing the template and phrases.
    """
    if len(scene.objects) == 1:
        t = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
        pos = POSITION_PHRASES[scene.position][rng.integers(4)]
        return t.format(obj=scene.objects[0].phrase, pos=pos, label=scene.position)
    a, b = scene.objects
    t = PAIR_TEMPLATES[rng.integers(len(PAIR_TEMPLATES))]
    rel = RELATION_PHRASES[scene.relation][rng.integers(3)]
    return t.format(a=a.phrase, b=b.phrase, rel=rel)


_OBJ_RE = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})(?:e?s)?\b")
_POS_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top",
              "bottom": "bottom", "lower": "bottom"}
_REL_WORDS = {"left": "left of", "right": "right of", "above": "above", "over": "above", "higher": "above",
              "below": "below", "under": "below", "beneath": "below", "lower": "below"}


def parse_prompt(text: str) -> Scene:
    """Read a caption/prompt of this world back into a (geometry-free) `Scene`.

    Args:
        text: e.g. "left: a red circle" or "a picture of a blue square over a red triangle".
    Raises:
        UsageError: when the text does not name 1-2 objects with one position / relation.
    """
    low = text.lower()
    objs = list(_OBJ_RE.finditer(low))
    if len(objs) == 1:
        rest = low[: objs[0].start()] + " " + low[objs[0].end():]
        found = {_POS_WORDS[w] for w in re.findall(r"[a-z]+", rest) if w in _POS_WORDS}
        if len(found) != 1:
            raise UsageError(f"cannot read one position from {text!r}")
        return Scene((WorldObject(objs[0][1], objs[0][2]),), position=found.pop())
    if len(objs) == 2:
        between = low[objs[0].end(): objs[1].start()]
        found = {_REL_WORDS[w] for w in re.findall(r"[a-z]+", between) if w in _REL_WORDS}
        if len(found) != 1:
            raise UsageError(f"cannot read one relation from {text!r}")
        return Scene((WorldObject(objs[0][1], objs[0][2]), WorldObject(objs[1][1], objs[1][2])),
                     relation=found.pop())
    raise UsageError(f"expected one or two '<colour> <shape>' mentions in {text!r}")


def composition_key(scene: Scene) -> tuple:
    """Canonical composition: pairs are rewritten with relation "left of" / "above"."""
    if len(scene.objects) == 1:
        return scene.spec
    _, c1, s1, rel, c2, s2 = scene.spec
    if rel in ("right of", "below"):
        return ("pair", c2, s2, INVERSE[rel], c1, s1)
    return ("pair", c1, s1, rel, c2, s2)


_HELDOUT_KEYS = frozenset(("pair", a[0], a[1], rel, b[0], b[1]) for a, rel, b in HELDOUT_TRIPLES)


def is_heldout(scene: Scene | str) -> bool:
    """Whether a scene (or a caption, parsed) uses a held-out pairing or two-object composition.

    Args:
        scene: a `Scene` or caption text.
    """
    if isinstance(scene, str):
        scene = parse_prompt(scene)
    if any((o.colour, o.shape) in HELDOUT_PAIRINGS for o in scene.objects):
        return True
    return composition_key(scene) in _HELDOUT_KEYS


def heldout_violations(items) -> list:
    """The items (Scenes or caption strings) that use a held-out composition; [] = disjoint.

    Args:
        items: iterable of `Scene` or caption strings (e.g. a training set's captions).
    """
    return [it for it in items if is_heldout(it)]


def heldout_specs() -> list[Scene]:
    """The fixed, declared held-out evaluation scenes, without geometry (44 of them)."""
    out = [Scene((WorldObject(c, s),), position=p) for c, s in HELDOUT_PAIRINGS for p in POSITIONS]
    for a, rel, b in HELDOUT_TRIPLES:  # both surface forms of each held-out arrangement
        out.append(Scene((WorldObject(*a), WorldObject(*b)), relation=rel))
        out.append(Scene((WorldObject(*b), WorldObject(*a)), relation=INVERSE[rel]))
    out += [Scene((WorldObject(*a), WorldObject(*b)), relation=rel) for a, rel, b in _HELDOUT_PAIRING_SCENES]
    return out


def heldout_prompts() -> list[str]:
    """Canonical prompts of `heldout_specs()` (deterministic order)."""
    return [prompt(s) for s in heldout_specs()]


def heldout_scenes(seed: int = 0) -> list[Scene]:
    """`heldout_specs()` placed with geometry drawn from `seed` (one scene per held-out prompt).

    Args:
        seed: seed of the position/size/colour jitter.
    """
    return [place_scene(s, np.random.default_rng([seed, i, 7])) for i, s in enumerate(heldout_specs())]


def place_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """Give a scene jittered geometry, object colours and a light background.

    Layout keeps objects well inside the image and (for pairs) a gap of >= 0.05 image sides
    between them, so colours never bleed into each other and the judge reads them apart.

    Args:
        scene: scene whose semantic content (spec) is kept.
        rng: numpy generator for the jitter.
    """
    def jit(v):
        return tuple(int(np.clip(c + rng.integers(-10, 11), 0, 255)) for c in v)

    grey = int(rng.integers(238, 256))
    background = tuple(int(np.clip(grey + rng.integers(-3, 4), 0, 255)) for _ in range(3))
    if len(scene.objects) == 1:
        off = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[scene.position]
        along, across = 0.22 + rng.uniform(-0.04, 0.04), rng.uniform(-0.05, 0.05)
        cx = 0.5 + off[0] * along + off[1] * across
        cy = 0.5 + off[1] * along + off[0] * across
        o = scene.objects[0]
        objs = (replace(o, cx=cx, cy=cy, radius=rng.uniform(0.14, 0.17), rgb=jit(PALETTE[o.colour])),)
    else:
        # First object at the side the relation names; the axis sets which coordinate differs.
        first = {"left of": (0.27, 0.5), "right of": (0.73, 0.5), "above": (0.5, 0.27), "below": (0.5, 0.73)}
        p1 = np.array(first[scene.relation])
        p2 = 1.0 - p1
        horizontal = scene.relation in ("left of", "right of")
        objs = []
        for o, p in zip(scene.objects, (p1, p2)):
            d_along, d_across = rng.uniform(-0.02, 0.02), rng.uniform(-0.08, 0.08)
            cx, cy = (p[0] + d_along, p[1] + d_across) if horizontal else (p[0] + d_across, p[1] + d_along)
            objs.append(replace(o, cx=cx, cy=cy, radius=rng.uniform(0.13, 0.15), rgb=jit(PALETTE[o.colour])))
        objs = tuple(objs)
    return Scene(objs, scene.position, scene.relation, background)


def _random_spec(rng: np.random.Generator, split: str, p_two: float) -> Scene:
    if split == "heldout":
        specs = heldout_specs()
        return specs[rng.integers(len(specs))]
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "train":
        pairs = [p for p in pairs if p not in HELDOUT_PAIRINGS]
    while True:  # rejection sampling keeps the train distribution uniform over allowed scenes
        if rng.random() >= p_two:
            c, s = pairs[rng.integers(len(pairs))]
            scene = Scene((WorldObject(c, s),), position=POSITIONS[rng.integers(4)])
        else:
            a, b = pairs[rng.integers(len(pairs))], pairs[rng.integers(len(pairs))]
            if a[0] == b[0]:  # distinct colours keep two-object bindings unambiguous
                continue
            scene = Scene((WorldObject(*a), WorldObject(*b)), relation=RELATIONS[rng.integers(4)])
        if split != "train" or not is_heldout(scene):
            return scene


_SPLIT_CODE = {"train": 0, "heldout": 1, "all": 2}


class WorldDataset:
    """Map-style dataset (usable with torch's DataLoader) of rendered scenes and captions.

    Item i is a pure function of (seed, split, i), so random access and any worker order give
    the same data.

    Args:
        n: number of items.
        seed: dataset seed.
        split: "train" (no held-out composition), "heldout" (only the declared held-out
            prompts, `heldout_specs()`), or "all" (unrestricted).
        size: image side in pixels.
        p_two: probability of a two-object scene (train / all splits).
        canonical: use the canonical prompt instead of a random caption template.
    """

    def __init__(self, n: int, seed: int = 0, split: str = "train", size: int = 32,
                 p_two: float = 0.5, canonical: bool = False):
        if split not in _SPLIT_CODE:
            raise UsageError(f"split must be one of {tuple(_SPLIT_CODE)}, got {split!r}")
        self.n, self.seed, self.split, self.size = n, seed, split, size
        self.p_two, self.canonical = p_two, canonical

    def __len__(self) -> int:
        return self.n

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], i])

    def scene(self, i: int) -> Scene:
        """The scene of item i, without rendering it."""
        return self._item(i)[0]

    def _item(self, i: int) -> tuple[Scene, str]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = self._rng(i)
        scene = place_scene(_random_spec(rng, self.split, self.p_two), rng)
        return scene, (prompt(scene) if self.canonical else caption(scene, rng))

    def __getitem__(self, i: int) -> dict:
        scene, text = self._item(int(i))
        return {"image": scene.render(self.size), "caption": text, "scene": scene}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(self.n))


def train_scenes(n: int, seed: int = 0, p_two: float = 0.5) -> list[Scene]:
    """n placed training scenes (no held-out compositions).

    Args:
        n: number of scenes.
        seed: dataset seed (same as `WorldDataset(n, seed, "train")`).
        p_two: probability of a two-object scene.
    """
    ds = WorldDataset(n, seed, "train", p_two=p_two)
    return [ds.scene(i) for i in range(n)]


def sample_dataset(n: int, seed: int = 0, split: str = "train",
                   size: int = 32) -> list[tuple[Image.Image, str, Scene]]:
    """n (image, caption, scene) triples; see `WorldDataset` for the arguments."""
    return [(d["image"], d["caption"], d["scene"]) for d in WorldDataset(n, seed, split, size)]


def export_image_folder(directory: str | os.PathLike, n: int, seed: int = 0, split: str = "train",
                        size: int = 32, write_scenes: bool = True) -> Path:
    """Write a folder of `000000.png` + `000000.txt` (caption) pairs for the trainer's loader.

    Args:
        directory: target folder (created).
        n, seed, split, size: see `WorldDataset`.
        write_scenes: also write `scenes.jsonl` (file, caption, prompt, scene) so generated
            samples can later be judged against exact ground truth.
    Returns:
        The folder path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(WorldDataset(n, seed, split, size)):
        name = f"{i:06d}"
        item["image"].save(out / f"{name}.png")
        (out / f"{name}.txt").write_text(item["caption"] + "\n")
        lines.append(json.dumps({"file": f"{name}.png", "caption": item["caption"],
                                 "prompt": prompt(item["scene"]), "scene": item["scene"].to_dict()}))
    if write_scenes:
        (out / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    return out
