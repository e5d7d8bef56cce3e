"""Files: atomic writes from process 0 only, image grids, JSON."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

from mesp_jax.base.image import to_uint8


def is_writer() -> bool:
  """Only process 0 writes files shared by all processes."""
  return jax.process_index() == 0


def sha256_of_file(path: str) -> str:
  """The SHA-256 hex digest of a file, read in 4 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file and ``os.replace``.

  A crash mid-write leaves the old file (or none), never a truncated one.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                             suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  if is_writer():
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable)
                              + "\n").encode())


def _jsonable(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def json_safe(x):
  """Replaces non-finite floats (e.g. the PSNR of an exact copy) by 'inf',
  '-inf' or 'nan' strings, recursively, so the JSON stays standard."""
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, (float, np.floating)) and not np.isfinite(x):
    return str(float(x))
  return x


def save_npz(path: str, **arrays) -> None:
  """Atomic ``np.savez`` from process 0."""
  if is_writer():
    save_npz_shard(path, **arrays)


def save_npz_shard(path: str, **arrays) -> None:
  """Atomic ``np.savez`` from whichever process calls it (its own shard)."""
  import io as _io
  buf = _io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  atomic_write_bytes(path, buf.getvalue())


def make_grid(images: np.ndarray, ncol: int | None = None,
              pad: int = 2, scale: int = 1) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 grid image [H', W', 3]."""
  images = to_uint8(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  nrow = int(np.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255,
                 np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  if scale > 1:
    grid = np.kron(grid, np.ones((scale, scale, 1), np.uint8))
  return grid


def save_png(path: str, image_uint8: np.ndarray) -> None:
  """Atomic PNG write from process 0."""
  if not is_writer():
    return
  import io as _io

  from PIL import Image
  buf = _io.BytesIO()
  Image.fromarray(image_uint8).save(buf, format="PNG")
  atomic_write_bytes(path, buf.getvalue())


def save_grid(path: str, images: np.ndarray, ncol: int | None = None,
              scale: int = 2) -> None:
  """[N, H, W, C] in [-1, 1] -> PNG grid."""
  save_png(path, make_grid(images, ncol=ncol, scale=scale))
