"""The procedural world: determinism, captions, held-out split disjointness, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from softrepa.toy import world as W
from softrepa.toy.world import (
    HELDOUT_PAIRINGS,
    HELDOUT_TRIPLES,
    PALETTE,
    Scene,
    WorldDataset,
    WorldObject,
    composition_key,
    export_image_folder,
    heldout_prompts,
    heldout_scenes,
    heldout_specs,
    heldout_violations,
    is_heldout,
    parse_prompt,
    place_scene,
    sample_dataset,
    train_scenes,
)


def _pixels(ds):
    return np.stack([np.asarray(ds[i]["image"]) for i in range(len(ds))])


def test_same_seed_same_pixels_and_captions():
    a, b = WorldDataset(40, seed=3), WorldDataset(40, seed=3)
    assert np.array_equal(_pixels(a), _pixels(b))
    assert [a[i]["caption"] for i in range(40)] == [b[i]["caption"] for i in range(40)]
    assert [a[i]["scene"] for i in range(40)] == [b[i]["scene"] for i in range(40)]


def test_different_seed_differs():
    a, b = WorldDataset(40, seed=3), WorldDataset(40, seed=4)
    assert not np.array_equal(_pixels(a), _pixels(b))
    assert [a[i]["caption"] for i in range(40)] != [b[i]["caption"] for i in range(40)]
    # Jitter: two renders of the same prompt are not identical images.
    s = Scene((WorldObject("red", "circle"),), position="left")
    r1, r2 = (place_scene(s, np.random.default_rng(k)).to_array() for k in (1, 2))
    assert not np.array_equal(r1, r2)


def test_random_access_does_not_depend_on_order():
    ds = WorldDataset(10, seed=5)
    late_first = np.asarray(ds[7]["image"])
    _ = [ds[i] for i in range(10)]
    assert np.array_equal(late_first, np.asarray(ds[7]["image"]))
    assert len(list(ds)) == 10
    with pytest.raises(IndexError):
        ds[10]


def test_item_format_and_size():
    item = WorldDataset(3, seed=0, size=48)[1]
    assert set(item) == {"image", "caption", "scene"}
    assert isinstance(item["image"], Image.Image) and item["image"].size == (48, 48)
    assert item["image"].mode == "RGB" and isinstance(item["scene"], Scene)


def test_captions_vary_and_parse_back():
    ds = WorldDataset(400, seed=11, split="all")
    captions = set()
    for i in range(len(ds)):
        scene, text = ds._item(i)
        captions.add(text)
        assert parse_prompt(text).spec == scene.spec, text
        assert parse_prompt(scene.prompt).spec == scene.spec
    templates = len(W.SINGLE_TEMPLATES) + len(W.PAIR_TEMPLATES)
    assert len(captions) > 300 and templates >= 10
    assert parse_prompt("left: a red circle").spec == ("single", "red", "circle", "left")
    assert parse_prompt("A Blue Square Beneath a yellow cross").spec == \
        ("pair", "blue", "square", "below", "yellow", "cross")
    bad = ("a red circle", "a purple circle on the left",
           "a red circle left of a blue square and a red cross")
    for text in bad:
        with pytest.raises(ValueError):
            parse_prompt(text)


def test_canonical_prompts():
    s = Scene((WorldObject("red", "circle"), WorldObject("blue", "square")), relation="left of")
    assert s.prompt == "a red circle to the left of a blue square"
    assert Scene((WorldObject("blue", "square"),), position="top").prompt == "a blue square at the top"
    assert WorldDataset(5, seed=0, canonical=True)[2]["caption"] == WorldDataset(5, seed=0)[2]["scene"].prompt


def test_train_split_excludes_heldout_compositions():
    ds = WorldDataset(2000, seed=0, split="train")
    scenes, captions = zip(*(ds._item(i) for i in range(len(ds))))
    assert heldout_violations(scenes) == []
    assert heldout_violations(captions) == []  # via caption parsing, independent of Scene objects
    keys = {composition_key(s) for s in scenes}
    for a, rel, b in HELDOUT_TRIPLES:
        assert ("pair", *a, rel, *b) not in keys
    objs = {(o.colour, o.shape) for s in scenes for o in s.objects}
    assert not objs & set(HELDOUT_PAIRINGS)
    # ...while everything else the held-out prompts need is in training: every other pairing,
    # every position and relation, and the attribute-swapped version of each held-out triple.
    assert objs == {(c, s) for c in W.COLOURS for s in W.SHAPES} - set(HELDOUT_PAIRINGS)
    assert {s.position for s in scenes} - {None} == set(W.POSITIONS)
    assert {s.relation for s in scenes} - {None} == set(W.RELATIONS)
    for (ca, sa), rel, (cb, sb) in HELDOUT_TRIPLES:
        if (ca, sb) not in HELDOUT_PAIRINGS and (cb, sa) not in HELDOUT_PAIRINGS:
            assert ("pair", ca, sb, rel, cb, sa) in keys or ("pair", cb, sa, rel, ca, sb) in keys
    assert train_scenes(50, seed=0) == list(scenes[:50])


def test_equivalent_surface_form_is_heldout_too():
    (a, rel, b) = HELDOUT_TRIPLES[0]
    same_picture = Scene((WorldObject(*b), WorldObject(*a)), relation=W.INVERSE[rel])
    assert is_heldout(same_picture) and is_heldout(same_picture.prompt)
    swapped = Scene((WorldObject(*b), WorldObject(*a)), relation=rel)  # b left of a: a new picture
    assert not is_heldout(swapped)


def test_heldout_prompts_declared_and_deterministic():
    prompts = heldout_prompts()
    assert 24 <= len(prompts) <= 48 and len(set(prompts)) == len(prompts)
    assert prompts == heldout_prompts()
    assert all(is_heldout(p) for p in prompts)
    kinds = {len(s.objects) for s in heldout_specs()}
    assert kinds == {1, 2}
    placed = heldout_scenes(seed=1)
    assert [s.spec for s in placed] == [s.spec for s in heldout_specs()]
    assert placed == heldout_scenes(seed=1) and placed != heldout_scenes(seed=2)
    items = WorldDataset(100, seed=0, split="heldout")
    assert all(is_heldout(items._item(i)[0]) for i in range(100))


def test_render_is_crisp_and_in_bounds():
    for scene in train_scenes(200, seed=9):
        for o in scene.objects:  # whole object inside the image (triangle is the widest: 1.2 r)
            assert 1.2 * o.radius < min(o.cx, 1 - o.cx, o.cy, 1 - o.cy)
        # Without anti-aliasing every pixel is the background or an object's colour.
        px = {tuple(p) for p in scene.to_array(32, supersample=1).reshape(-1, 3)}
        assert px <= {scene.background} | {o.rgb for o in scene.objects}
        # Anti-aliased render: object interiors keep the exact object colour.
        arr = scene.to_array(32)
        for o in scene.objects:
            cy, cx = int(o.cy * 32), int(o.cx * 32)
            assert tuple(arr[cy, cx]) == o.rgb
            assert np.abs(np.array(o.rgb) - PALETTE[o.colour]).max() <= 10
        if len(scene.objects) == 2:  # pairs never touch: gap between the 1.2 r extents
            a, b = scene.objects
            gap = max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - 1.2 * (a.radius + b.radius)
            assert gap > 0.04


def test_scene_validation_and_dict_round_trip():
    with pytest.raises(ValueError):
        Scene((WorldObject("red", "circle"),), position="middle")
    with pytest.raises(ValueError):
        Scene((WorldObject("red", "circle"), WorldObject("red", "square")))
    with pytest.raises(ValueError):
        Scene((WorldObject("red", "circle"),), position="left").render()  # no geometry yet
    s = train_scenes(1, seed=2)[0]
    assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_export_image_folder(tmp_path):
    out = export_image_folder(tmp_path / "data", n=6, seed=4)
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == [f"{i:06d}" for i in range(6)]
    expected = sample_dataset(6, seed=4)
    rows = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    for p, (img, text, scene), row in zip(pngs, expected, rows):
        assert np.array_equal(np.asarray(Image.open(p).convert("RGB")), np.asarray(img))
        assert p.with_suffix(".txt").read_text().strip() == text
        assert row["file"] == p.name and Scene.from_dict(row["scene"]) == scene
