"""Soft tokens on the Hugging Face Hub: fetch them by repo id, publish them with a model card.

A tokens *reference* (`resolve_tokens`, hence `load_soft_tokens`, `load_into` and every
`--tokens` option) is one of:

* a local path: a `.safetensors` file, or a folder holding `tokens.safetensors` (a run folder,
  a downloaded repo). A local path that exists always wins over a Hub id of the same spelling.
* a Hub model repo id, ``owner/name[@revision][:path/in/repo.safetensors]``, e.g.
  ``user/softrepa-sd3-tokens``, ``user/softrepa-sd3-tokens@v1``,
  ``user/softrepa-sd3-tokens@main:runs/coco/tokens.safetensors``. Without a file name the
  repo's ``tokens.safetensors`` is used; an ``hf://`` prefix is accepted and ignored. The file
  goes through `huggingface_hub.hf_hub_download`, so the Hub cache, ``HF_HUB_OFFLINE=1``,
  ``HF_HUB_CACHE`` / ``HF_HOME`` and ``HF_TOKEN`` behave as for any diffusers model.

Publishing (`push_to_hub`, the model card) lives in `softrepa.publish`, above `artifact`: this
module sits below it (the readers of `artifact` resolve references here).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SoftrepaError, SoftTokensError


class HubError(SoftrepaError, OSError):
    """The Hub refused or could not be reached (push: not logged in, no write access, offline)."""

#: the file a repo (or a folder) is expected to hold when the reference names none
DEFAULT_FILENAME = "tokens.safetensors"

# owner/name as the Hub spells repo ids (letters, digits, "-", "_", "."), then @revision, then :file
_HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^:@\s]+))?(?::(?P<file>[^:\s]+))?$")


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub tokens reference: ``repo_id[@revision][:filename]``."""

    repo_id: str
    revision: str | None = None
    filename: str = DEFAULT_FILENAME

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (
            f":{self.filename}" if self.filename != DEFAULT_FILENAME else "")


def parse_hub_ref(spec: str) -> HubRef | None:
    """The Hub reference that `spec` spells, or None when it reads as a local path.

    Paths starting with ".", "/", "~" or holding a backslash are local; so is ``a/b.safetensors``
    without ``:`` (a missing local file, reported as such, not a repo named ``b.safetensors``).

    Args:
        spec: the user's string.
    Example:
        >>> parse_hub_ref("user/tokens@v1:sd3.safetensors")
        HubRef(repo_id='user/tokens', revision='v1', filename='sd3.safetensors')
        >>> parse_hub_ref("runs/sd3/tokens.safetensors") is None
        True
    """
    s = spec[5:] if spec.startswith("hf://") else spec
    if s.startswith((".", "/", "~")) or "\\" in s:
        return None
    m = _HUB_REF.match(s)
    if m is None:
        return None
    if m["file"] is None and m["rev"] is None and m["repo"].endswith(".safetensors"):
        return None
    return HubRef(m["repo"], m["rev"], m["file"] or DEFAULT_FILENAME)


def resolve_tokens(spec: str | os.PathLike) -> Path:
    """A local tokens file for a path, a folder or a Hub reference (downloaded / from the cache).

    Args:
        spec: see the module docstring.
    Returns:
        The path of a `.safetensors` file on this machine.
    Raises:
        SoftTokensError: a missing local file, or a Hub id / revision / file that cannot be had
            (offline and not cached, no such repo, no such file); one line naming the reference.

    Example:
        >>> resolve_tokens("runs/sd3")                       # runs/sd3/tokens.safetensors
        >>> resolve_tokens("user/softrepa-sd3-tokens@v1")   # ~/.cache/huggingface/hub/.../tokens.safetensors
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        inner = path / DEFAULT_FILENAME
        if not inner.is_file():
            raise SoftTokensError(f"{path}: folder without a {DEFAULT_FILENAME}")
        return inner
    if path.exists() or isinstance(spec, os.PathLike):
        return path
    ref = parse_hub_ref(str(spec))
    if ref is None:
        return path  # a local path; the reader reports it missing
    return download_tokens(ref)


def download_tokens(ref: HubRef) -> Path:
    """`hf_hub_download` of a tokens file (one-line errors naming the reference).

    Args:
        ref: the parsed reference.
    Returns:
        The cached tokens file.
    Example:
        >>> download_tokens(parse_hub_ref("user/softrepa-sd3-tokens@v1"))
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError as e:  # pragma: no cover - diffusers depends on huggingface_hub
        raise SoftTokensError(f"{ref}: loading tokens from the Hub needs huggingface_hub ({e})") from e
    try:
        file = hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision)
    except RepositoryNotFoundError as e:
        raise SoftTokensError(f"{ref}: no such Hub repo {ref.repo_id!r} (or it is private: log in or set HF_TOKEN), "
                              "and no such local file") from e
    except RevisionNotFoundError as e:
        raise SoftTokensError(f"{ref}: repo {ref.repo_id!r} has no revision {ref.revision!r}") from e
    # first: huggingface_hub derives it from EntryNotFoundError
    except LocalEntryNotFoundError as e:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the cache
        raise SoftTokensError(f"{ref}: not a local file, and the Hub file {ref.repo_id}/{ref.filename} is not in the "
                              "Hub cache while offline (HF_HUB_OFFLINE or no connection)") from e
    except EntryNotFoundError as e:
        raise SoftTokensError(f"{ref}: repo {ref.repo_id!r} has no file {ref.filename!r}") from e
    except (OSError, ValueError) as e:  # HTTP errors (HfHubHTTPError is an OSError), bad ids
        raise SoftTokensError(f"{ref}: cannot download from the Hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return Path(file)


__all__ = ["DEFAULT_FILENAME", "HubError", "HubRef", "download_tokens", "parse_hub_ref", "resolve_tokens"]
