"""The work behind `softrepa ui`, without gradio: generate and edit with and without tokens, judge.

Every result on the page comes from the library functions the CLI uses:

* generation: `softrepa.generate.generate_comparison` (the stock pipeline, the tokens disabled
  with `handle.disabled()` for the vanilla image of the same seed, the side-by-side grid);
* editing: `softrepa.edit.edit_image` with `FlowEditParams.preset` per arm (vanilla / tokens);
* scores: the miniature world's judge (`softrepa.toy.judge_scene`), LPIPS through
  `softrepa.evaluation.load_metric` when its weights are configured (never substituted).

What lives here is only what a page needs around them: input checks with one-line messages and
the lines shown under the images. The model and its lock: `softrepa.ui.bench.Workbench`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image, UnidentifiedImageError

from ..errors import UsageError
from .bench import Workbench

#: Limits that keep one request from occupying the server for long or exhausting its memory.
MAX_SEEDS = 8
MAX_PROMPT_CHARS = 1000
MAX_UPLOAD_MB = 20
MAX_PIXELS = 40_000_000
MAX_STEPS = 200
MAX_SIDE = 2048

Progress = Callable[[float, str], None]


# ---------------------------------------------------------------------- input checks
def check_prompt(pipe: Any, prompt: str | None, what: str = "prompt") -> str:
    """The stripped prompt; `UsageError` for an empty one or one the text encoder would truncate.

    Args:
        pipe: the pipeline (its tokenizer sets the length limit).
        prompt: the text from the page.
        what: its name in the message ("prompt", "source prompt", ...).
    """
    from ..prompts import check_prompt_length

    text = (prompt or "").strip()
    if not text:
        raise UsageError(f"empty {what}: type what the image should show")
    if len(text) > MAX_PROMPT_CHARS:
        raise UsageError(f"{what} too long: {len(text)} characters, the page takes {MAX_PROMPT_CHARS}")
    check_prompt_length(pipe, text, what)
    return text


def check_number(value: Any, name: str, lo: float, hi: float, integer: bool = False) -> float | int:
    """`value` as a number in [lo, hi]; `UsageError` naming the field otherwise.

    Args:
        value: what the page sent (a number, a numeric string or None).
        name: the field's name in the message.
        lo, hi: the accepted range, both ends included.
        integer: only whole numbers (returned as int).
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name}: not a number ({value!r})") from None
    if not lo <= v <= hi or (integer and v != int(v)):
        kind = "a whole number" if integer else "a number"
        raise UsageError(f"{name} must be {kind} in [{lo:g}, {hi:g}], got {v:g}")
    return int(v) if integer else v


def open_upload(path: str | None, max_mb: float = MAX_UPLOAD_MB, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded source image as RGB; `UsageError` for a missing, huge or non-image file.

    The pixel count is read from the header before decoding, so a small file that decodes to a
    huge image (a decompression bomb) is refused without allocating it.

    Args:
        path: the uploaded file (gradio's copy), or None when nothing was uploaded.
        max_mb: file size limit in MiB.
        max_pixels: width x height limit.
    """
    from ..runfolder import open_image

    if not path:
        raise UsageError("no source image: upload one or pick an example")
    p = Path(path)
    size_mb = p.stat().st_size / 2**20
    if size_mb > max_mb:
        raise UsageError(f"upload too large: {size_mb:.1f} MB, the limit is {max_mb:g} MB")
    try:
        with Image.open(p) as im:
            w, h = im.size
    except Image.DecompressionBombError:  # PIL's own refusal, far above our limit
        raise UsageError(f"image too large: {p.name} has more than {Image.MAX_IMAGE_PIXELS * 2 / 1e6:.0f} "
                         "megapixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UsageError(f"not an image: {p.name} is no PNG / JPEG / WebP / ... file") from None
    if w * h > max_pixels:
        raise UsageError(f"image too large: {w} x {h} pixels, the limit is {max_pixels / 1e6:g} megapixels")
    return open_image(p)


# ---------------------------------------------------------------------- judging
def verdict(image: Image.Image, prompt: str) -> str:
    """The world judge's reading of one miniature image against its prompt, one line.

    Args:
        image: the generated or edited image.
        prompt: the prompt it should show (the miniature's grammar; other text gets a hint).
    """
    from ..toy import judge_scene

    try:
        res = judge_scene(image, prompt)
    except UsageError:
        return "judge: not a prompt of the miniature's world (e.g. 'a red circle to the left of a blue square')"
    parts = [f"{k} {'✓' if res[k] else '✗'}" for k in ("colour", "shape", "position", "binding", "relation")
             if res[k] is not None]
    head = "✓ matches the prompt" if res["all_ok"] else "✗ does not match"
    return f"judge: {head} ({', '.join(parts)})"


def tally(images: Sequence[Image.Image], prompt: str) -> str:
    """How many seeds the judge accepts, e.g. "judge over 4 seeds: 3/4 match" ("" off the grammar).

    Args:
        images: one image per seed.
        prompt: their prompt.
    """
    from ..toy import judge_scene

    try:
        ok = sum(bool(judge_scene(im, prompt)["all_ok"]) for im in images)
    except UsageError:
        return ""
    return f"judge over {len(images)} seeds: {ok}/{len(images)} match"


# ---------------------------------------------------------------------- jobs
@dataclasses.dataclass
class Generation:
    """Vanilla and tokens images of the same seeds, with what the page shows about them."""

    seeds: list[int]
    vanilla: list[Image.Image]
    tokens: list[Image.Image]
    difference: Image.Image
    mean_difference: float
    grid: Image.Image
    verdicts: tuple[str, str]
    seconds: float


def _step_callback(progress: Progress | None, total: int, label: str) -> dict[str, Any]:
    """`callback_on_step_end` for the stock pipeline call: per-step progress of the whole job."""
    if progress is None:
        return {}
    done = [0]

    def cb(pipe, i, t, kwargs):
        done[0] += 1
        progress(min(done[0] / total, 1.0), f"{label}: step {done[0]} of {total}")
        return kwargs

    return {"callback_on_step_end": cb}


def generate(bench: Workbench, prompt: str, seeds: str, cfg: Any, steps: Any, size: Any,
             progress: Progress | None = None) -> Generation:
    """The same prompt and seeds without and with the tokens (`generate_comparison`).

    Args:
        bench: the loaded model.
        prompt: the prompt.
        seeds: "0", "0-3", "1,5" (at most `MAX_SEEDS`).
        cfg, steps, size: CFG scale, sampling steps, square image side in pixels.
        progress: called with (fraction, text) after every sampling step.
    Raises:
        SoftrepaError: a one-line reason (`UsageError`: empty / too long prompt, bad seeds, size not a multiple).
    """
    import inspect
    import time

    from ..edit import size_multiple
    from ..generate import generate_comparison, image_name
    from ..prompts import parse_seeds
    from ..viz import difference_image

    pipe = bench.require()
    text = check_prompt(pipe, prompt)
    seed_list = parse_seeds(str(seeds).strip() or "0")
    if len(seed_list) > MAX_SEEDS:
        raise UsageError(f"too many seeds: {len(seed_list)}, the page renders at most {MAX_SEEDS}")
    cfg_v = check_number(cfg, "CFG", 0, 50)
    steps_v = check_number(steps, "steps", 1, MAX_STEPS, integer=True)
    side = check_number(size, "size", 8, MAX_SIDE, integer=True)
    m = size_multiple(pipe)
    if side % m:
        raise UsageError(f"size must be a multiple of {m} for this model, got {side}")
    with bench.lock, tempfile.TemporaryDirectory(prefix="softrepa-ui-") as tmp:
        t0 = time.perf_counter()
        call = (_step_callback(progress, 2 * len(seed_list) * steps_v, "vanilla, then tokens")
                if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters else {})
        grids = generate_comparison(pipe, [text], seed_list, tmp, tokens=bench.tokens, steps=steps_v, cfg=cfg_v,
                                    height=side, width=side, max_sequence_length=bench.defaults.max_sequence_length,
                                    progress=False, call_kwargs=call)
        seconds = time.perf_counter() - t0
        out = Path(tmp)

        def read(sub: str) -> list[Image.Image]:
            return [Image.open(out / sub / image_name(0, s)).convert("RGB") for s in seed_list]

        van, tok = read("vanilla"), read("tokens")
        grid = Image.open(grids / "00000.png").convert("RGB")
    diff, mean = difference_image(van[0], tok[0])
    verdicts = ("", "")
    if bench.miniature:
        verdicts = tuple(verdict(arm[0], text) + (f"; {tally(arm, text)}" if len(arm) > 1 else "")
                         for arm in (van, tok))
    return Generation(seed_list, van, tok, diff, mean, grid, verdicts, seconds)


@dataclasses.dataclass
class Edit:
    """A FlowEdit of one source image without and with the tokens."""

    source: Image.Image
    vanilla: Image.Image
    tokens: Image.Image
    notes: tuple[str, str]
    seconds: float
    lpips_missing: str | None = None


def edit(bench: Workbench, image: str | None, source_prompt: str, target_prompt: str, src_cfg: Any,
         vanilla: tuple[Any, Any], tokens: tuple[Any, Any], progress: Progress | None = None) -> Edit:
    """FlowEdit of one image with each arm's settings (`edit_image`, `FlowEditParams.preset`).

    Args:
        bench: the loaded model.
        image: path of the uploaded (or example) source image.
        source_prompt, target_prompt: what the image shows / what it should show.
        src_cfg: source CFG scale (both arms).
        vanilla, tokens: (n_max, target CFG) of each arm.
        progress: called with (fraction, text) before each arm.
    Raises:
        SoftrepaError: a one-line reason (`UsageError`: not an image, too large, empty prompt, n_max out of range).
    """
    import time

    from ..edit import edit_image
    from ..family import family_of
    from ..flowedit import FlowEditParams

    pipe = bench.require()
    src = open_upload(image)
    sp = check_prompt(pipe, source_prompt, "source prompt")
    tp = check_prompt(pipe, target_prompt, "target prompt")
    family = family_of(pipe)
    scfg = check_number(src_cfg, "source CFG", 0, 50)
    params = {}
    for name, (n_max, tar_cfg), with_tokens in (("vanilla", vanilla, False), ("tokens", tokens, True)):
        params[name] = FlowEditParams.preset(
            family, with_tokens, src_cfg=scfg,
            n_max=check_number(n_max, f"{name} n_max", 0, family.edit.steps, integer=True),
            tar_cfg=check_number(tar_cfg, f"{name} target CFG", 0, 50)).validate()
    results = {}
    with bench.lock:
        t0 = time.perf_counter()
        for k, (name, p) in enumerate(params.items()):
            if progress is not None:
                progress(k / 2, f"FlowEdit {name} (n_max {p.n_max}, target CFG {p.tar_cfg:g})")
            arm = bench.handle.disabled() if name == "vanilla" else contextlib.nullcontext()
            with arm:  # the hooks stay, the tokens are skipped: exactly the vanilla model
                results[name] = edit_image(pipe, src, sp, tp, p, max_sequence_length=bench.defaults.max_sequence_length)
        seconds = time.perf_counter() - t0
    scorer, why = bench.lpips()
    notes = []
    for name, im in results.items():
        parts = [f"n_max {params[name].n_max}, target CFG {params[name].tar_cfg:g}"]
        if scorer is not None:
            parts.append(f"LPIPS to the source {float(scorer.distance([src], [im])[0]):.3f}")
        if bench.miniature:
            parts.append(verdict(im, tp))
        notes.append("; ".join(parts))
    return Edit(src, results["vanilla"], results["tokens"], tuple(notes), seconds,
                None if scorer is not None else f"LPIPS unavailable: {why}")


def example_sources(folder: str | Path) -> list[tuple[str, str, str]]:
    """Miniature renders to edit: (image file, source prompt, target prompt), written into `folder`.

    Args:
        folder: where the PNGs go (a temporary folder of the server).
    """
    import numpy as np

    from ..toy.world import Scene, WorldObject, place_scene
    from ..toy.world import prompt as canonical

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    specs = [(("red", "circle"), "left", ("blue", "circle")), (("green", "square"), "top", ("green", "triangle")),
             (("yellow", "triangle"), "right", ("red", "triangle"))]
    for k, ((colour, shape), pos, (colour2, shape2)) in enumerate(specs):
        scene = place_scene(Scene((WorldObject(colour, shape),), position=pos), np.random.default_rng(k))
        target = Scene((WorldObject(colour2, shape2),), position=pos)
        path = folder / f"example_{k}.png"
        scene.render(size=32).save(path)
        rows.append((str(path), canonical(scene), canonical(target)))
    return rows


__all__ = ["Edit", "Generation", "MAX_PIXELS", "MAX_SEEDS", "MAX_UPLOAD_MB", "check_number", "check_prompt", "edit",
           "example_sources", "generate", "open_upload", "tally", "verdict"]
