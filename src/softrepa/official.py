"""Convert the authors' released token files to ours: SoftREPA's (`dc_tokens.pth`,
`dc_t_tokens.pth`) and AGSM's (`soft_tokens.pth`, `soft_t_tokens.pth`; `METHODS`).

Their files are pickles: `dc_tokens` is a tensor / Parameter — SD3 (L, m, 4096) in the
text-encoder space or (L, m, 1536) in the block width, SD1.5 (m, 768), SDXL (m, 2048) — and
`dc_t_tokens` a pickled `nn.Embedding(100, width * L)` (SD3; layer k owns columns
[k*width, (k+1)*width)) or `nn.Embedding(100, 768)` (SD1.5), possibly saved from a CUDA device.

AGSM's (github jaayeon/AGSM, `transformer.py`): `soft_tokens` holds both policies on its first axis,
[0] = psi+ and [1] = psi- — SD3 (2, L, m, 1536) (block width; a last dim of 4096 would go through
`context_embedder`), SD1.5 (2, m, 768), SDXL (2, m, 2048) — and `soft_t_tokens` one time part
shared by both, `nn.Embedding(100, width * L)` (SD3) or `nn.Embedding(100, width)` (UNets). Their
UNet wrappers apply the tokens to the down and mid blocks (`apply_soft_tokens` default
[True, True, False], which no script overrides), SoftREPA's scripts to the down blocks only. Their
SD3 wrapper appends the tokens after the text where SoftREPA's prepends them: SD3's joint attention
has no text positions, so the order changes nothing but the summation order (tested to 1e-5).

This is the only place the project unpickles anything, and it does so with
`torch.load(weights_only=True, map_location="cpu")` and an allow-list of exactly one class,
`torch.nn.Embedding`: no arbitrary code can run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from .families.unet import BLOCK_GROUPS as UNET_BLOCK_GROUPS
from .tokens import SoftTokens, SoftTokensError, TokenLayout

#: Widths of the released models' cross-attention / block width, used when a file does not say.
DEFAULT_MODEL_DIM = {"sd3": 1536, "sd15": 768, "sdxl": 2048}
DEFAULT_TEXT_DIM = {"sd3": 4096}
#: The families whose released token files can be converted (`softrepa import-official --family`).
FAMILIES = tuple(DEFAULT_MODEL_DIM)
#: Whose files: SoftREPA's (dc_tokens) or AGSM's (soft_tokens with psi+ / psi-).
METHODS = ("softrepa", "agsm")
#: UNet block groups each method's official code applies the tokens to.
OFFICIAL_BLOCKS = {"softrepa": ("down",), "agsm": ("down", "mid")}

# torch colours parts of its unpickling errors; our message goes to logs and terminals alike
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_official_tensor(path: str | os.PathLike, what: str) -> torch.Tensor:
    """Read one tensor from an authors' `.pth` (a tensor, a Parameter, an `nn.Embedding` or a state dict).

    Args:
        path: the `.pth` file.
        what: "dc_tokens" or "dc_t_tokens", for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise SoftTokensError(f"{what}: no such file {path}")
    try:
        with torch.serialization.safe_globals([torch.nn.Embedding]):
            obj: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        text = _ANSI.sub("", str(e))
        # torch words the refusal differently across versions ("Unsupported global: GLOBAL x.y",
        # "unsupported GLOBAL x.y whose module x is blocked"); name the global, never quote the advice
        found = re.search(r"GLOBAL\s+([\w.]+)", text)
        detail = (f"it refers to the global {found.group(1)}, which is not allowed" if found
                  else f"{type(e).__name__}: {text.split('. ')[0][:200]}")
        raise SoftTokensError(
            f"{what}: cannot read {path} as a weights-only PyTorch file ({detail}). "
            "Only tensors and nn.Embedding are accepted."
        ) from e
    if isinstance(obj, torch.nn.Embedding):
        obj = obj.weight
    elif isinstance(obj, dict):
        keys = [k for k in obj if k.endswith("weight") or k in ("dc_tokens", "dc_t_tokens")]
        if len(keys) != 1:
            raise SoftTokensError(f"{what}: {path} holds a dict with keys {list(obj)[:10]}; expected one tensor")
        obj = obj[keys[0]]
    if not isinstance(obj, torch.Tensor):
        raise SoftTokensError(f"{what}: {path} holds a {type(obj).__name__}, expected a tensor or nn.Embedding")
    t = obj.detach().float().cpu().contiguous()
    if not torch.isfinite(t).all():
        raise SoftTokensError(f"{what}: {path} holds NaN/inf values")
    return t


def convert_official(
    family: str,
    dc_tokens: torch.Tensor,
    dc_t_tokens: torch.Tensor | None = None,
    *,
    layers: int | None = None,
    blocks: str | Sequence[str] = ("down",),
    model_dim: int | None = None,
    model_depth: int = 0,
) -> SoftTokens:
    """Build `SoftTokens` that reproduce the authors' forward with their tensors.

    Args:
        family: one of `FAMILIES` ("sd3", "sd15", "sdxl").
        dc_tokens: SD3 (L, m, 4096 | width); UNet (m, width).
        dc_t_tokens: the embedding weight, SD3 (buckets, width * L); UNet (buckets, width); or None.
        layers: SD3: expected L (checked against the tensor).
        blocks: UNet block groups the tokens go to, a sequence or a comma-separated string
            ("down,mid"). Default down only: every one of the
            authors' SD1.5 scripts (train default, run_train, run_train_dist, run_eval) passes
            `--apply_dc True False False`; the paper's text says Down + Mid.
        model_dim: block width for SD3 text-space tokens without a time part (default 1536).
        model_depth: number of transformer blocks of the target model, if known (0: unchecked).
    """
    if family not in FAMILIES:
        raise SoftTokensError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    if family == "sd3":
        if dc_tokens.dim() != 3:
            raise SoftTokensError(f"dc_tokens: SD3 tokens must have shape (L, m, D), got {tuple(dc_tokens.shape)}")
        n_layers, m, d_tok = dc_tokens.shape
        if layers is not None and layers != n_layers:
            raise SoftTokensError(f"dc_tokens: --layers {layers} but the file holds {n_layers} layers")
        if dc_t_tokens is not None:
            if dc_t_tokens.dim() != 2 or dc_t_tokens.shape[1] % n_layers:
                raise SoftTokensError(f"dc_t_tokens: expected (buckets, width*{n_layers}), got {tuple(dc_t_tokens.shape)}")
            width = dc_t_tokens.shape[1] // n_layers
            if model_dim is not None and model_dim != width:
                raise SoftTokensError(f"dc_t_tokens: width {width} != --model-dim {model_dim}")
        else:
            width = model_dim or (d_tok if d_tok != DEFAULT_TEXT_DIM["sd3"] else DEFAULT_MODEL_DIM["sd3"])
        space = "block" if d_tok == width else "text"
        buckets = 0 if dc_t_tokens is None else dc_t_tokens.shape[0]
        layout = TokenLayout("sd3", d_tok, width, m, buckets, space, tuple(range(n_layers)), (), model_depth)
        tokens = SoftTokens(layout)
        with torch.no_grad():
            tokens.base.copy_(dc_tokens)
            if dc_t_tokens is not None:
                # (buckets, L*width) -> (buckets, L, width): chunk k of the last dim is layer k.
                tokens.time.copy_(dc_t_tokens.reshape(buckets, n_layers, width))
        return tokens
    groups = tuple(b.strip() for b in (blocks.split(",") if isinstance(blocks, str) else blocks) if b.strip())
    if not groups or any(b not in UNET_BLOCK_GROUPS for b in groups):
        shown = blocks if isinstance(blocks, str) else ",".join(blocks)
        raise SoftTokensError(f"--blocks: expected a comma-separated subset of {','.join(UNET_BLOCK_GROUPS)}, "
                              f"got {shown!r}")
    if dc_tokens.dim() != 2:
        raise SoftTokensError(f"dc_tokens: {family} tokens must have shape (m, D), got {tuple(dc_tokens.shape)}")
    m, width = dc_tokens.shape
    if model_dim is not None and model_dim != width:
        raise SoftTokensError(f"dc_tokens: width {width} != --model-dim {model_dim}")
    if dc_t_tokens is not None and (dc_t_tokens.dim() != 2 or dc_t_tokens.shape[1] != width):
        raise SoftTokensError(f"dc_t_tokens: expected (buckets, {width}), got {tuple(dc_t_tokens.shape)}")
    buckets = 0 if dc_t_tokens is None else dc_t_tokens.shape[0]
    tokens = SoftTokens(TokenLayout(family, width, width, m, buckets, "block", (), groups, 0))
    with torch.no_grad():
        tokens.base.copy_(dc_tokens.unsqueeze(0))
        if dc_t_tokens is not None:
            tokens.time.copy_(dc_t_tokens.unsqueeze(1))
    return tokens


def convert_official_agsm(family: str, soft_tokens: torch.Tensor, soft_t_tokens: torch.Tensor | None = None,
                          **kwargs: Any) -> tuple[SoftTokens, SoftTokens]:
    """(psi+, psi-) `SoftTokens` that reproduce AGSM's official forward with its tensors.

    Args:
        family: one of `FAMILIES`.
        soft_tokens: SD3 (2, L, m, width | 4096); UNet (2, m, width): [0] psi+, [1] psi-.
        soft_t_tokens: the shared embedding weight, SD3 (buckets, width * L), UNet (buckets, width); or None.
        **kwargs: as `convert_official` (`layers`, `blocks` — default down + mid, AGSM's —, `model_dim`).
    Example:
        >>> pos, neg = convert_official_agsm("sd3", torch.zeros(2, 5, 4, 1536), torch.zeros(100, 1536 * 5))
    """
    want = 4 if family == "sd3" else 3
    if soft_tokens.dim() != want or soft_tokens.shape[0] != 2:
        shape = "(2, L, m, D)" if family == "sd3" else "(2, m, D)"
        raise SoftTokensError(f"soft_tokens: AGSM {family} tokens must have shape {shape} (psi+, psi-), "
                              f"got {tuple(soft_tokens.shape)}")
    kwargs.setdefault("blocks", OFFICIAL_BLOCKS["agsm"])
    pos = convert_official(family, soft_tokens[0], soft_t_tokens, **kwargs)
    neg = convert_official(family, soft_tokens[1], soft_t_tokens, **kwargs)
    return pos, neg


def import_official(
    family: str,
    dc_tokens_path: str | os.PathLike,
    dc_t_tokens_path: str | os.PathLike | None,
    out: str | os.PathLike,
    method: str = "softrepa",
    **kwargs: Any,
) -> Path:
    """Read the authors' files, convert, and save as a softrepa safetensors artefact; returns its path.

    Args:
        family: one of `FAMILIES`.
        dc_tokens_path, dc_t_tokens_path: SoftREPA's dc_tokens.pth / dc_t_tokens.pth, or AGSM's
            soft_tokens.pth / soft_t_tokens.pth (the time part may be None).
        out: the `.safetensors` to write.
        method: "softrepa" or "agsm" (one file with psi+ as its main set and psi- as its
            "negative" set, as an AGSM run of ours writes).
        **kwargs: `convert_official`'s `layers`, `blocks`, `model_dim`.
    """
    from .artifact import refuse_foreign, save_soft_tokens

    out = Path(out).expanduser()
    out = out / "tokens.safetensors" if out.is_dir() else out  # a folder: the file goes inside it
    refuse_foreign(out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors"))
    if method not in METHODS:
        raise SoftTokensError(f"method must be one of {list(METHODS)}, got {method!r}")
    names = ("dc_tokens", "dc_t_tokens") if method == "softrepa" else ("soft_tokens", "soft_t_tokens")
    dc = load_official_tensor(dc_tokens_path, names[0])
    dct = load_official_tensor(dc_t_tokens_path, names[1]) if dc_t_tokens_path else None
    meta = {"softrepa_source": f"import-official {method}", "objective": method}
    if method == "softrepa":
        return save_soft_tokens(convert_official(family, dc, dct, **kwargs), out, extra_metadata=meta)
    pos, neg = convert_official_agsm(family, dc, dct, **kwargs)
    return save_soft_tokens(pos, out, extra_metadata=meta, others={"negative": neg}, name="positive")
