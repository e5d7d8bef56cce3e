"""Block-local attention for the gamma-ARVM's teacher-forced forward pass.

The full forward pass of :class:`mesp_jax.models.arvm.ARVM` attends every
query slot to the context slots under :func:`mesp_jax.models.arvm.gamma_mask`.
Done densely that is a ``[T, T]`` masked softmax, ``O(T^2)`` time and memory,
although for a finite ``gamma`` each row of the mask has at most
``1 + (2 * gamma + 1) * (gamma + 1) * Tp`` True entries. This module computes
the same attention from blocks (the blocking/wavefront idea of docs/method.md,
section 'Locality as speed'):

Sequence layout (as in :mod:`mesp_jax.models.arvm`): ``R = W * Tp`` slots per
grid row, ``T = H * R``; slot 0 is the start slot, slot ``s >= 1`` holds token
``s - 1``; the query at slot ``i`` predicts token ``i`` at grid position
``p(i) = divmod(i // Tp, W)`` and sees slot 0 plus the tokens ``j < i`` with
Chebyshev distance ``max(|drow|, |dcol|) <= gamma``.

* Query block = one grid row: the ``R`` query slots ``r * R .. r * R + R - 1``
  all predict tokens of row ``r``.
* Key blocks = token rows. Tokens ``0 .. T - 2`` are the keys/values of slots
  ``1 .. T - 1`` (the slot/token shift); token ``T - 1`` is never an input, so
  its entry is zero padding (always masked, as ``j < i <= T - 1``). Because
  ``j < i``, the window of a query in row ``r`` lies in token rows
  ``r - n + 1 .. r`` with ``n = min(gamma, H - 1) + 1`` (rows more than
  ``H - 1`` above do not exist). The token rows are padded with ``n - 1`` zero
  rows at the top and each query row gets the ``n`` consecutive key rows
  ending at its own: ``n * R`` window keys.
* The start slot is always visible; it is one extra key column in front of the
  window keys, so the softmax runs over the union ``{start} + window``.
* Masks: within a block, visibility depends only on the in-row offsets (query
  ``a``, key row offset ``g`` and in-row key ``c``): causal within the query's
  own row (``c < a`` when ``g = n - 1``; earlier rows are all before the query)
  and ``|c // Tp - a // Tp| <= gamma``; the row distance ``n - 1 - g`` is at
  most ``gamma`` by construction. So one static ``[R, 1 + n * R]`` mask
  (:func:`in_block_mask`) serves every row, and a ``[H, 1 + n * R]`` row
  validity mask (:func:`row_valid_mask`) removes the padded rows above the
  top of the grid.

Masked logits get ``jnp.finfo(jnp.float32).min`` and the softmax is float32,
as in the dense path, so the result equals the dense masked attention up to
float round-off (summation order). Cost ``O(T * (1 + n * W * Tp))`` logits
instead of ``O(T^2)``; it pays when ``(gamma + 1) * W * Tp + 1 < T``
(:func:`resolve_attention`).

The incremental decode path (``ARVM.decode`` with its KV cache) does not use
this module.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_CHOICES = ("dense", "block_local", "auto")


@dataclasses.dataclass(frozen=True)
class LocalWindow:
  """The gamma window's geometry, passed to ``Attention`` instead of a mask.

  Attributes:
    height: grid height H.
    width: grid width W.
    tokens_per_pos: Tp.
    gamma: finite observation range (>= 0).
  """

  height: int
  width: int
  tokens_per_pos: int
  gamma: int


def window_rows(height: int, gamma: int) -> int:
  """Key rows per query row, ``n = min(gamma, height - 1) + 1``."""
  return min(gamma, height - 1) + 1


def block_local_cheaper(height: int, width: int, tokens_per_pos: int,
                        gamma: int | None) -> bool:
  """Whether ``(gamma + 1) * W * Tp + 1`` keys per query are fewer than ``T``.

  Always False for global gamma (None).
  """
  if gamma is None:
    return False
  row = width * tokens_per_pos
  return (gamma + 1) * row + 1 < height * row


def resolve_attention(attention: str, height: int, width: int,
                      tokens_per_pos: int, gamma: int | None) -> str:
  """``'dense'`` or ``'block_local'`` for an ``attention`` choice.

  ``'auto'`` is block-local when :func:`block_local_cheaper`; global gamma is
  always dense (there is no window to block).

  Raises:
    ValueError: unknown ``attention``.
  """
  if attention not in ATTENTION_CHOICES:
    raise ValueError(
        f"attention={attention!r} must be one of {list(ATTENTION_CHOICES)}")
  if gamma is None or attention == "dense":
    return "dense"
  if attention == "block_local":
    return "block_local"
  if block_local_cheaper(height, width, tokens_per_pos, gamma):
    return "block_local"
  return "dense"


def in_block_mask(width: int, tokens_per_pos: int, gamma: int,
                  rows: int) -> np.ndarray:
  """Static ``[R, 1 + rows * R]`` boolean mask shared by every query row.

  ``mask[a, 0]`` is the start slot (True). ``mask[a, 1 + g * R + c]``: query
  at in-row offset ``a`` (slot ``r * R + a``) and the token at in-row offset
  ``c`` of token row ``r - rows + 1 + g``; True iff that token precedes the
  query and lies within ``gamma`` columns. ``R = width * tokens_per_pos``.
  """
  tp = tokens_per_pos
  r_len = width * tp
  a = np.arange(r_len)[:, None, None]  # [R, 1, 1]
  g = np.arange(rows)[None, :, None]  # [1, n, 1]
  c = np.arange(r_len)[None, None, :]  # [1, 1, R]
  before = (g < rows - 1) | (c < a)
  near = np.abs(c // tp - a // tp) <= gamma
  window = (before & near).reshape(r_len, rows * r_len)  # [R, n * R]
  return np.concatenate([np.ones((r_len, 1), bool), window], axis=1)


def row_valid_mask(height: int, width: int, tokens_per_pos: int,
                   rows: int) -> np.ndarray:
  """``[H, 1 + rows * R]`` boolean: False for keys of padded rows (``< 0``)."""
  r_len = width * tokens_per_pos
  key_row = np.arange(height)[:, None] - (rows - 1) + np.arange(rows)[None]
  valid = np.repeat(key_row >= 0, r_len, axis=1)  # [H, n * R]
  return np.concatenate([np.ones((height, 1), bool), valid], axis=1)


def _row_windows(x: jax.Array, height: int, r_len: int,
                 rows: int) -> jax.Array:
  """Start slot + window keys (or values) of every query row.

  Args:
    x: [B, h, T, hd] slot-major keys or values (slot 0 = start slot).
    height: H.
    r_len: slots per row R.
    rows: key rows per query row n.

  Returns:
    [B, h, H, 1 + n * R, hd]; entry ``1 + g * R + c`` of row ``r`` is token
    ``(r - n + 1 + g) * R + c`` (zeros above the grid and for token T - 1).
  """
  b, nh, _, hd = x.shape
  # Token j sits at slot j + 1; token T - 1 is never an input: pad it.
  tok = jnp.pad(x[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0)))  # [B, h, T, hd]
  tok = tok.reshape(b, nh, height, r_len, hd)
  tok = jnp.pad(tok, ((0, 0), (0, 0), (rows - 1, 0), (0, 0), (0, 0)))
  # [B, h, H + n - 1, R, hd] -> n shifted views of H rows each.
  window = jnp.concatenate([tok[:, :, g:g + height] for g in range(rows)],
                           axis=3)  # [B, h, H, n * R, hd]
  start = jnp.broadcast_to(x[:, :, None, :1], (b, nh, height, 1, hd))
  return jnp.concatenate([start, window], axis=3)  # [B, h, H, 1 + n * R, hd]


def block_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          height: int, width: int, tokens_per_pos: int,
                          gamma: int) -> jax.Array:
  """Masked softmax attention under the gamma mask, computed per grid row.

  Equals ``softmax(where(gamma_mask, q k^T / sqrt(hd), min)) v`` of the dense
  path (see the module docstring for the blocking) up to float round-off.

  Args:
    q: [B, T, h, hd] queries of slots ``0 .. T - 1``.
    k: [B, h, T, hd] keys of slots ``0 .. T - 1`` (slot 0 = start slot).
    v: [B, h, T, hd] values, same layout.
    height: grid height H.
    width: grid width W.
    tokens_per_pos: Tp (``T = H * W * Tp``).
    gamma: finite observation range (>= 0).

  Returns:
    [B, T, h, hd] attention output in ``v``'s dtype.
  """
  b, t, nh, hd = q.shape
  r_len = width * tokens_per_pos
  if t != height * r_len:
    raise ValueError(
        f"{t} query slots do not fill a {height}x{width}x{tokens_per_pos} grid")
  if k.shape != (b, nh, t, hd) or v.shape != k.shape:
    raise ValueError(f"keys {k.shape} / values {v.shape} must be "
                     f"{(b, nh, t, hd)}")
  if gamma is None or gamma < 0:
    raise ValueError(f"gamma={gamma!r} must be a finite int >= 0")
  rows = window_rows(height, gamma)
  mask = jnp.asarray(in_block_mask(width, tokens_per_pos, gamma, rows))[None] & (
      jnp.asarray(row_valid_mask(height, width, tokens_per_pos, rows))[:, None]
  )  # [H, R, 1 + n * R]
  q_rows = q.reshape(b, height, r_len, nh, hd)  # [B, H, R, h, hd]
  k_win = _row_windows(k, height, r_len, rows)  # [B, h, H, 1 + n * R, hd]
  v_win = _row_windows(v, height, r_len, rows)
  logits = jnp.einsum("brahd,bhrkd->bhrak", q_rows, k_win)
  logits = logits.astype(jnp.float32) / math.sqrt(hd)  # [B, h, H, R, 1 + nR]
  logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhrak,bhrkd->brahd", weights, v_win)  # [B, H, R, h, hd]
  return out.reshape(b, t, nh, hd)  # [B, T, h, hd]
