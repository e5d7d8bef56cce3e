"""Signed binary codes <-> integer tokens.

A latent position holds C signed bits (+1 / -1). Groups of ``g`` consecutive
channels are packed into one integer token in ``[0, 2**g)``, the first channel
of the group being the most significant bit and ``+1`` meaning bit value 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_group(channels: int, group: int) -> None:
  if group < 1 or group > 24:
    raise ValueError(f"group must be in 1..24, got {group}")
  if channels % group:
    raise ValueError(
        f"the bit count per position ({channels}) must be divisible by the "
        f"group size g={group}")


def pack(bits: jax.Array | np.ndarray, group: int, *, xp=jnp
         ) -> jax.Array | np.ndarray:
  """Packs signed bits into tokens.

  Args:
    bits: [..., C] with values > 0 meaning 1 and <= 0 meaning 0 (e.g. +-1).
    group: bits per token g; C must be divisible by g.
    xp: the array module, ``jax.numpy`` (default) or ``numpy`` (host data,
      no device transfer); both give the same values.

  Returns:
    [..., C // g] int32 tokens in [0, 2**g), an ``xp`` array.
  """
  channels = bits.shape[-1]
  _check_group(channels, group)
  b = (xp.asarray(bits) > 0).astype(xp.int32)
  b = b.reshape(*b.shape[:-1], channels // group, group)
  weights = 2 ** xp.arange(group - 1, -1, -1, dtype=xp.int32)  # MSB first
  return xp.sum(b * weights, axis=-1, dtype=xp.int32)


def unpack(tokens: jax.Array | np.ndarray, group: int, dtype=jnp.float32,
           *, axis: int | None = None, xp=jnp) -> jax.Array | np.ndarray:
  """Inverse of :func:`pack`: tokens -> signed bits (+-1), MSB first.

  Args:
    tokens: [..., T] integer tokens in [0, 2**g).
    group: bits per token g.
    dtype: dtype of the result.
    axis: None (default): [..., T] -> [..., T * g], each token's g bits
      in place of it. An int: the g bits of a token along a new axis at
      ``axis`` of the result (as ``expand_dims``), nothing flattened, e.g.
      [K, c] -> [K, g, c] for ``axis=1``, so that a reshape to [K * g, c]
      needs no transpose.
    xp: the array module, ``jax.numpy`` (default) or ``numpy``; both give
      the same values.
  """
  tokens = xp.asarray(tokens).astype(xp.int32)
  shifts = xp.arange(group - 1, -1, -1, dtype=xp.int32)
  if axis is None:
    b = (tokens[..., None] >> shifts) & 1  # [..., T, g]
    b = b.reshape(*tokens.shape[:-1], tokens.shape[-1] * group)
  else:
    tok = xp.expand_dims(tokens, axis)
    shape = [1] * tok.ndim
    shape[axis] = group
    b = (tok >> shifts.reshape(shape)) & 1  # bits along ``axis``
  return (2 * b - 1).astype(dtype)


def popcount(x: jax.Array) -> jax.Array:
  """Number of set bits of non-negative int32 values (elementwise)."""
  return jax.lax.population_count(x.astype(jnp.int32))


def hamming(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise Hamming distance between packed tokens."""
  return popcount(jnp.bitwise_xor(a.astype(jnp.int32), b.astype(jnp.int32)))


def pack_numpy(bits: np.ndarray, group: int) -> np.ndarray:
  """Numpy twin of :func:`pack` for host-side data (no device transfer)."""
  return pack(bits, group, xp=np)
