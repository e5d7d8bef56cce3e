"""Decoding and cropping images on the host (numpy + PIL), for the pipeline.

* :func:`train_crop`: Inception-style random-resized crop (area share in
  ``[min_scale, 1]``, log-uniform aspect ratio in ``ratio``, ten tries, then
  the centre crop with the ratio clamped, as torchvision's
  ``RandomResizedCrop``), resized to ``size x size``, then a horizontal flip
  with probability 1/2.
* :func:`eval_crop`: resize so the shorter side is ``size``, centre crop.

Input is encoded bytes (JPEG, PNG, any format PIL reads) or a decoded uint8
array ``[H, W]`` / ``[H, W, C]``. For JPEGs ``Image.draft`` first asks the
decoder for a 1/2, 1/4 or 1/8 scale (done in the DCT domain, far cheaper than
a full decode), the smallest that keeps the region that is used at least
``size`` pixels a side. Output: uint8 ``[size, size, channels]``, channels 3
(grey and CMYK become RGB) or 1. All functions are module-level, so they
pickle into grain's worker processes.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

MODES = {1: "L", 3: "RGB"}
Box = tuple[float, float, float, float]  # (left, top, right, bottom)


def _open(data) -> Image.Image:
  """A lazily decoded PIL image of bytes, or an image of a uint8 array."""
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or not (
        data.ndim == 2 or (data.ndim == 3 and data.shape[-1] in (1, 3, 4))):
      raise ValueError(f"expected a uint8 array [H, W] or [H, W, 1|3|4], got "
                       f"{data.dtype} {data.shape}")
    return Image.fromarray(data[..., 0] if data.ndim == 3 and
                           data.shape[-1] == 1 else data)
  data = bytes(data)
  try:
    return Image.open(io.BytesIO(data))  # reads the header only
  except Image.UnidentifiedImageError:
    raise ValueError(f"not a readable image: unknown format ({len(data)} "
                     f"bytes starting {data[:8]!r})") from None
  except Exception as e:
    raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from e


def _decode(image: Image.Image, channels: int,
            reduce_by: float) -> tuple[Image.Image, float]:
  """Decodes ``image`` into mode L or RGB; a JPEG at 1/2, 1/4 or 1/8 scale
  when ``reduce_by`` (the largest reduction allowed) permits. Returns the
  image and its scale relative to the original (1, 1/2, 1/4 or 1/8)."""
  if channels not in MODES:
    raise ValueError(f"channels={channels}; choose 1 or 3")
  scale = 1.0
  if image.format == "JPEG":
    w, h = image.size
    # draft picks the largest reduction s with size // s >= requested; the
    # request (ceil(w / r), ceil(h / r)) gives s <= r. Mode L for a colour
    # JPEG also skips the chroma decode.
    request = ((math.ceil(w / reduce_by), math.ceil(h / reduce_by))
               if reduce_by >= 2 else None)
    drafted = image.draft(MODES[channels], request)
    if drafted is not None:
      scale = drafted[1][2] / w  # the exact 1/s (image.size is rounded up)
  try:
    return image.convert(MODES[channels]), scale  # decodes
  except Exception as e:  # truncated or corrupt data, unknown modes
    raise ValueError(f"cannot decode the image ({type(e).__name__}: {e})"
                     ) from e


def _array(image: Image.Image) -> np.ndarray:
  array = np.asarray(image, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def image_size(data) -> tuple[int, int]:
  """(height, width) of encoded bytes (from the header only) or an array."""
  if isinstance(data, np.ndarray):
    return int(data.shape[0]), int(data.shape[1])
  w, h = _open(data).size
  return h, w


def eval_crop(data, size: int, *, channels: int = 3) -> np.ndarray:
  """Resize so the shorter side is ``size`` (aspect kept), then the centre
  ``size x size`` crop; uint8 ``[size, size, channels]``."""
  image = _open(data)
  w, h = image.size
  ratio = size / min(w, h)
  nw, nh = max(size, round(w * ratio)), max(size, round(h * ratio))
  image, scale = _decode(image, channels, 1 / ratio)
  out = image.resize((nw, nh), Image.BICUBIC, box=(0, 0, w * scale, h * scale))
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.ascontiguousarray(_array(out)[top:top + size, left:left + size])


def crop_box(h: int, w: int, rng: np.random.Generator, min_scale: float = 0.08,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
  """An Inception-style random crop (left, top, right, bottom) of an
  ``h x w`` image, in integer pixels."""
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(min_scale, 1.0)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return left, top, left + cw, top + ch
  aspect = w / h  # fallback: the centre crop, its ratio clamped to `ratio`
  if aspect < min(ratio):
    cw, ch = w, max(1, int(round(w / min(ratio))))
  elif aspect > max(ratio):
    cw, ch = max(1, int(round(h * max(ratio)))), h
  else:
    cw, ch = w, h
  top, left = (h - ch) // 2, (w - cw) // 2
  return left, top, left + cw, top + ch


def train_crop(data, size: int, rng: np.random.Generator, *,
               min_scale: float = 0.08,
               ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
               channels: int = 3) -> np.ndarray:
  """Random-resized crop (:func:`crop_box`) to ``size x size``, then a
  horizontal flip with probability 1/2 when ``flip``; uint8
  ``[size, size, channels]``, all randomness from ``rng``."""
  image = _open(data)
  w, h = image.size
  box = crop_box(h, w, rng, min_scale, ratio)
  left, top, right, bottom = box
  image, scale = _decode(image, channels, min(right - left, bottom - top) / size)
  out = _array(image.resize((size, size), Image.BICUBIC,
                            box=tuple(v * scale for v in box)))
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)
