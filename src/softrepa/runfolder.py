"""The output-folder contract shared by generation, editing and evaluation: one copy of each rule.

An output folder holds images written atomically (temporary file + rename) and a `metadata.jsonl`
with one row per finished image, appended and fsynced only *after* its image, so a killed run
leaves either a finished image with its row, or nothing that counts. A re-run reads the rows whose
image exists (`finished_rows`), refuses a folder made with other settings (the key is named), and
does the rest. `tokens_record` names the tokens in effect by their file and sha256, so that two
runs with different tokens never mix in one folder.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, UnidentifiedImageError

from .checks import image_size_ok, upright_8bit
from .errors import DatasetError, RunFolderError, StorageError
from .hooks import attached_handle

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file + rename, so readers never see half a file.

    Raises:
        StorageError: the write failed (disk full, I/O error, permissions); the message names the
            path and, for a full disk, the bytes needed; the temporary file is removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise StorageError(write_error_message(path, e, len(data))) from e
        raise


def write_error_message(path: str | os.PathLike, error: OSError, size: int | None = None) -> str:
    """One line for a failed write: the path, "disk full" (with the bytes needed and free) or the OS's reason."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(Path(path).parent if Path(path).parent.exists() else ".").free
            room = f"; {free} bytes free there"
        except OSError:
            room = ""
        need = f" (needs {size} bytes{room})" if size is not None else ""
        what = "disk full" if error.errno == errno.ENOSPC else "disk quota exceeded"
        return f"cannot write {path}: {what}{need}"
    return f"cannot write {path}: {error.strerror or error}"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (the tokens artefact recorded in the metadata)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_rows(path: Path) -> list[dict]:
    """Rows of a metadata.jsonl; an unreadable (half-written) line is dropped with a warning."""
    rows = []
    if path.is_file():
        for n, raw in enumerate(path.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError):  # not UTF-8 / not JSON: treated as a line cut by a kill
                row = None
            if isinstance(row, dict) and isinstance(row.get("file"), str):
                rows.append(row)
            else:
                log.warning("%s:%d: dropping an unreadable metadata line (interrupted write?)", path, n)
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line and fsync it (written only after the image it describes).

    Raises:
        StorageError: the append failed (a cut line is dropped by the next `read_rows`).
    """
    line = json.dumps(row, allow_nan=False) + "\n"  # NaN is not JSON: a row never holds one
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise StorageError(write_error_message(path, e, len(line))) from e


def finished_rows(out_dir: Path, settings: dict[str, Any], keys: Iterable[str]) -> dict[str, dict]:
    """Rows of `out_dir/metadata.jsonl` whose image exists, keyed by file name.

    Rows whose image is gone (or unreadable lines) are dropped from the file, atomically, so
    that redoing them does not duplicate rows.

    Raises:
        RunFolderError: the folder holds results made with other settings (the key is named).
    """
    meta = Path(out_dir) / METADATA
    rows = read_rows(meta)
    keep = {}
    for row in rows:
        for k in keys:
            if k in settings and row.get(k) != settings[k]:
                raise RunFolderError(f"{out_dir}: holds results made with {k}={row.get(k)!r}, this run uses "
                                 f"{k}={settings[k]!r}; choose another output folder or the same settings")
        if complete_image(Path(out_dir) / row["file"]):  # a truncated image is redone, not kept
            keep[row["file"]] = row
    if meta.is_file() and len(keep) != len(meta.read_bytes().strip().splitlines()):
        text = "".join(json.dumps(r) + "\n" for r in keep.values())
        atomic_write_bytes(meta, text.encode())
    return keep


def complete_image(path: Path) -> bool:
    """The file exists and decodes to its end (a PNG cut by a crash or a copy fails its checks)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() misses a cut last IDAT chunk; decoding does not
            im.load()
        return True
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
        log.warning("%s: damaged image (%s: %s); it is made again", path, type(e).__name__, e)
        return False


def png_bytes(image: Any) -> bytes:
    """PNG encoding of a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def tokens_record(pipe: Any, tokens: str | os.PathLike | None) -> dict[str, Any]:
    """The "tokens" / "tokens_sha256" metadata of the tokens currently in effect on `pipe`."""
    handle = attached_handle(pipe)
    if handle is None or not handle.enabled:
        return {"tokens": None, "tokens_sha256": None}
    if tokens is not None:  # a Hub reference (softrepa.hub) is hashed as the cached file it names
        from .hub import resolve_tokens

        return {"tokens": str(tokens), "tokens_sha256": file_sha256(resolve_tokens(tokens))}
    h = hashlib.sha256()  # in-memory tokens: hash their values so runs stay distinguishable
    for p in handle.tokens.state_dict().values():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return {"tokens": "<in-memory>", "tokens_sha256": h.hexdigest()}

def open_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image from a file (transparency composited on white, not dropped to black).

    Args:
        path: image file.
    Raises:
        FileNotFoundError: no such file; DatasetError (a ValueError): a file PIL cannot read as an image (named).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            image_size_ok(im, path)  # before decoding: a bomb never allocates
            im.load()
            im = upright_8bit(im)  # EXIF orientation, 16-bit grayscale scaled (not clipped to white)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: not a readable image file ({type(e).__name__}: {e})") from e


__all__ = ["METADATA", "append_row", "atomic_write_bytes", "write_error_message", "file_sha256", "finished_rows", "open_image", "png_bytes",
           "read_rows", "tokens_record"]
