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
        return list(dict.fromkeys(int(s) for s in spec))
    seeds: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise UsageError(f"--seeds: range {part!r} runs backwards")
            seeds += range(lo, hi + 1)
        elif re.fullmatch(r"\d+", part):
            seeds.append(int(part))
        else:
            raise UsageError(f"--seeds: cannot parse {part!r} (use e.g. 0,1,2 or 0-9)")
    return list(dict.fromkeys(seeds))


def parse_size(spec: str | int | None) -> tuple[int, int] | None:
    """"512" -> (512, 512); "768x512" -> (768, 512) as (height, width); None -> None.

    Args:
        spec: the size specification (H or HxW).
    """
    if spec is None or spec == "":
        return None
    if isinstance(spec, int):
        return spec, spec
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(spec))
    if not m or int(m.group(1)) <= 0 or (m.group(2) and int(m.group(2)) <= 0):
        raise UsageError(f"--size: cannot parse {spec!r} (use H or HxW, e.g. 1024 or 768x1024)")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


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
    path = Path(spec).expanduser()
    is_file_name = re.fullmatch(r"\S+\.(txt|jsonl|json)", spec.strip()) is not None
    if not path.is_file():
        if is_file_name:  # a typo in a file name must not silently become the prompt text
            raise FileNotFoundError(f"--prompts: no such file {spec!r}")
        prompts = [spec]
    elif path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(str(row["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(f"{path}:{n}: expected a JSON object with a \"prompt\" field ({e!r})") from e
    elif path.suffix == ".json":
        prompts = _coco_prompts(path)
    else:
        prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise DatasetError(f"--prompts: {spec!r} holds no prompts")
    return prompts[:max_prompts] if max_prompts else prompts


def _coco_prompts(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, list) and all(isinstance(p, str) for p in data):
        return [p.strip() for p in data if p.strip()]  # a plain JSON list of prompts
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetError(f"{path}: expected a COCO captions file with 'images' and 'annotations' "
                           "(or a JSON list of prompts)")
    first: dict[Any, str] = {}
    for ann in data["annotations"]:  # annotation order decides which caption is "first"
        cap = ann.get("caption")
        if isinstance(cap, str) and cap.strip():
            first.setdefault(ann.get("image_id"), " ".join(cap.split()))
    return [first[im["id"]] for im in data["images"] if im.get("id") in first]


def warn_long_prompts(pipe: Any, prompts: Sequence[str]) -> int:
    """Log one warning for prompts longer than the CLIP tokenizer limit (the pipeline truncates them).

    Args:
        pipe: the pipeline (its `tokenizer` decides the limit; SD3's T5 reads up to 256 tokens).
        prompts: the prompts to check.
    Returns:
        The number of prompts that will be truncated.
    """
    tok = getattr(pipe, "tokenizer", None)
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
    tok = getattr(pipe, "tokenizer", None)
    if tok is None:
        return
    n, limit = len(tok(prompt, truncation=False).input_ids), int(tok.model_max_length)
    if n > limit:
        raise UsageError(f"{what} too long: {n} tokens, the text encoder reads {limit}")


__all__ = ["check_prompt_length", "parse_seeds", "parse_size", "read_prompts", "warn_long_prompts"]
