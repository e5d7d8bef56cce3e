"""The kernel gamma-ARVM's host-side planner: order and context schedule.

:mod:`mesp_jax.sample.kernel` keeps the inner products ``IP_n`` of the
context's bits with every bank entry as state and updates it incrementally.
This module plans, once per generation order and in numpy, which tokens enter
and leave the context at each step (:func:`build_schedule`); the device
program only follows the plan. :func:`generation_order` gives the order of the
grid positions, :func:`context_masks` the context of every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from mesp_jax.base.gamma import parse_gamma

# Folded into ``rng`` to draw the random generation order. Token draws fold in
# the sample index (< 2^32 - 1), so the two never share a key.
ORDER_SALT = 0xFFFFFFFF

# Cost model for choosing the op width K (in bit-equivalents of matmul work):
# one op costs about ``K * g + OP_OVERHEAD_BITS`` (the overhead is reading and
# writing the [N, S] state once), measured on the development CPU.
OP_OVERHEAD_BITS = 85


def generation_order(height: int, width: int,
                     order: str | Sequence[int] | np.ndarray = "raster",
                     rng: jax.Array | None = None) -> np.ndarray:
  """The order in which grid positions are generated, [H * W] int.

  Args:
    height: grid height H.
    width: grid width W.
    order: 'raster', 'random' (a permutation drawn from
      ``fold_in(rng, ORDER_SALT)``) or an explicit permutation of
      ``range(H * W)`` (raster indices ``i * W + j``).
    rng: key for 'random'.
  """
  num_pos = height * width
  if isinstance(order, str):
    if order == "raster":
      return np.arange(num_pos)
    if order == "random":
      if rng is None:
        raise ValueError("order='random' needs an rng")
      perm = jax.random.permutation(jax.random.fold_in(rng, ORDER_SALT),
                                    num_pos)
      return np.asarray(perm).astype(np.int64)
    raise ValueError(f"order must be 'raster', 'random' or a permutation, "
                     f"got {order!r}")
  perm = np.asarray(order).astype(np.int64).reshape(-1)
  if sorted(perm.tolist()) != list(range(num_pos)):
    raise ValueError(f"order must be a permutation of range({num_pos})")
  return perm


def context_masks(height: int, width: int, tokens_per_position: int,
                  gamma: int | str | None, positions: np.ndarray):
  """Yields ``(t, mask)`` per generation step, in generation order.

  ``t`` is the sequence index (raster position-major, group-minor) of the
  token generated at that step and ``mask`` a [T] bool vector of the context
  tokens (already generated, grid position within Chebyshev distance gamma).
  """
  gamma = parse_gamma(gamma)
  tp = tokens_per_position
  num_pos = height * width
  rows = np.arange(num_pos) // width
  cols = np.arange(num_pos) % width
  rank = np.empty(num_pos, np.int64)
  rank[positions] = np.arange(num_pos)
  for p in positions:
    before = rank < rank[p]  # [P]
    if gamma is not None:
      cheb = np.maximum(np.abs(rows - rows[p]), np.abs(cols - cols[p]))
      before &= cheb <= gamma
    for k in range(tp):
      mask = np.repeat(before, tp)  # [T]
      mask[p * tp:p * tp + k] = True  # earlier groups of the same position
      yield p * tp + k, mask


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Host-computed list of state updates.

  Attributes:
    idx: [O, K] int32 token sequence indices added to (sign +1) or subtracted
      from (sign -1) the inner-product state; padding has sign 0.
    sign: [O, K] float32 in {-1, 0, +1}.
    reset: [O] bool: zero the state before applying this op.
    first: [steps] int32 first op of each generation step.
    count: [steps] int32 ops of each step (>= 1); the step's token is drawn
      after its last op.
    token: [steps] int32 sequence index of the token of each step.
  """
  idx: np.ndarray
  sign: np.ndarray
  reset: np.ndarray
  first: np.ndarray
  count: np.ndarray
  token: np.ndarray

  @property
  def width(self) -> int:
    return int(self.idx.shape[1])

  @property
  def num_ops(self) -> int:
    return int(self.idx.shape[0])


def build_schedule(height: int, width: int, tokens_per_position: int,
                   gamma: int | str | None, positions: np.ndarray, group: int,
                   max_tokens: int | None = None) -> Schedule:
  """Plans the incremental context updates for one generation order.

  For every step the cheaper of "update" (add entering, subtract leaving
  tokens) and "reset" (zero the state, add the whole context) is chosen; the
  op width K minimises ``num_ops * (K * g + OP_OVERHEAD_BITS)``.

  Args:
    height, width, tokens_per_position: the token grid.
    gamma: observation range (int, None or 'global').
    positions: [H * W] generation order of positions.
    group: bits per token g.
    max_tokens: keep only the first steps (benchmarks time a slice); K is
      still chosen for the whole generation.
  """
  tokens, resets, items = [], [], []  # per step: t, reset?, [(idx, sign)]
  prev = np.zeros(height * width * tokens_per_position, bool)
  for t, mask in context_masks(height, width, tokens_per_position, gamma,
                               positions):
    enter = np.flatnonzero(mask & ~prev)
    leave = np.flatnonzero(prev & ~mask)
    full = np.flatnonzero(mask)
    is_reset = len(full) < len(enter) + len(leave)
    if is_reset:
      item = np.stack([full, np.ones_like(full)], 1)
    else:
      item = np.concatenate([np.stack([enter, np.ones_like(enter)], 1),
                             np.stack([leave, -np.ones_like(leave)], 1)])
    tokens.append(t)
    resets.append(is_reset)
    items.append(item)  # [n, 2]
    prev = mask
  lengths = np.asarray([len(x) for x in items])
  widths = np.arange(1, max(int(lengths.max()), 1) + 1)
  ops_per_width = np.maximum(
      1, -(-lengths[None, :] // widths[:, None])).sum(1)  # [widths]
  width_k = int(widths[np.argmin(ops_per_width *
                                 (widths * group + OP_OVERHEAD_BITS))])
  idx, sign, reset, first, count = [], [], [], [], []
  for is_reset, item in zip(resets[:max_tokens], items[:max_tokens],
                             strict=True):
    n_ops = max(1, -(-len(item) // width_k))
    padded = np.zeros((n_ops * width_k, 2), np.int64)  # padding: sign 0
    padded[:len(item)] = item
    first.append(len(reset))
    count.append(n_ops)
    idx.append(padded[:, 0].reshape(n_ops, width_k))
    sign.append(padded[:, 1].reshape(n_ops, width_k))
    reset.extend([is_reset] + [False] * (n_ops - 1))
  token = tokens[:max_tokens]
  return Schedule(
      idx=np.concatenate(idx).astype(np.int32),
      sign=np.concatenate(sign).astype(np.float32),
      reset=np.asarray(reset, bool),
      first=np.asarray(first, np.int32),
      count=np.asarray(count, np.int32),
      token=np.asarray(token, np.int32))
