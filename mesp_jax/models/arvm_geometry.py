"""Geometry of the gamma-ARVM's token sequence: the mask, the window, the front.

Token ``i = (row * W + col) * Tp + k`` sits at grid position ``p(i) = i // Tp``
(raster-major, group-minor). Input slot 0 is the start slot; slot ``s >= 1``
holds token ``s - 1``; the query at slot ``i`` predicts token ``i``.

* :func:`slot_visible` / :func:`gamma_mask`: which slots a query may see
  (the start slot, and earlier tokens within Chebyshev distance gamma).
* :func:`window_slots`: how many token slots an exact decoding cache keeps.
* :func:`wavefront_schedule`: the exact parallel decoding order. In raster
  order the window of position ``(r, c)`` holds only positions whose
  wavefront index ``r * (gamma + 1) + c`` is smaller, so all positions with
  the same index are independent given the earlier ones and are drawn in one
  step (docs/method.md, 'Locality as speed').
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mesp_jax.base.gamma import parse_gamma


def slot_visible(query: Any, key: Any, width: int, tokens_per_pos: int,
                 gamma: int | None, xp: Any = np) -> Any:
  """Whether the query at slot ``query`` may attend to input slot ``key``.

  Works elementwise (with broadcasting) on numpy (``xp=np``) or jax
  (``xp=jnp``) integer arrays. ``key == 0`` is the start slot; ``key >= 1``
  holds token ``key - 1``; ``key < 0`` marks an empty cache entry (never
  visible).

  Args:
    query: slot index ``i`` of the query, which predicts token ``i``.
    key: input slot index.
    width: grid width ``W``.
    tokens_per_pos: ``Tp``.
    gamma: observation range, or None for the plain causal mask.
    xp: ``numpy`` or ``jax.numpy``.

  Returns:
    Boolean array of the broadcast shape.
  """
  causal = (key >= 1) & (key <= query)
  if gamma is not None:
    qpos = query // tokens_per_pos
    kpos = (key - 1) // tokens_per_pos
    drow = xp.abs(qpos // width - kpos // width)
    dcol = xp.abs(qpos % width - kpos % width)
    causal = causal & (xp.maximum(drow, dcol) <= gamma)
  return (key == 0) | causal


def gamma_mask(height: int, width: int, tokens_per_pos: int,
               gamma: int | str | None) -> np.ndarray:
  """The ``[T, T]`` boolean attention mask, ``T = height * width * Tp``.

  ``mask[i, s]`` is True iff the query at slot ``i`` (which predicts token
  ``i`` at grid position ``p(i) = divmod(i // Tp, width)``) may attend to input
  slot ``s``: ``s == 0`` (start slot) always; ``s >= 1`` (holding token
  ``j = s - 1``) iff ``j < i`` and ``max(|row(j) - row(i)|, |col(j) - col(i)|)
  <= gamma``. With ``gamma`` None / ``"global"`` this is the causal mask
  (``s <= i``). Every row has at least slot 0 visible.
  """
  gamma = parse_gamma(gamma)
  t = height * width * tokens_per_pos
  idx = np.arange(t)
  return slot_visible(idx[:, None], idx[None, :], width, tokens_per_pos,
                      gamma, xp=np)


def window_slots(width: int, tokens_per_pos: int, gamma: int | None,
                 seq_len: int) -> int:
  """Number of token slots a cache must keep for exact decoding.

  For finite ``gamma`` the query at slot ``i`` only sees slots in
  ``(i - (gamma*W + gamma + 1) * Tp, i]``, so a ring of
  ``(gamma * W + gamma + 1) * Tp`` token slots suffices; never more than the
  ``T - 1`` token slots that exist. Global gamma needs all ``T - 1``.
  """
  full = max(seq_len - 1, 1)
  if gamma is None:
    return full
  return min((gamma * width + gamma + 1) * tokens_per_pos, full)


def front_gamma(width: int, gamma: int | None) -> int:
  """The gamma the wavefront is built for: ``min(gamma, W - 1)``.

  For ``gamma >= W - 1`` (and global gamma) the front index
  ``r * W + c`` is the raster index, one position per step.
  """
  return width - 1 if gamma is None else min(int(gamma), width - 1)


def wavefront_index(height: int, width: int,
                    gamma: int | str | None) -> np.ndarray:
  """[H, W] int wavefront index ``r * (gamma' + 1) + c`` of every position
  (``gamma' =`` :func:`front_gamma`)."""
  g = front_gamma(width, parse_gamma(gamma))
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return rows * (g + 1) + cols


def wavefront_rows(width: int, gamma: int | str | None) -> int:
  """Most grid rows one front can touch: ``ceil(W / (gamma' + 1))``."""
  g = front_gamma(width, parse_gamma(gamma))
  return -(-width // (g + 1))


def wavefront_schedule(height: int, width: int, tokens_per_pos: int,
                       gamma: int | str | None) -> np.ndarray:
  """The tokens drawn at each wavefront step, [steps, n] int32 (-1 = none).

  Step ``f * Tp + k`` draws token ``k`` of every position on front ``f``,
  in increasing row order; ``steps = Tp * (W + (H - 1) * (gamma' + 1))`` and
  ``n = min(H,`` :func:`wavefront_rows` ``)``. Every token appears exactly
  once, and every token of its window appears at an earlier step.
  """
  front = wavefront_index(height, width, gamma).reshape(-1)  # [P]
  tp = tokens_per_pos
  num_fronts = int(front.max()) + 1
  lanes = min(height, wavefront_rows(width, gamma))
  out = np.full((num_fronts * tp, lanes), -1, np.int32)
  for f in range(num_fronts):
    positions = np.flatnonzero(front == f)  # raster order = row order
    for k in range(tp):
      out[f * tp + k, :len(positions)] = positions * tp + k
  return out


def wavefront_cache_rows(height: int, width: int,
                         gamma: int | str | None) -> int:
  """Grid rows a wavefront decoding cache keeps: ``min(H, n + gamma)``.

  The queries of one front lie in at most ``n =`` :func:`wavefront_rows`
  rows, ``a .. a + n - 1``, and read rows ``a - gamma .. a + n - 1`` (every
  row for global gamma). The tokens written before them (the previous
  front's) lie in rows ``a - 1 .. a + n - 1``, so in a ring of ``n + gamma``
  rows writing row ``r`` replaces row ``r - n - gamma <= a - 1 - gamma``,
  which no query of the front reads. The reach up is the true gamma's, not
  :func:`front_gamma`'s: for ``gamma >= W - 1`` the front is raster order
  but the window still reaches ``gamma`` rows up. Independent of the grid
  height for finite gamma.
  """
  gamma = parse_gamma(gamma)
  if gamma is None:
    return height
  return min(height, wavefront_rows(width, gamma) + gamma)
