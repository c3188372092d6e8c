"""Safe soft-token artefacts: a safetensors file whose metadata holds the JSON layout.

`tokens.safetensors` holds `base` (num_sets, m, token_dim) and, when present, `time`
(buckets, num_sets, model_dim), both fp32; its header metadata holds `softrepa_layout` (JSON) and
`softrepa_version`. A readable copy of the layout is written beside it as `tokens.json`.

A file may hold further token sets of the same layout (an AGSM run: psi+ in `base` / `time`, psi-
in `negative.base`, sharing `time`): `<set>.base` and, where a set's time part is its own,
`<set>.time`; the header's `softrepa_token_sets` lists the sets, the main one first. Stock readers
(and `load_soft_tokens` without `token_set`) get the main set.
Nothing here unpickles anything.

Provenance (optional header keys; files without them load as before, silently):
`softrepa_base_model` (the hub id or path the tokens were trained on), `softrepa_base_revision`
(its commit when known: given, or read from a Hub-cache snapshot path), `softrepa_denoiser_hash`
(`denoiser_config_hash`: 12 hex digits of the denoiser's architecture config),
`softrepa_denoiser_probe` (`weights_probe`: a dozen weight values, the weights' identity) and
`softrepa_train_config` (the resolved training config, JSON). `load_into` warns once, naming both
models, when the target's config hash differs or its weights do (by the probe, with a tolerance
that absorbs fp16 / bf16 loading; without a probe, by the model's name).

Every reader here also takes a Hub reference (``owner/name[@revision][:file]``, see `softrepa.hub`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .checks import json_loads, layout_fields, tensor_shapes
from .hooks import AttachHandle, attach
from .errors import SoftTokensError, UsageError
from .family import resolve_denoiser
from .runfolder import atomic_write_bytes
from .tokens import SoftTokens, TokenLayout

logger = logging.getLogger(__name__)

LAYOUT_KEY = "softrepa_layout"
VERSION_KEY = "softrepa_version"
BASE_MODEL_KEY = "softrepa_base_model"
BASE_REVISION_KEY = "softrepa_base_revision"
DENOISER_HASH_KEY = "softrepa_denoiser_hash"
TRAIN_CONFIG_KEY = "softrepa_train_config"
WEIGHTS_PROBE_KEY = "softrepa_denoiser_probe"
SETS_KEY = "softrepa_token_sets"
#: the attribute of a `SoftTokens` whose string dict `save_soft_tokens` adds to the header, so
#: that every writer (checkpoints included) records the provenance the trainer set once
PROVENANCE_ATTR = "provenance"
PROVENANCE_KEYS = (BASE_MODEL_KEY, BASE_REVISION_KEY, DENOISER_HASH_KEY, WEIGHTS_PROBE_KEY, TRAIN_CONFIG_KEY)
#: values read from each probed parameter, and the tolerance two probes of the same weights agree to
#: (the same checkpoint loaded in fp16 / bf16 / fp32 rounds differently)
PROBE_VALUES, PROBE_RTOL, PROBE_ATOL = 4, 2e-2, 2e-3
_warned: set[tuple[str, str, str]] = set()


def denoiser_config_hash(model: Any) -> str:
    """12 hex digits identifying a denoiser's architecture: sha256 of its config without the
    private keys (`_name_or_path`, `_diffusers_version`, ...), which name where it came from, not
    what it is. Two checkpoints of one architecture share it; the base model id tells them apart.

    Args:
        model: a pipeline or a denoiser (anything `resolve_denoiser` accepts).
    Example:
        >>> denoiser_config_hash(pipe) == denoiser_config_hash(pipe.transformer)
        True
    """
    config = getattr(resolve_denoiser(model), "config", {}) or {}
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:12]


def weights_probe(model: Any) -> list[float] | None:
    """A few weight values of the denoiser (first values of its first, middle and last parameter):
    the identity of its weights at no cost, compared with a tolerance across dtypes.

    Two checkpoints of one architecture (SD3-medium and a fine-tune of it) share the config hash
    but not these values. None when the weights cannot be read (meta device).

    Args:
        model: a pipeline or a denoiser.
    """
    params = [p for p in resolve_denoiser(model).parameters() if p.numel() >= PROBE_VALUES]
    if not params:
        return None
    try:
        picked = [params[0], params[len(params) // 2], params[-1]]
        return [round(float(v), 6) for p in picked for v in p.detach().reshape(-1)[:PROBE_VALUES].float().cpu()]
    except (RuntimeError, NotImplementedError):  # meta tensors hold no values
        return None


def _probes_agree(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= PROBE_ATOL + PROBE_RTOL * abs(y) for x, y in zip(a, b))


def model_name(model: Any) -> str:
    """The hub id or path a pipeline / denoiser was loaded from ("" when unknown)."""
    for obj in (model, resolve_denoiser(model)):
        name = (getattr(obj, "config", None) or {}).get("_name_or_path") if hasattr(obj, "config") else None
        if name:
            return str(name)
        name = getattr(obj, "name_or_path", None)
        if name:
            return str(name)
    return ""


def provenance_metadata(model: Any, base_model: str | None = None, revision: str | None = None,
                        train_config: dict[str, Any] | None = None) -> dict[str, str]:
    """Header entries recording what tokens were trained on (pass as `extra_metadata`, or set as
    `tokens.provenance` so every save of those tokens carries them).

    Args:
        model: the pipeline / denoiser the tokens are trained on.
        base_model: its hub id or path (default: what the pipeline records).
        revision: the model's commit / revision, when known.
        train_config: the resolved training config (`TrainConfig.to_dict()`).
    Example:
        >>> save_soft_tokens(tokens, "t.safetensors", extra_metadata=provenance_metadata(pipe, "org/model"))
    """
    import re

    name = str(base_model or model_name(model) or "unknown")
    meta = {BASE_MODEL_KEY: name, DENOISER_HASH_KEY: denoiser_config_hash(model)}
    probe = weights_probe(model)
    if probe is not None:
        meta[WEIGHTS_PROBE_KEY] = json.dumps(probe)
    # a model loaded from the Hub cache names its commit in its path (.../snapshots/<commit>/)
    snapshot = re.search(r"snapshots[/\\]([0-9a-f]{40})", model_name(model) or name)
    revision = revision or (snapshot[1] if snapshot else None)
    if revision:
        meta[BASE_REVISION_KEY] = str(revision)
    if train_config is not None:
        meta[TRAIN_CONFIG_KEY] = json.dumps(train_config, default=str)
    return meta


def provenance_of(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance recorded in a tokens file: {base_model, base_revision, denoiser_config_hash,
    train_config (dict)}; only the keys present ({} for files written before provenance existed).

    Args:
        path: a tokens file or reference.
    """
    meta = read_metadata(path)
    out: dict[str, Any] = {}
    for key, name in ((BASE_MODEL_KEY, "base_model"), (BASE_REVISION_KEY, "base_revision"),
                      (DENOISER_HASH_KEY, "denoiser_config_hash")):
        if meta.get(key):
            out[name] = meta[key]
    if meta.get(WEIGHTS_PROBE_KEY):
        try:
            out["denoiser_weights_probe"] = json.loads(meta[WEIGHTS_PROBE_KEY])
        except (ValueError, RecursionError):
            pass
    if meta.get(TRAIN_CONFIG_KEY):
        try:
            out["train_config"] = json.loads(meta[TRAIN_CONFIG_KEY])
        except (ValueError, RecursionError):  # a damaged config must not make the tokens unloadable
            out["train_config"] = meta[TRAIN_CONFIG_KEY]
    return out


def check_base(tokens_source: str, meta: dict[str, str], model: Any) -> bool:
    """Warn (once per tokens / base / target) when tokens are attached to another base model.

    Args:
        tokens_source: how the tokens were named (for the message).
        meta: the tokens file's header metadata.
        model: the pipeline / denoiser they are attached to.
    Returns:
        True when the base is known and differs.
    """
    trained = meta.get(DENOISER_HASH_KEY)
    if not trained:
        return False  # an old file: nothing to compare
    target = denoiser_config_hash(model)
    base, here = meta.get(BASE_MODEL_KEY, "unknown"), model_name(model) or "an unnamed model"
    probe = None
    try:
        probe = json.loads(meta[WEIGHTS_PROBE_KEY]) if meta.get(WEIGHTS_PROBE_KEY) else None
    except (ValueError, RecursionError):
        pass
    target_probe = weights_probe(model) if probe is not None else None
    if trained == target:
        if probe is not None and target_probe is not None:
            # the weights themselves decide: a local copy of the same model under another name is the same base
            if _probes_agree(probe, target_probe):
                return False
        elif base in ("unknown", "") or not model_name(model) or _same_name(base, here):
            return False  # same architecture and the same (or an unknown) name
    key = (tokens_source, trained + base, target + here)
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s: these tokens were trained on %s (denoiser config %s) and are being attached to %s "
                       "(denoiser config %s%s); they may not work as intended", tokens_source, base, trained, here,
                       target, ", other weights" if trained == target else "")
    return True


def _same_name(a: str, b: str) -> bool:
    # a local snapshot of a hub model keeps the id in its path (.../models--org--name/snapshots/...)
    norm = [x.rstrip("/").replace("models--", "").replace("--", "/") for x in (a, b)]
    return norm[0] == norm[1] or norm[0] in norm[1] or norm[1] in norm[0]


def save_soft_tokens(tokens: SoftTokens, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None,
                     *, others: dict[str, SoftTokens] | None = None, name: str = "tokens") -> Path:
    """Save tokens as safetensors (+ a `.json` copy of the layout), atomically.

    Args:
        tokens: the `SoftTokens` to save (the file's main set).
        path: target file; `.safetensors` is appended when missing.
        extra_metadata: more string key/values for the safetensors header (e.g. training step).
        others: further sets of the same layout, {set name: tokens} (AGSM: {"negative": psi-}); a
            time part identical to the main set's is stored once.
        name: the main set's name, recorded when there are `others` (AGSM: "positive").
    Returns:
        The path written.
    Raises:
        SoftTokensError: a set of another layout, or a set name that is not a plain word.

    Example:
        >>> save_soft_tokens(psi_pos, "run/tokens.safetensors", others={"negative": psi_neg}, name="positive")
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    refuse_foreign(path)
    tensors = {"base": tokens.base.detach().float().cpu().contiguous()}
    if tokens.time is not None:
        tensors["time"] = tokens.time.detach().float().cpu().contiguous()
    for set_name, other in (others or {}).items():
        if not set_name.isidentifier() or set_name == name:
            raise SoftTokensError(f"token set name {set_name!r}: expected a word other than the main set's {name!r}")
        if other.layout != tokens.layout:
            raise SoftTokensError(f"token set {set_name!r} has another layout than the main set "
                                  f"({other.layout} vs {tokens.layout})")
        tensors[f"{set_name}.base"] = other.base.detach().float().cpu().contiguous()
        if other.time is not None and not torch.equal(other.time.detach().float().cpu(), tensors["time"]):
            tensors[f"{set_name}.time"] = other.time.detach().float().cpu().contiguous()
    meta = {LAYOUT_KEY: json.dumps(tokens.layout.to_dict()), VERSION_KEY: __version__}
    if others:
        meta[SETS_KEY] = json.dumps([name, *others])
    meta.update({str(k): str(v) for k, v in (getattr(tokens, PROVENANCE_ATTR, None) or {}).items()})
    meta.update(extra_metadata or {})
    atomic_write_bytes(path, save(tensors, metadata=meta))
    sidecar = {"layout": tokens.layout.to_dict(), "softrepa_version": __version__,
               "parameters": sum(t.numel() for t in tensors.values())}
    if others:
        sidecar["token_sets"] = [name, *others]
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(sidecar, indent=2) + "\n").encode())
    return path


def token_sets_of(path: str | os.PathLike) -> list[str]:
    """The token sets a file holds, its main set first (["tokens"] for a one-set file).

    Args:
        path: a tokens file, a folder holding tokens.safetensors, or a Hub reference.
    """
    raw = read_metadata(path).get(SETS_KEY)
    if not raw:
        return ["tokens"]
    try:
        names = json.loads(raw)
    except ValueError as e:
        raise SoftTokensError(f"{path}: invalid '{SETS_KEY}' metadata: {e}") from e
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SoftTokensError(f"{path}: '{SETS_KEY}' must be a list of set names, got {raw[:80]!r}")
    return names


def refuse_foreign(path: Path) -> None:
    """Never write over a file softrepa did not create: an existing `x.safetensors` must be a softrepa
    tokens file and an existing `x.json` beside it softrepa's own layout copy (issue 26).

    Raises:
        SoftTokensError: naming the file and what it is not.
    """
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        try:
            own = json.loads(sidecar.read_bytes())
            own = isinstance(own, dict) and {"layout", "softrepa_version"} <= set(own)
        except (OSError, ValueError, RecursionError):
            own = False
        if not own:
            raise SoftTokensError(f"{sidecar} exists and is not softrepa's layout copy of {path.name}; it would be "
                                  "overwritten: move it or choose another output name")
    if path.exists():
        try:
            own = LAYOUT_KEY in read_metadata(path)
        except SoftTokensError:
            own = False
        if not own:
            raise SoftTokensError(f"{path} exists and is not a softrepa tokens file; it would be overwritten: "
                                  "move it or choose another output name")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of a tokens file (clear errors for bad files).

    Args:
        path: a tokens file, a folder holding tokens.safetensors, or a Hub reference.
    """
    from safetensors import safe_open

    from .hub import resolve_tokens

    path = resolve_tokens(path)
    if not path.is_file():
        raise SoftTokensError(f"{path}: no such tokens file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error type for every malformed header
        raise SoftTokensError(
            f"{path}: not a readable safetensors file ({e}). If this is one of the paper authors' "
            "released .pth files, convert it with `softrepa import-official`."
        ) from e


def load_soft_tokens(path: str | os.PathLike, device: str | torch.device | None = None,
                     token_set: str | None = None) -> SoftTokens:
    """Load tokens saved by `save_soft_tokens`.

    Args:
        path: the `.safetensors` file, a folder holding `tokens.safetensors`, or a Hub reference
            ``owner/name[@revision][:file.safetensors]`` (`softrepa.hub`; a local path wins).
        device: where to put the parameters (default CPU).
        token_set: which set of a several-set file (`token_sets_of`; AGSM: "positive", "negative");
            default the main one.
    Raises:
        SoftTokensError: missing, truncated or non-safetensors file; missing/invalid layout;
            tensor shapes that disagree with the layout (the message names the field).
    """
    from safetensors.torch import load_file

    from .hub import resolve_tokens

    path = resolve_tokens(path)
    meta = read_metadata(path)
    if LAYOUT_KEY not in meta:
        raise SoftTokensError(f"{path}: safetensors file has no '{LAYOUT_KEY}' metadata; not a softrepa tokens file")
    # types, bounds and the tensors' own shapes / dtypes first: a layout declaring a huge width
    # must fail here, before SoftTokens(layout) allocates it (issue 26)
    raw = json_loads(meta[LAYOUT_KEY], f"{path}: invalid '{LAYOUT_KEY}' metadata", error=SoftTokensError)
    layout_fields(raw, str(path))
    try:
        layout = TokenLayout.from_dict(raw)
    except TypeError as e:
        raise SoftTokensError(f"{path}: invalid '{LAYOUT_KEY}' metadata: {e}") from e
    except SoftTokensError as e:
        raise SoftTokensError(f"{path}: {e}") from e
    sets = layout.num_sets
    names = token_sets_of(path)
    if token_set is not None and token_set not in names:
        raise SoftTokensError(f"{path}: no token set {token_set!r}; the file holds {', '.join(names)}")
    base_shape = (sets, layout.num_tokens, layout.token_dim)
    time_shape = (layout.time_buckets, sets, layout.model_dim) if layout.time_buckets else None
    tensor_shapes(path, {"base": base_shape, "time": time_shape,
                         **{f"{n}.base": base_shape for n in names[1:]}})  # every set, before loading any
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise SoftTokensError(f"{path}: cannot read tensors ({e}); the file may be truncated") from e
    base_key, time_key = "base", "time"
    if token_set is not None and token_set != names[0]:
        base_key = f"{token_set}.base"
        time_key = f"{token_set}.time" if f"{token_set}.time" in tensors else "time"  # a shared time part
    tokens = SoftTokens(layout)
    _check_shape(path, base_key, tensors.get(base_key), tuple(tokens.base.shape))
    expected_time = None if tokens.time is None else tuple(tokens.time.shape)
    if expected_time is None and "time" in tensors:
        raise SoftTokensError(f"{path}: field 'time' present but layout says time_buckets=0")
    if expected_time is not None:
        _check_shape(path, time_key, tensors.get(time_key), expected_time)
    with torch.no_grad():
        tokens.base.copy_(tensors[base_key])
        if tokens.time is not None:
            tokens.time.copy_(tensors[time_key])
    provenance = {k: v for k, v in meta.items() if k in PROVENANCE_KEYS}
    if provenance:  # kept, so that re-saving (e.g. after fine-tuning further) keeps where they came from
        setattr(tokens, PROVENANCE_ATTR, provenance)
    return tokens.to(device) if device is not None else tokens


def _check_shape(path: Path, name: str, tensor: torch.Tensor | None, expected: tuple[int, ...]) -> None:
    if tensor is None:
        raise SoftTokensError(f"{path}: missing tensor '{name}'")
    if tuple(tensor.shape) != expected:
        raise SoftTokensError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, layout expects {expected}")
    if not torch.isfinite(tensor).all():
        raise SoftTokensError(f"{path}: tensor '{name}' holds NaN/inf values")


def load_into(pipeline: Any, path: str | os.PathLike, uncond_tokens: str = "positive") -> AttachHandle:
    """Load a tokens file and attach it to a pipeline (or model) in one call.

    Args:
        pipeline: a stock diffusers pipeline (or its transformer / UNet).
        path: tokens `.safetensors`, a folder holding `tokens.safetensors`, or a Hub reference
            ``owner/name[@revision][:file.safetensors]`` (a local path wins).
        uncond_tokens: what the unconditional CFG branch carries (`softrepa.branches`): "positive"
            (the file's main set on both branches, the default), "negative" (the file's "negative"
            set there: an AGSM run's psi-, the official `--uncon2neg`), "none" (the vanilla model there).
    Returns:
        The `AttachHandle`; `handle.remove()` detaches. Tokens recording another base model than
        the pipeline's (provenance) attach with one warning naming both.
    Raises:
        SoftTokensError: a bad file or tokens that do not fit the model.
        UsageError: "negative" for a file without a negative set, or a choice the pipeline's CFG
            does not allow (see `softrepa.branches.configure`).

    Example:
        >>> pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
        >>> handle = softrepa.load_into(pipe, "tokens.safetensors")   # or "user/softrepa-sd3-tokens"
        >>> image = pipe("two cats and a red ball").images[0]     # the stock call, with the tokens
        >>> handle.remove()                                        # the stock model again, bit for bit
    """
    from .branches import check_choice, configure

    check_choice(uncond_tokens)
    denoiser = resolve_denoiser(pipeline)
    try:
        device = next(denoiser.parameters()).device
    except StopIteration:
        device = None
    tokens = load_soft_tokens(path, device=device)
    negative = None
    if uncond_tokens == "negative":
        names = token_sets_of(path)
        if "negative" not in names[1:]:
            raise UsageError(f"{path}: --uncond-tokens negative needs a file with a 'negative' token set (an AGSM "
                             f"run's tokens.safetensors); this one holds {', '.join(names)}")
        negative = load_soft_tokens(path, device=device, token_set="negative")
    check_base(str(path), {k: str(v) for k, v in (getattr(tokens, PROVENANCE_ATTR, None) or {}).items()}, pipeline)
    try:
        handle = attach(pipeline, tokens)
    except SoftTokensError as e:
        raise SoftTokensError(f"{path}: {e}") from e
    try:
        configure(handle, pipeline, uncond_tokens, negative)
    except BaseException:
        handle.remove()
        raise
    return handle
