"""Prompt and sampling-option parsing shared by generation and editing: prompt files, seeds, sizes.

`read_prompts` takes a literal prompt or a file (.txt, .jsonl rows with "prompt", a COCO captions
.json or a JSON list); a name that looks like a file but does not exist is an error, never the
prompt text. `warn_long_prompts` tells once per run how many prompts the text encoder truncates;
`check_prompt_length` refuses such a prompt (interactive callers: `softrepa ui`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from .checks import MAX_SEED, MAX_SEEDS, MAX_SIDE, json_loads, read_text
from .errors import DatasetError, UsageError

log = logging.getLogger(__name__)


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """Seeds from "0,1,2", "0-9", "0-3,7" (or an int / list), duplicates removed, order kept.

    Args:
        spec: the seed specification.
    Raises:
        UsageError: malformed spec (the message names --seeds).
    """
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        seeds_list = list(dict.fromkeys(int(s) for s in spec))
        if len(seeds_list) > MAX_SEEDS:
            raise UsageError(f"seeds: {len(seeds_list)} seeds, more than the limit of {MAX_SEEDS} for one run")
        return seeds_list
    # refused before anything is materialised: "0-1000000000" would be a list of 10^9 ints (issue 26)
    seeds: dict[int, None] = {}
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(\d{1,20})\s*-\s*(\d{1,20})", part) or re.fullmatch(r"(\d{1,20})()", part)
        if not m:
            raise UsageError(f"--seeds: cannot parse {part!r} (use e.g. 0,1,2 or 0-9)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"--seeds: range {part!r} runs backwards")
        if hi > MAX_SEED:
            raise UsageError(f"--seeds: {hi} does not fit in 64 bits (seeds are 0..{MAX_SEED})")
        if hi - lo + 1 + len(seeds) > MAX_SEEDS:
            raise UsageError(f"--seeds: {part!r} makes more than {MAX_SEEDS} seeds, the limit of one run; "
                             "split the range over several runs into the same --out (they resume)")
        seeds.update(dict.fromkeys(range(lo, hi + 1)))
    return list(seeds)


def parse_size(spec: str | int | None) -> tuple[int, int] | None:
    """"512" -> (512, 512); "768x512" -> (768, 512) as (height, width); None -> None.

    Args:
        spec: the size specification (H or HxW).
    """
    if spec is None or spec == "":
        return None
    m = re.fullmatch(r"\s*(\d{1,9})\s*(?:[xX]\s*(\d{1,9}))?\s*", str(spec))
    if not m or int(m.group(1)) <= 0 or (m.group(2) and int(m.group(2)) <= 0):
        raise UsageError(f"--size: cannot parse {spec!r} (use H or HxW, e.g. 1024 or 768x1024)")
    h = int(m.group(1))
    w = int(m.group(2) or h)
    if max(h, w) > MAX_SIDE:  # 100000 x 100000 would be a 120 GB image buffer before any check
        raise UsageError(f"--size: {h}x{w} is above the limit of {MAX_SIDE} pixels a side")
    return h, w


def read_prompts(spec: str, max_prompts: int | None = None) -> list[str]:
    """Prompts from a literal text, a .txt file (one per line), a .jsonl file (rows with "prompt"),
    or a COCO captions .json file (one prompt per image: its first caption, images in file order).

    Args:
        spec: the prompt text or a file path.
        max_prompts: keep only the first N prompts.
    Raises:
        FileNotFoundError: `spec` names a .txt / .jsonl / .json file that does not exist.
        UsageError: an empty prompt; DatasetError: a file without prompts, or a .jsonl row without
            "prompt" (line number named).
    """
    if not spec.strip():
        raise UsageError("--prompts: the prompt is empty; give the prompt text or a prompt file")
    if max_prompts is not None and (isinstance(max_prompts, bool) or max_prompts < 1):
        raise UsageError(f"--max-prompts must be >= 1, got {max_prompts}")  # 0 used to mean "all"
    path = Path(spec).expanduser()
    is_file_name = re.fullmatch(r"\S+\.(txt|jsonl|json)", spec.strip()) is not None
    if not path.is_file():
        if is_file_name:  # a typo in a file name must not silently become the prompt text
            raise FileNotFoundError(f"--prompts: no such file {spec!r}")
        prompts = [spec]
    elif path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(read_text(path, "--prompts").splitlines(), 1):
            if not line.strip():
                continue
            row = json_loads(line, f"{path}:{n}")
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():  # {"prompt": null} is no prompt "None"
                raise DatasetError(f"{path}:{n}: expected a JSON object with a non-empty string \"prompt\", "
                                   f"got {line.strip()[:80]}")
            prompts.append(prompt)
    elif path.suffix == ".json":
        prompts = _coco_prompts(path)
    else:
        prompts = [ln.strip() for ln in read_text(path, "--prompts").splitlines() if ln.strip()]
    if not prompts:
        raise DatasetError(f"--prompts: {spec!r} holds no prompts")
    return prompts[:max_prompts] if max_prompts is not None else prompts


def _coco_prompts(path: Path) -> list[str]:
    data = json_loads(read_text(path, "--prompts"), str(path))
    if isinstance(data, list) and all(isinstance(p, str) for p in data):
        return [p.strip() for p in data if p.strip()]  # a plain JSON list of prompts
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetError(f"{path}: expected a COCO captions file with 'images' and 'annotations' "
                           "(or a JSON list of prompts)")
    images, anns = data["images"], data["annotations"]
    if not (isinstance(images, list) and isinstance(anns, list) and all(isinstance(x, dict) for x in images + anns)):
        raise DatasetError(f"{path}: 'images' and 'annotations' must be lists of objects (a COCO captions file)")
    first: dict[Any, str] = {}
    for ann in anns:  # annotation order decides which caption is "first"
        cap, key = ann.get("caption"), ann.get("image_id")
        if isinstance(cap, str) and cap.strip() and isinstance(key, (int, str)):
            first.setdefault(key, " ".join(cap.split()))
    return [first[im["id"]] for im in images if isinstance(im.get("id"), (int, str)) and im["id"] in first]


def prompt_tokenizer(pipe: Any) -> Any:
    """The pipeline's first tokenizer, or None: its `tokenizer`, or that processor's own tokenizer where the
    component is a multimodal processor (FLUX.3's Qwen3-VL `tokenizer` component)."""
    tok = getattr(pipe, "tokenizer", None)
    if tok is not None and not hasattr(tok, "model_max_length"):
        tok = getattr(tok, "tokenizer", None)
    return tok


def warn_long_prompts(pipe: Any, prompts: Sequence[str]) -> int:
    """Log one warning for prompts longer than the CLIP tokenizer limit (the pipeline truncates them).

    Args:
        pipe: the pipeline (its `tokenizer` decides the limit; SD3's T5 reads up to 256 tokens).
        prompts: the prompts to check.
    Returns:
        The number of prompts that will be truncated.
    """
    tok = prompt_tokenizer(pipe)
    if tok is None:
        return 0
    limit = tok.model_max_length
    long = [i for i, p in enumerate(prompts) if len(tok(p, truncation=False).input_ids) > limit]
    if long:
        log.warning("%d prompt(s) exceed the text encoder limit of %d tokens and will be truncated "
                    "by the pipeline (first: %r)", len(long), limit, prompts[long[0]][:80])
    return len(long)


def check_prompt_length(pipe: Any, prompt: str, what: str = "prompt") -> None:
    """Refuse a prompt the pipeline's first text encoder would truncate (interactive callers).

    Batch generation only warns (`warn_long_prompts`); a single prompt typed by a user is refused
    instead, so that the image never silently answers a shorter prompt than the one asked.

    Args:
        pipe: the pipeline (its `tokenizer` decides the limit; none: no limit).
        prompt: the prompt.
        what: its name in the message ("prompt", "source prompt", ...).
    Raises:
        UsageError: the prompt is longer than the tokenizer's `model_max_length` (both counts named).
    """
    tok = prompt_tokenizer(pipe)
    if tok is None:
        return
    n, limit = len(tok(prompt, truncation=False).input_ids), int(tok.model_max_length)
    if n > limit:
        raise UsageError(f"{what} too long: {n} tokens, the text encoder reads {limit}")


__all__ = ["check_prompt_length", "parse_seeds", "parse_size", "read_prompts", "warn_long_prompts"]
