"""Files: atomic writes from process 0 only, image grids, JSON, and paths
that may be object-store URIs.

A path is a local (or mounted) path or a URI such as ``gs://bucket/run``.
The helpers below take either: local paths go through ``os`` as always,
URIs through ``etils.epath`` (which uses fsspec, for ``gs://`` the
``gcsfs`` package). Objects are written whole (an object store has no
append and no rename of folders), so a write is atomic there too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from mesp_jax.base.image import to_uint8


def is_writer() -> bool:
  """Only process 0 writes files shared by all processes."""
  return jax.process_index() == 0


# ---------------------------------------------------------------------------
# Paths: local or URI.
# ---------------------------------------------------------------------------
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path) -> bool:
  """Whether ``path`` is a URI (``scheme://...``) rather than a local path."""
  return bool(_URI.match(str(path)))


def _epath(path):
  from etils import epath
  return epath.Path(str(path))


def abspath(path: str) -> str:
  """``os.path.abspath`` for local paths; URIs unchanged."""
  return str(path) if is_uri(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_uri(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_uri(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _epath(path).is_file() if is_uri(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
  if is_uri(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names in a folder ([] when it does not exist)."""
  if is_uri(path):
    p = _epath(path)
    return sorted(c.name for c in p.iterdir()) if p.exists() else []
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def open_file(path: str, mode: str = "r"):
  return _epath(path).open(mode) if is_uri(path) else open(path, mode)


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode()


def remove(path: str) -> None:
  if is_uri(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def move(src: str, dst: str) -> None:
  """Moves a file or a folder (on an object store: copies, then deletes)."""
  if is_uri(src) or is_uri(dst):
    # Object by object (a bucket's "folders" are name prefixes, which
    # epath's rename does not accept as targets).
    pairs = ([(os.path.join(src, r), os.path.join(dst, r))
              for r in walk_files(src)] if isdir(src) else [(src, dst)])
    for a, b in pairs:
      atomic_write_bytes(b, read_bytes(a))
    for a, _ in pairs:
      remove(a)
    return
  shutil.move(src, dst)


def walk_files(folder: str) -> list[str]:
  """Every file below ``folder``, as sorted paths relative to it."""
  if is_uri(folder):
    out, todo = [], [(_epath(folder), "")]
    while todo:  # one listing per folder (epath has no recursive glob here)
      here, prefix = todo.pop()
      for child in here.iterdir():
        rel = prefix + child.name
        if child.is_dir():
          todo.append((child, rel + "/"))
        else:
          out.append(rel)
    return sorted(out)
  out = []
  for root, _, files in os.walk(folder):
    out += [os.path.relpath(os.path.join(root, f), folder) for f in files]
  return sorted(out)


def file_size(path: str) -> int:
  return _epath(path).stat().length if is_uri(path) else os.path.getsize(path)


def append_text(path: str, text: str) -> None:
  """Appends to a file; an object is rewritten whole (no append there)."""
  if is_uri(path):
    old = read_bytes(path) if exists(path) else b""
    atomic_write_bytes(path, old + text.encode())
    return
  with open(path, "a") as f:
    f.write(text)


def sha256_of_file(path: str) -> str:
  """The SHA-256 hex digest of a file, read in 4 MiB blocks."""
  digest = hashlib.sha256()
  with open_file(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file and ``os.replace``.

  A crash mid-write leaves the old file (or none), never a truncated one.
  A URI's object is written in one request, which is atomic by itself.
  """
  if is_uri(path):
    makedirs(os.path.dirname(path))
    _epath(path).write_bytes(data)
    return
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
