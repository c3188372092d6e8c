"""FlowEdit editing with a pipeline's model (and whatever soft tokens are attached): images, manifests.

`edit_image` edits one image; `edit_manifest` edits a manifest of (image, source prompt, target
prompt) rows for one or several target CFG values into an output folder, resumable (the
`softrepa.runfolder` contract: image first, then its metadata row; a re-run skips finished rows and
refuses a folder made with other settings or another manifest). Settings default to the family's
paper presets (`FlowEditParams.preset`): vanilla n_max 33 / target CFG 13.5, with tokens 30 / 9.
The loop itself is `softrepa.flowedit.flowedit_latents`; the family gives the model adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ._version import __version__
from .hooks import attached_handle
from .backbone import TextCond, backbone_for
from .checks import check_pipeline_size, finite, load_yaml, path_problem, read_text
from .errors import DatasetError, RunFolderError, UsageError
from .family import family_of, resolve_denoiser
from .flowedit import EditConds, FlowEditParams, flowedit_latents, guidance_mode
from .generate import native_resolution
from .prompts import warn_long_prompts
from .runlock import RunLock
from .runfolder import append_row, atomic_write_bytes, finished_rows, open_image, png_bytes, tokens_record

log = logging.getLogger(__name__)

#: Settings that must agree between a run and the edits already in its output folder.
RESUME_KEYS = ("model", "tokens_sha256", "family", "dtype", "steps", "n_max", "n_min", "n_avg", "src_cfg",
               "tar_cfg", "guidance", "seed", "size", "max_sequence_length", "size_conditioning", "uncond_tokens")


def _tokens_active(pipe: Any) -> bool:
    handle = attached_handle(pipe)
    return handle is not None and handle.enabled


@contextlib.contextmanager
def vae_upcast(vae: Any) -> Iterator[None]:
    """Run an fp16 VAE whose config asks for it (`force_upcast`, e.g. SDXL's) in fp32, as the
    diffusers pipelines do: its fp16 activations overflow to NaN at high resolution."""
    if vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        yield
        return
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(torch.float16)


def encode_source(backbone: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> float32 model latents of the VAE posterior *mode* (`Backbone.encode_source`),
    with an fp16 VAE that asks for fp32 upcast on the way."""
    with vae_upcast(backbone.vae):
        return backbone.encode_source(pixels).float()


@torch.no_grad()
def edit_latents(pipe: Any, z_src: torch.Tensor, source_prompts: list[str], target_prompts: list[str],
                 params: FlowEditParams, *, resolution: int | tuple[int, int] | None = None,
                 generator: torch.Generator | None = None, max_sequence_length: int | None = None, progress: bool = False,
                 warn_long: bool = True) -> torch.Tensor:
    """FlowEdit on latents with a pipeline's model (and whatever tokens are attached to it).

    Args:
        pipe: the pipeline.
        z_src: (B, C, h, w) source latents (`encode_source`).
        source_prompts, target_prompts: B prompts each.
        params: FlowEdit settings.
        resolution: image size, a side or (H, W), for SDXL's size conditioning (default: the pixel
            size of `z_src`, (h, w) times the VAE factor).
        generator: forward-noise generator (default: CPU, seeded with params.seed).
        max_sequence_length: text length (default: the family's `text_length`).
        progress: progress bar over the steps.
        warn_long: log a warning for prompts the text encoder truncates (as generation does);
            callers that already checked a whole manifest turn it off.
    Returns:
        (B, C, h, w) float32 edited latents.
    """
    params.validate()
    if not (len(source_prompts) == len(target_prompts) == z_src.shape[0]):
        raise UsageError("source_prompts, target_prompts and z_src must have the same batch size")
    if warn_long:
        warn_long_prompts(pipe, list(dict.fromkeys([*source_prompts, *target_prompts])))
    if resolution is None:  # condition on the size actually edited, not the native square
        f = int(pipe.vae_scale_factor)
        resolution = (z_src.shape[-2] * f, z_src.shape[-1] * f)
    bb = backbone_for(pipe, max_sequence_length=max_sequence_length)
    denoise, sigmas, add_noise = family_of(pipe).edit_model(bb, params.steps, tuple(z_src.shape))
    b = z_src.shape[0]
    handle = attached_handle(pipe)
    if handle is not None and handle.enabled and handle.uncond_mode != "positive":
        if guidance_mode(denoise) == "embedded":
            raise UsageError(f"--uncond-tokens {handle.uncond_mode}: {family_of(pipe).title} edits with embedded "
                             "guidance, which has no unconditional branch")
        denoise = _naming_uncond_rows(denoise, handle, b)
    if guidance_mode(denoise) == "embedded":
        # guidance is a model input (FLUX.1-dev, FLUX.2): conditional rows only, (source, target)
        cond = bb.encode_prompts(list(source_prompts) + list(target_prompts), resolution=resolution)
        conds = EditConds(cond.index(range(b)), cond.index(range(b, 2 * b)), cond)
    else:
        # FlowEdit's negative prompt is "" (encoded like any prompt) for both source and target
        cond = bb.encode_prompts([""] + list(source_prompts) + list(target_prompts), resolution=resolution)
        empty = cond.index([0] * b)
        src, tar = cond.index(range(1, b + 1)), cond.index(range(b + 1, 2 * b + 1))
        conds = EditConds(TextCond.cat([empty, src]), TextCond.cat([empty, tar]),
                          TextCond.cat([empty, src, empty, tar]))
    # the pipeline's execution device: under model CPU offload the weights report "cpu"
    device = getattr(pipe, "_execution_device", None) or bb.device
    return flowedit_latents(denoise, z_src.to(device), sigmas, conds, params, add_noise=add_noise,
                            generator=generator, progress=progress)


def _uncond_record(pipe: Any) -> str | None:
    """What the unconditional branch carries, for the metadata (None: the tokens, or no tokens)."""
    handle = attached_handle(pipe)
    mode = handle.uncond_mode if handle is not None and handle.enabled else "positive"
    return None if mode == "positive" else mode


def _naming_uncond_rows(denoise: Any, handle: Any, b: int) -> Any:
    """`denoise` telling the attachment which rows are unconditional: FlowEdit's CFG calls stack
    (uncond B rows, cond B rows) once per prompt ([x, x]) or twice (the joint call)."""
    def named(x: torch.Tensor, *args: Any) -> torch.Tensor:
        mask = (torch.arange(x.shape[0]) // b) % 2 == 0  # (n,): uncond, cond, uncond, cond blocks of b
        with handle.uncond_rows(mask):
            return denoise(x, *args)

    return named


# --------------------------------------------------------------------------- images
def size_multiple(pipe: Any) -> int:
    """Image sides must be multiples of this: the VAE factor times the transformer's patch size, and
    of the pipeline's image-processor factor (FLUX packs 2 x 2 latents: 16 for a factor-8 VAE)."""
    patch = getattr(resolve_denoiser(pipe).config, "patch_size", None) or 1
    multiple = int(pipe.vae_scale_factor) * int(patch)
    processor = getattr(getattr(pipe, "image_processor", None), "config", None)
    packed = int(getattr(processor, "vae_scale_factor", None) or multiple)
    return math.lcm(multiple, packed)


def working_size(width: int, height: int, multiple: int, size: tuple[int, int] | None = None,
                 max_side: int | None = None) -> tuple[int, int]:
    """(H, W) the model edits at: `size` if given, else the image's own size scaled down so that its
    longer side is at most `max_side`; both rounded to the nearest multiple of `multiple` (>= one).

    Args:
        width, height: the source image size.
        multiple: see `size_multiple`.
        size: explicit (H, W).
        max_side: cap of the longer side (default: none).
    """
    if size is not None:
        h, w = size
    else:
        scale = min(1.0, max_side / max(width, height)) if max_side else 1.0
        h, w = height * scale, width * scale
    return (max(multiple, int(round(h / multiple)) * multiple), max(multiple, int(round(w / multiple)) * multiple))


def image_to_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1] at `size` = (H, W) (bicubic resize when needed)."""
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def pixels_to_image(pixels: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> PIL (the rounding diffusers' image processor uses)."""
    arr = ((pixels[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    return Image.fromarray((arr * 255).round().astype(np.uint8))


@torch.no_grad()
def edit_image(pipe: Any, image: Image.Image | str, source_prompt: str, target_prompt: str,
               params: FlowEditParams | None = None, *, size: tuple[int, int] | None = None,
               max_sequence_length: int | None = None, progress: bool = False, warn_long: bool = True) -> Image.Image:
    """Edit one image with FlowEdit; the result has the source image's size.

    The whole image is edited: it is resized (bicubic, never cropped) to a working size the model
    accepts, edited there, and the result is resized back (Lanczos) to the source's exact size. With
    the default size the aspect ratio changes only by the rounding of each side to the size multiple;
    an explicit `size` of another aspect ratio stretches the image and the result is stretched back.
    SDXL is size-conditioned on the working (H, W).

    Args:
        pipe: a loaded pipeline of a registered family (attach soft tokens first to edit with them).
        image: a PIL image or an image file path.
        source_prompt: describes the source image.
        target_prompt: describes the wanted edit.
        params: FlowEdit settings (default: the family's paper preset, `FlowEditParams.preset`, with
            tokens when tokens are attached and enabled, else vanilla).
        size: working (H, W); default: the image's size, longer side capped at the model's native
            resolution, each side rounded to the model's size multiple (`size_multiple`).
        max_sequence_length: text length (default: the family's `text_length`).
        progress: progress bar over the steps.
        warn_long: log a warning when a prompt is longer than the text encoder reads.
    Returns:
        The edited PIL image, of the source image's size.

    Example:
        >>> softrepa.load_into(pipe, "tokens.safetensors")
        >>> edited = edit_image(pipe, "cat.png", "a cat on a sofa", "a dog on a sofa")  # n_max 30, CFG 9
    """
    family = family_of(pipe)
    _ = family.edit  # a family without FlowEdit (Wan: video) refuses in one line, whatever `params` says
    if params is None:
        params = FlowEditParams.preset(family, with_tokens=_tokens_active(pipe))
    params.validate()
    src = open_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
    h, w = working_size(src.width, src.height, size_multiple(pipe), size, max_side=native_resolution(pipe))
    check_pipeline_size(pipe, h, w)
    bb = backbone_for(pipe)
    z_src = encode_source(bb, image_to_pixels(src, (h, w)))  # (1, C, h/f, w/f)
    z = edit_latents(pipe, z_src, [source_prompt], [target_prompt], params, resolution=(h, w),
                     max_sequence_length=max_sequence_length, progress=progress, warn_long=warn_long)
    with vae_upcast(bb.vae):
        out = pixels_to_image(bb.decode_latents(z))  # decode_latents casts to the VAE's dtype
    return out if out.size == src.size else out.resize(src.size, Image.LANCZOS)


# --------------------------------------------------------------------------- manifests
def _flowedit_yaml_rows(path: Path, text: str) -> list[tuple[str, dict[str, str]]]:
    """(label, row) per target prompt of FlowEdit's own edit file (its repo's edits.yaml).

    That file is a YAML list of entries {input_img (the authors' Data/flowedit.yaml: init_img),
    source_prompt, target_prompts: [..], target_codes: [..] (optional, one per target)}.
    """
    data = load_yaml(text, str(path), error=DatasetError)  # duplicate keys reported, not last-wins
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a YAML list of FlowEdit entries (input_img, source_prompt, "
                           f"target_prompts), got {type(data).__name__}")
    rows = []
    for n, e in enumerate(data, 1):
        if not isinstance(e, dict):
            raise DatasetError(f"{path}: entry {n} is not a mapping")
        image = e.get("input_img", e.get("init_img"))
        if not isinstance(image, str) or not image.strip():
            raise DatasetError(f"{path}: entry {n} has no 'input_img'")
        if not isinstance(e.get("source_prompt"), str) or not e["source_prompt"].strip():
            raise DatasetError(f"{path}: entry {n} has no 'source_prompt'")
        targets = e.get("target_prompts", e.get("target_prompt"))
        targets = [targets] if isinstance(targets, str) else targets
        if not isinstance(targets, list) or not targets:
            raise DatasetError(f"{path}: entry {n} has no 'target_prompts' (a list of prompts)")
        codes = e.get("target_codes")
        if codes is not None and (not isinstance(codes, list) or len(codes) != len(targets)):
            raise DatasetError(f"{path}: entry {n}: 'target_codes' must list one code per target prompt "
                               f"({len(targets)})")
        for k, target in enumerate(targets):
            # YAML folds long prompts over lines: whitespace runs become one space, as in the official loader
            row = {"image": image.strip(), "source_prompt": " ".join(e["source_prompt"].split()),
                   "target_prompt": " ".join(str(target).split()) if target is not None else ""}
            if codes is not None:
                row["target_code"] = str(codes[k])
            rows.append((f"{n} (target {k + 1})", row))
    return rows


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows {image (absolute), source_prompt, target_prompt} of a .jsonl, .json or FlowEdit .yaml manifest.

    A `.yaml` / `.yml` file is FlowEdit's own edit format (a list of entries with `input_img`,
    `source_prompt`, `target_prompts` and optional `target_codes`): one row per target prompt, with
    `target_code` when given. Its relative image paths are tried against its folder, then the
    current directory (the official script opens them from where it runs).

    Args:
        path: the manifest file; relative image paths are resolved against its folder.
    Raises:
        FileNotFoundError: missing manifest or images (the first few are named);
        DatasetError: malformed rows (row / entry number and missing field named).

    Example:
        >>> rows = read_manifest("FlowEdit/edits.yaml")     # 2 entries -> one row per target prompt
        >>> rows[0]["target_prompt"], rows[0]["target_code"]
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--manifest: no such file {path}")
    text = read_text(path, "--manifest")  # not UTF-8: one line naming the file, line and byte
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        if is_yaml:
            raw = _flowedit_yaml_rows(path, text)
        elif path.suffix == ".jsonl":
            raw = [(n, json.loads(ln)) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        else:
            data = json.loads(text)
            data = data.get("rows", data) if isinstance(data, dict) else data
            raw = list(enumerate(data, 1))
    except (json.JSONDecodeError, RecursionError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    rows, missing = [], []
    for n, r in raw:
        if not isinstance(r, dict):
            raise DatasetError(f"{path}: row {n} is not an object")
        for key in ("image", "source_prompt", "target_prompt"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise DatasetError(f"{path}: row {n} has no {key!r}")
        image = Path(r["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if path_problem(image):  # a 300-character name: this row, named (not an OSError for the manifest)
            raise DatasetError(f"{path}: row {n}: {path_problem(image)}")
        if is_yaml and not image.is_file() and Path(r["image"]).expanduser().is_file():
            image = Path(r["image"]).expanduser()
        if not image.is_file():
            missing.append(str(image))
        # absolute, so that `evaluate` (LPIPS against the source) finds it from any directory
        rows.append({"image": str(image.resolve()), "source_prompt": r["source_prompt"],
                     "target_prompt": r["target_prompt"],
                     **({"target_code": r["target_code"]} if "target_code" in r else {})})
    if missing:  # checked up front: a run must not stop half-way over a typo
        raise FileNotFoundError(f"{path}: {len(missing)} source image(s) not found, e.g. {missing[:3]}")
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def parse_cfgs(spec: str | float | Sequence[float] | None, default: float) -> list[float]:
    """"9,11,13" -> [9.0, 11.0, 13.0] (None -> [default]); duplicates removed, order kept."""
    if spec is None:
        return [default]
    if isinstance(spec, (int, float)):
        return [finite(spec, "--target-cfg")]
    try:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        vals = [float(v) for v in parts if str(v).strip()]
    except ValueError as e:
        raise UsageError(f"--target-cfg: cannot parse {spec!r} (use e.g. 13.5 or 9,11,13)") from e
    if not vals:
        raise UsageError(f"--target-cfg: no values in {spec!r}")
    for v in vals:  # nan / inf wrote a black image and a NaN (not JSON) into metadata.jsonl
        finite(v, "--target-cfg")
    return list(dict.fromkeys(vals))


def output_name(index: int, image: str, manifest: bool) -> str:
    """`{stem}.png` for one image; `{index:05d}_{stem}.png` in manifest mode (stems may repeat)."""
    stem = Path(image).stem
    return f"{index:05d}_{stem}.png" if manifest else f"{stem}.png"


def edit_manifest(pipe: Any, rows: Sequence[dict[str, str]], out: str | Path, *,
                  target_cfgs: Sequence[float] | None = None, params: FlowEditParams | None = None,
                  size: tuple[int, int] | None = None, max_sequence_length: int | None = None,
                  model: str | None = None, tokens: str | Path | None = None, manifest: bool = True,
                  size_spec: str | None = None, progress: bool = True) -> int:
    """Edit every row for each target CFG value into `out` (one subfolder `cfg_<v>` per value when
    several); resumable: finished rows are skipped, a folder of other settings is refused.

    Args:
        pipe: a loaded pipeline (attach tokens first to edit with them).
        rows: {image, source_prompt, target_prompt} rows (`read_manifest`).
        out: output folder.
        target_cfgs: target CFG values (default: the preset's one).
        params: FlowEdit settings (default: the family's paper preset, vanilla or with tokens);
            its `tar_cfg` is replaced by each value of `target_cfgs`.
        size: working (H, W) (default: each image's own, capped at the native resolution).
        max_sequence_length: text length (families that take one; default: the family's `text_length`).
        model, tokens: recorded in the metadata (model id / folder; the tokens file in effect).
        manifest: name outputs `{index:05d}_{stem}.png` (True) or `{stem}.png` (one image).
        size_spec: the size as the user wrote it (recorded; part of the resume check).
        progress: progress bar.
    Returns:
        The number of images edited by this call.

    Example:
        >>> rows = read_manifest("div2k.jsonl")
        >>> edit_manifest(pipe, rows, "edits/", target_cfgs=[9, 11, 13])   # edits/cfg_9/, cfg_11/, ...
    """
    family = family_of(pipe)
    # the family's length unless one is given (SoftTokensError for a family that takes none), recorded
    # as resolved so that a folder made with the default and with the same explicit length agree
    max_sequence_length = family.resolve_text_length(max_sequence_length)
    base = (params or FlowEditParams.preset(family, with_tokens=_tokens_active(pipe))).validate()
    cfgs = list(dict.fromkeys(float(c) for c in (target_cfgs or [base.tar_cfg])))
    common: dict[str, Any] = {"model": model or getattr(pipe.config, "_name_or_path", None) or type(pipe).__name__,
                              **tokens_record(pipe, tokens), "family": family.name,
                              "dtype": str(pipe.dtype).replace("torch.", ""), "size": size_spec,
                              "max_sequence_length": max_sequence_length, "softrepa_version": __version__,
                              **family.run_settings(), "uncond_tokens": _uncond_record(pipe)}
    out_root = Path(out)
    # one writer per output folder (held to the end): two edits into it would interleave their rows
    with RunLock(out_root, "output folder"):
        return _edit_planned(pipe, rows, out_root, base, cfgs, common, manifest, size, max_sequence_length, progress)


def _edit_planned(pipe, rows, out_root: Path, base: FlowEditParams, cfgs: list[float], common: dict[str, Any],
                  manifest, size, max_sequence_length, progress: bool) -> int:
    """`edit_manifest` under the folder's lock: check every folder, then edit what is not done."""
    plan = []  # every output folder is checked before anything is edited
    for cfg in cfgs:
        p = dataclasses.replace(base, tar_cfg=cfg)
        folder = out_root / f"cfg_{cfg:g}" if len(cfgs) > 1 else out_root
        settings = {**common, **p.to_dict()}
        done = finished_rows(folder, settings, RESUME_KEYS) if folder.is_dir() else {}
        for i, r in enumerate(rows):  # a changed manifest must not be mistaken for finished work
            old = done.get(output_name(i, r["image"], manifest))
            if old is not None and any(old.get(key) != r[key] for key in r):
                raise RunFolderError(f"{folder}: {old['file']} was made from another manifest row; "
                                     "choose another --out")
        todo = [(i, r) for i, r in enumerate(rows) if output_name(i, r["image"], manifest) not in done]
        log.info("tar_cfg %g: %d to edit, %d already done in %s", cfg, len(todo), len(rows) - len(todo), folder)
        plan.append((folder, p, settings, todo))
    pending = {q for *_, todo in plan for _, r in todo for q in (r["source_prompt"], r["target_prompt"])}
    if pending:  # once for the whole run, before hours of editing, instead of once per row
        warn_long_prompts(pipe, sorted(pending))
    # every source image still to edit is decoded once now: a corrupt one stops the run here, named,
    # not after hours of edits (open_image raises FileNotFoundError / ValueError naming the file)
    for image in dict.fromkeys(r["image"] for *_, todo in plan for _, r in todo):
        open_image(image)
    total = 0
    for folder, p, settings, todo in plan:
        folder.mkdir(parents=True, exist_ok=True)
        for i, r in tqdm(todo, desc=f"edit tar_cfg={p.tar_cfg:g}", unit="img", disable=not progress):
            src = open_image(r["image"])
            edited = edit_image(pipe, src, r["source_prompt"], r["target_prompt"], p, size=size,
                                max_sequence_length=max_sequence_length, warn_long=False)
            name = output_name(i, r["image"], manifest)
            atomic_write_bytes(folder / name, png_bytes(edited))  # the image first, then its row
            append_row(folder / "metadata.jsonl", {"file": name, "index": i, **r, "width": src.width,
                                                   "height": src.height, **settings})
        total += len(todo)
    return total


__all__ = ["RESUME_KEYS", "edit_image", "edit_latents", "edit_manifest", "encode_source", "image_to_pixels",
           "output_name", "parse_cfgs", "pixels_to_image", "read_manifest", "size_multiple", "vae_upcast",
           "working_size"]
