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


def pack(bits: jax.Array | np.ndarray, group: int) -> jax.Array:
  """Packs signed bits into tokens.

  Args:
    bits: [..., C] with values > 0 meaning 1 and <= 0 meaning 0 (e.g. +-1).
    group: bits per token g; C must be divisible by g.

  Returns:
    [..., C // g] int32 tokens in [0, 2**g).
  """
  channels = bits.shape[-1]
  _check_group(channels, group)
  b = (jnp.asarray(bits) > 0).astype(jnp.int32)
  b = b.reshape(*b.shape[:-1], channels // group, group)
  weights = 2 ** jnp.arange(group - 1, -1, -1, dtype=jnp.int32)  # MSB first
  return jnp.sum(b * weights, axis=-1)


def unpack(tokens: jax.Array | np.ndarray, group: int,
           dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`pack`: [..., T] tokens -> [..., T * g] signed bits (+-1)."""
  tokens = jnp.asarray(tokens).astype(jnp.int32)
  shifts = jnp.arange(group - 1, -1, -1, dtype=jnp.int32)
  b = (tokens[..., None] >> shifts) & 1  # [..., T, g]
  b = b.reshape(*tokens.shape[:-1], tokens.shape[-1] * group)
  return (2 * b - 1).astype(dtype)


def popcount(x: jax.Array) -> jax.Array:
  """Number of set bits of non-negative int32 values (elementwise)."""
  return jax.lax.population_count(x.astype(jnp.int32))


def hamming(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise Hamming distance between packed tokens."""
  return popcount(jnp.bitwise_xor(a.astype(jnp.int32), b.astype(jnp.int32)))


def pack_numpy(bits: np.ndarray, group: int) -> np.ndarray:
  """Numpy twin of :func:`pack` for host-side data (no device transfer)."""
  channels = bits.shape[-1]
  _check_group(channels, group)
  b = (np.asarray(bits) > 0).astype(np.int64)
  b = b.reshape(*b.shape[:-1], channels // group, group)
  weights = 2 ** np.arange(group - 1, -1, -1, dtype=np.int64)
  return (b * weights).sum(-1).astype(np.int32)
