"""Image conventions: float images in [-1, 1], uint8 in 0..255, and PSNR."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_float_images(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, C] in 0..255 -> float32 in [-1, 1]."""
  return np.asarray(images_uint8).astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[..., H, W, C] in [-1, 1] -> uint8 in [0, 255]."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def psnr(a, b):
  """Per-image PSNR in dB on the 0..255 scale of images in [-1, 1].

  Both inputs are clipped to [-1, 1]; ``10 log10(255^2 / mse_255)`` equals
  ``10 log10(4 / mse)`` on the [-1, 1] scale.

  * numpy inputs (host metrics, copy rates): float64, ``+inf`` where the
    images are identical (an exact copy).
  * jax inputs (inside jitted eval steps): float32, the mse floored at 1e-10
    (at most 106 dB), so a mean over a batch stays finite.

  Args:
    a, b: [B, ...] images of the same shape.

  Returns:
    [B] PSNR values.
  """
  if isinstance(a, jax.Array) or isinstance(b, jax.Array):
    a = jnp.clip(a, -1.0, 1.0)
    b = jnp.clip(b, -1.0, 1.0)
    mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))
  a = np.clip(np.asarray(a, np.float64), -1.0, 1.0)
  b = np.clip(np.asarray(b, np.float64), -1.0, 1.0)
  if a.shape != b.shape:
    raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
  mse = np.mean(np.square(a - b).reshape(a.shape[0], -1), axis=1)
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(4.0 / mse)
