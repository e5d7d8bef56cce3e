"""The kernel gamma-ARVM's host-side planner: order and context schedule.

:mod:`mesp_jax.sample.kernel` keeps the inner products ``IP_n`` of the
context's bits with every bank entry as state and updates it incrementally.
This module plans, once per generation order and in numpy, which tokens enter
and leave the context at each step (:func:`build_schedule`); the device
program only follows the plan. :func:`generation_order` gives the order of the
grid positions, :func:`context_masks` the context of every step.

Wavefront order (:func:`build_wavefront_schedule`) draws the same tokens with
the same contexts as raster order, but all positions of one wavefront index
``r (gamma + 1) + c`` in one step, each row on its own lane (state);
:func:`plan_schedule` picks the planner for an order.
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


def transition(prev: np.ndarray, mask: np.ndarray) -> tuple[bool, np.ndarray]:
  """The cheaper way from context ``prev`` to context ``mask`` ([T] bool).

  Returns ``(reset, item)``: ``item`` [n, 2] holds (token index, sign) rows,
  either the whole new context after a reset or the entering (+1) and leaving
  (-1) tokens.
  """
  enter = np.flatnonzero(mask & ~prev)
  leave = np.flatnonzero(prev & ~mask)
  full = np.flatnonzero(mask)
  is_reset = len(full) < len(enter) + len(leave)
  if is_reset:
    return is_reset, np.stack([full, np.ones_like(full)], 1)
  return is_reset, np.concatenate([np.stack([enter, np.ones_like(enter)], 1),
                                   np.stack([leave, -np.ones_like(leave)], 1)])


def op_width(lengths: np.ndarray, group: int) -> int:
  """The op width K minimising ``num_ops * (K * g + OP_OVERHEAD_BITS)``.

  ``lengths`` [steps] are the (index, sign) rows each step applies; a step
  takes ``max(1, ceil(length / K))`` ops.
  """
  widths = np.arange(1, max(int(lengths.max()), 1) + 1)
  ops_per_width = np.maximum(
      1, -(-lengths[None, :] // widths[:, None])).sum(1)  # [widths]
  return int(widths[np.argmin(ops_per_width *
                              (widths * group + OP_OVERHEAD_BITS))])


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
    is_reset, item = transition(prev, mask)
    tokens.append(t)
    resets.append(is_reset)
    items.append(item)  # [n, 2]
    prev = mask
  width_k = op_width(np.asarray([len(x) for x in items]), group)
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


# ---------------------------------------------------------------------------
# Wavefront order: the same tokens as raster order, several per step.
# ---------------------------------------------------------------------------


def wavefront_gamma(width: int, gamma: int | str | None) -> int:
  """The gamma the wavefront is skewed for.

  gamma itself, or ``W - 1`` for gamma >= W - 1 and global gamma: then a
  position's window holds the whole previous row, so only raster order (one
  position a step) is exact.
  """
  value = parse_gamma(gamma)
  return width - 1 if value is None or value >= width - 1 else value


def wavefront_lanes(width: int, gamma: int | str | None) -> int:
  """``L = ceil(W / (gamma_eff + 1))``: the most positions of one step."""
  return -(-width // (wavefront_gamma(width, gamma) + 1))


def wavefront_steps(height: int, width: int, tokens_per_position: int,
                    gamma: int | str | None) -> int:
  """Sequential steps of wavefront decoding: ``Tp (W + (H-1)(gamma_eff+1))``."""
  skew = wavefront_gamma(width, gamma) + 1
  return tokens_per_position * (width + (height - 1) * skew)


def wavefront_plan(height: int, width: int, tokens_per_position: int,
                   gamma: int | str | None) -> list[list[tuple[int, int]]]:
  """The ``(lane, token)`` pairs of every wavefront step, in step order.

  Position ``(r, c)`` has wavefront index ``w = r (gamma_eff + 1) + c``; its
  raster-order window (Chebyshev distance <= gamma, earlier in raster order)
  holds only positions of smaller ``w``, so the positions of one ``w`` are
  drawn together, group ``k`` of all of them at step ``w * Tp + k``. Row
  ``r`` runs on lane ``r % L``; the rows of one ``w`` are consecutive and at
  most ``L``, so their lanes differ.
  """
  skew = wavefront_gamma(width, gamma) + 1
  lanes = wavefront_lanes(width, gamma)
  tp = tokens_per_position
  plan = []
  for front in range(width + (height - 1) * skew):
    rows = [r for r in range(min(height - 1, front // skew) + 1)
            if front - r * skew < width]
    for k in range(tp):
      plan.append([(r % lanes, ((r * width + front - r * skew) * tp + k))
                   for r in rows])
  return plan


@dataclasses.dataclass(frozen=True)
class LaneSchedule:
  """Host-computed state updates of wavefront decoding, per lane.

  Lane ``l`` keeps its own inner-product state and walks along rows
  ``l, l + L, ...`` as raster order does; each step applies ``count`` ops to
  every lane (padding: sign 0, no reset) and then draws a token on every
  active lane.

  Attributes:
    idx: [O, L, K] int32 token sequence indices (as in :class:`Schedule`).
    sign: [O, L, K] float32 in {-1, 0, +1}; padding has sign 0.
    reset: [O, L] bool: zero the lane's state before applying this op.
    first: [steps] int32 first op of each step.
    count: [steps] int32 ops of each step (>= 1).
    token: [steps, L] int32 sequence index each lane draws (0 if inactive).
    active: [steps, L] bool: the lane draws a token at this step.
  """
  idx: np.ndarray
  sign: np.ndarray
  reset: np.ndarray
  first: np.ndarray
  count: np.ndarray
  token: np.ndarray
  active: np.ndarray

  @property
  def width(self) -> int:
    return int(self.idx.shape[2])

  @property
  def lanes(self) -> int:
    return int(self.idx.shape[1])

  @property
  def num_ops(self) -> int:
    return int(self.idx.shape[0])

  @property
  def num_steps(self) -> int:
    return int(self.first.shape[0])


def _place_lane_ops(jobs, num_steps: int, width_k: int):
  """Places every lane's context transitions into the steps' op slots.

  Args:
    jobs: per lane, its transitions in order, each ``(start, deadline, reset,
      rows)``: the lane draws at step ``deadline`` and may work on this
      transition from step ``start`` (one after its previous draw); ``rows``
      [n, 3] are (token, sign, ready step), sorted by the step from which
      the token's value exists.
    num_steps: steps of the generation.
    width_k: op width K.

  The device program runs every op on every lane. A step takes as many ops
  as the lanes that draw at it need for their remaining rows (at least one);
  the other lanes fill the same ops with rows that are ready, so a lane
  between two rows of the grid prepares its next row's first context while
  it does not draw.

  Returns:
    Per step ``(n_ops, {lane: (reset at op 0?, rows [m, 2])})``.
  """
  cursor = [0] * len(jobs)  # the current transition of each lane
  done = [0] * len(jobs)  # its rows placed so far
  out = []
  for step in range(num_steps):
    current = {lane: job[cursor[lane]] for lane, job in enumerate(jobs)
               if cursor[lane] < len(job) and job[cursor[lane]][0] <= step}
    need = [len(rows) - done[lane]
            for lane, (_, deadline, _, rows) in current.items()
            if deadline == step]
    n_ops = max([1] + [-(-n // width_k) for n in need])
    placed = {}
    for lane, (start, deadline, is_reset, rows) in current.items():
      lo = done[lane]
      if deadline == step:
        hi = len(rows)
        cursor[lane] += 1
        done[lane] = 0
      else:
        ready = lo + int(np.searchsorted(rows[lo:, 2], step, side="right"))
        hi = done[lane] = min(ready, lo + n_ops * width_k)
      placed[lane] = (is_reset and start == step, rows[lo:hi, :2])
    out.append((n_ops, placed))
  return out


def build_wavefront_schedule(height: int, width: int, tokens_per_position: int,
                             gamma: int | str | None, group: int,
                             max_tokens: int | None = None) -> LaneSchedule:
  """Plans wavefront decoding (:func:`wavefront_plan`) lane by lane.

  Every token gets exactly its raster-order context. Each lane moves from its
  previous token's context to the next by the cheaper of update and reset
  (:func:`transition`), spread over the steps since its previous draw
  (:func:`_place_lane_ops`); the op width K minimises
  ``num_ops * (K * g + OP_OVERHEAD_BITS)``.

  Args:
    height, width, tokens_per_position: the token grid.
    gamma: observation range (int, None or 'global').
    group: bits per token g.
    max_tokens: keep only the first steps that hold at most this many tokens
      in all (at least one step; benchmarks time a slice); K is still chosen
      for the whole generation.
  """
  tp = tokens_per_position
  num_tok = height * width * tp
  masks = dict(context_masks(height, width, tp, gamma,
                             np.arange(height * width)))
  lanes = wavefront_lanes(width, gamma)
  plan = wavefront_plan(height, width, tp, gamma)
  ready = np.zeros(num_tok, np.int64)  # first step that can read a token
  for step, pairs in enumerate(plan):
    for _, t in pairs:
      ready[t] = step + 1
  prev = np.zeros((lanes, num_tok), bool)
  start = [0] * lanes
  jobs = [[] for _ in range(lanes)]
  for step, pairs in enumerate(plan):
    for lane, t in pairs:
      is_reset, item = transition(prev[lane], masks[t])
      # Leaving tokens were read before; entering ones once they are drawn.
      when = np.where(item[:, 1] > 0, ready[item[:, 0]], start[lane])
      rows = np.concatenate([item, when[:, None]], 1)
      rows = rows[np.argsort(rows[:, 2], kind="stable")]
      jobs[lane].append((start[lane], step, is_reset, rows))
      prev[lane] = masks[t]
      start[lane] = step + 1
  longest = max([len(job[3]) for lane_jobs in jobs for job in lane_jobs] + [1])
  costs = [sum(n for n, _ in _place_lane_ops(jobs, len(plan), k)) *
           (k * group + OP_OVERHEAD_BITS) for k in range(1, longest + 1)]
  width_k = int(np.argmin(costs)) + 1
  steps = _place_lane_ops(jobs, len(plan), width_k)
  keep = len(plan)
  if max_tokens is not None:
    done = np.cumsum([len(pairs) for pairs in plan])
    keep = max(1, int(np.sum(done <= max_tokens)))
  idx, sign, reset, first, count, token, active = [], [], [], [], [], [], []
  num_ops = 0
  for pairs, (n_ops, placed) in zip(plan[:keep], steps[:keep], strict=True):
    padded = np.zeros((lanes, n_ops * width_k, 2), np.int64)  # sign 0
    step_reset = np.zeros((n_ops, lanes), bool)
    for lane, (is_reset, rows) in placed.items():
      padded[lane, :len(rows)] = rows
      step_reset[0, lane] = is_reset
    step_token = np.zeros(lanes, np.int64)
    step_active = np.zeros(lanes, bool)
    for lane, t in pairs:
      step_token[lane] = t
      step_active[lane] = True
    padded = padded.reshape(lanes, n_ops, width_k, 2).transpose(1, 0, 2, 3)
    idx.append(padded[..., 0])
    sign.append(padded[..., 1])
    reset.append(step_reset)
    first.append(num_ops)
    count.append(n_ops)
    token.append(step_token)
    active.append(step_active)
    num_ops += n_ops
  return LaneSchedule(
      idx=np.concatenate(idx).astype(np.int32),
      sign=np.concatenate(sign).astype(np.float32),
      reset=np.concatenate(reset),
      first=np.asarray(first, np.int32),
      count=np.asarray(count, np.int32),
      token=np.stack(token).astype(np.int32),
      active=np.stack(active))


def plan_schedule(height: int, width: int, tokens_per_position: int,
                  gamma: int | str | None, order: str | Sequence[int],
                  group: int, rng: jax.Array | None = None,
                  max_tokens: int | None = None) -> Schedule | LaneSchedule:
  """The schedule of one generation order.

  order='wavefront' gives a :class:`LaneSchedule`
  (:func:`build_wavefront_schedule`); 'raster', 'random' and explicit
  permutations (:func:`generation_order`) give a :class:`Schedule`
  (:func:`build_schedule`).
  """
  if isinstance(order, str) and order == "wavefront":
    return build_wavefront_schedule(height, width, tokens_per_position, gamma,
                                    group, max_tokens=max_tokens)
  positions = generation_order(height, width, order, rng)
  return build_schedule(height, width, tokens_per_position, gamma, positions,
                        group, max_tokens=max_tokens)
