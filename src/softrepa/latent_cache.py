"""On-disk cache of VAE latents, one fp16 safetensors file per image.

The soft tokens train against a frozen VAE, so an image's latent never changes for a given
(VAE, resolution, preprocessing): encoding it once and reading it back each epoch removes the
VAE encoder from the training step.

Size: each entry stores C*h*w fp16 values, i.e. C*h*w*2 bytes (+ ~100 bytes of safetensors
header), h = w = resolution / 8:

    SD3 / SD3.5 at 512 px: 16*64*64*2 = 131,072 bytes = 128 KiB per image  (COCO train 118k: ~15 GiB)
    SD1.5 at 512 px:        4*64*64*2 =  32,768 bytes =  32 KiB per image  (COCO train 118k: ~3.6 GiB)
    SDXL at 1024 px:       4*128*128*2 = 131,072 bytes = 128 KiB per image

Layout: `<dir>/cache.json` ({"shape": [C, h, w], "dtype": "float16", "meta": {...}}) and
`<dir>/<sha1(key)[:2]>/<sha1(key)>.safetensors` holding tensor "latent" with the key in the
header metadata. Files are written to a temporary name and renamed (`os.replace`), so a reader
— another DataLoader worker or rank, or a resumed run after a crash — never sees half a file.
The shape is fixed per cache: a latent of another shape (another VAE or resolution) is rejected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import LatentCacheError

logger = logging.getLogger("softrepa.data")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + os.replace (atomic on POSIX and Windows).

    No fsync: a cache entry can always be recomputed, and a damaged entry reads as a miss.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class LatentCache:
    """Per-image fp16 latents on disk, keyed by a string (e.g. `Record.key`).

    Args:
        directory: cache folder (created if needed).
        shape: expected latent shape (C, h, w). None: taken from an existing `cache.json`, or
            fixed by the first `put`.
        meta: optional JSON-able description (e.g. {"vae": "...", "size": 512}); must equal the
            stored one when the cache already exists, so latents of another VAE are not reused.
    """

    DTYPE = torch.float16

    def __init__(self, directory: str | os.PathLike, shape: Sequence[int] | None = None, meta: Mapping[str, Any] | None = None):
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._info_path = self.directory / "cache.json"
        self.meta = dict(meta) if meta is not None else None
        self.shape: tuple[int, ...] | None = tuple(int(s) for s in shape) if shape is not None else None
        if self._info_path.exists():
            info = json.loads(self._info_path.read_text())
            stored = tuple(info["shape"]) if info.get("shape") is not None else None
            if self.shape is not None and stored is not None and stored != self.shape:
                raise LatentCacheError(
                    f"latent cache {str(self.directory)!r} holds shape {stored}, expected {self.shape}"
                )
            if self.meta is not None and info.get("meta") is not None and info["meta"] != self.meta:
                raise LatentCacheError(
                    f"latent cache {str(self.directory)!r} was built for {info['meta']}, not {self.meta}"
                )
            self.shape = self.shape or stored
            self.meta = self.meta if self.meta is not None else info.get("meta")
        elif self.shape is not None:
            self._write_info()

    @staticmethod
    def bytes_per_item(shape: Sequence[int]) -> int:
        """Payload bytes of one cached latent: prod(shape) * 2 (fp16), header excluded."""
        return math.prod(int(s) for s in shape) * 2

    def _write_info(self) -> None:
        info = {"shape": list(self.shape) if self.shape else None, "dtype": "float16", "meta": self.meta}
        _atomic_write(self._info_path, json.dumps(info, indent=1).encode())

    def path_for(self, key: str) -> Path:
        """File of `key` (hashed: keys are arbitrary relative paths, hashes are safe file names)."""
        h = hashlib.sha1(key.encode("utf-8")).hexdigest()
        return self.directory / h[:2] / f"{h}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def _check_shape(self, shape: Sequence[int], key: str, where: str) -> None:
        if self.shape is not None and tuple(shape) != self.shape:
            raise LatentCacheError(
                f"latent for {key!r} {where} has shape {tuple(shape)}, the cache "
                f"{str(self.directory)!r} expects {self.shape}"
            )

    def put(self, key: str, latent: torch.Tensor) -> None:
        """Store `latent` (C, h, w) for `key` as fp16, atomically.

        Args:
            key: image key.
            latent: (C, h, w) tensor, any float dtype / device.
        """
        latent = latent.detach()
        self._check_shape(latent.shape, key, "to store")
        value = latent.to(device="cpu", dtype=self.DTYPE).contiguous()  # (C, h, w) fp16
        if not torch.isfinite(value).all():
            raise LatentCacheError(f"latent for {key!r} is not finite in fp16 (overflow or NaN)")
        if self.shape is None:  # the first latent fixes the cache's shape
            self.shape = tuple(value.shape)
            self._write_info()
        _atomic_write(self.path_for(key), st_save({"latent": value}, metadata={"key": key}))

    def get(self, key: str) -> torch.Tensor | None:
        """The cached fp16 latent of `key`, or None when absent or unreadable.

        Args:
            key: image key.

        Raises:
            LatentCacheError: the stored latent's shape differs from the cache's shape.
        """
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            latent = st_load(data)["latent"]
        except Exception as e:  # noqa: BLE001 - a damaged entry is a miss: recompute, never crash
            logger.warning("latent cache entry %s for %r is unreadable (%s); treating as a miss", path, key, e)
            return None
        self._check_shape(latent.shape, key, f"in {path}")
        return latent

    def __repr__(self) -> str:
        return f"LatentCache({str(self.directory)!r}, shape={self.shape})"
