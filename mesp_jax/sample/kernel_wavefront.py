"""The kernel gamma-ARVM's device program for wavefront order.

Wavefront decoding (:func:`mesp_jax.sample.kernel_schedule.wavefront_plan`)
draws every position of one wavefront index ``r (gamma + 1) + c`` in one step.
The program keeps one inner-product state per *lane*, [nc, L, S, c] per
device: lane ``l`` walks along rows ``l, l + L, ...`` exactly as raster order
walks along every row, so its incremental updates are raster's. Each step
applies the :class:`~mesp_jax.sample.kernel_schedule.LaneSchedule` ops to all
L lanes at once and forms all lanes' histograms in the same pass over the
bank chunks, so a step has about the latency of one raster step; then each
lane's token is drawn, lane after lane, with the same float operations,
shapes and key ``fold_in(fold_in(rng, s), t)`` as in raster decoding
(:mod:`mesp_jax.sample.kernel`). The histograms are raster's to the bit on
CPU (tested), so both orders give the same tokens.

The work is not smaller than raster's: every token needs its own update and
histogram, and a lane that does not draw still runs the step's ops. Where the
work bounds the time (a CPU at N = 60,000), wavefront order is slower; it
pays where a step's latency does (accelerators, small banks).

A lane that does not draw at a step (between two of its rows, or before its
first or after its last) applies the ops the planner gave it (the first
context of its next row, built early) and writes its token and histogram to a
trash column ``T`` that is dropped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mesp_jax.base import bits as bits_lib
from mesp_jax.base.sharding import DATA_AXES, SHARD_MAP_CHECK_KW, shard_map

# Position of the key among the program's arguments (typed keys travel as
# their key data).
_RNG_ARG = 10


def draw_from_histogram(p: jax.Array, t: jax.Array, sample_keys: jax.Array,
                        inv_temp: jax.Array) -> jax.Array:
  """Token ``t`` of every sample from its histogram ``p`` [S, V]: [S] int32.

  Sample ``s`` draws with ``fold_in(sample_keys[s], t)`` whatever the order
  (raster or wavefront); ``inv_temp = 0`` encodes temperature 0 (the most
  likely token).
  """
  keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(sample_keys)
  logits = jnp.log(p) * jnp.where(inv_temp > 0, inv_temp, 1.0)
  return jnp.where(inv_temp > 0,
                   jax.vmap(jax.random.categorical)(keys, logits),
                   jnp.argmax(p, axis=-1)).astype(jnp.int32)


def popcount_delta(x: jax.Array, sign: jax.Array, z: jax.Array,
                   group: int) -> jax.Array:
  """The inner-product change of one op from packed tokens, exactly.

  Args:
    x: [S, K] int32 tokens of the samples (g bits each).
    sign: [K] in {-1, 0, +1}: added, ignored (padding) or subtracted.
    z: [K, c] the bank's tokens at the same sequence indices.
    group: g.

  Returns:
    [S, c] float32: ``sum_k sign_k <bits(x_k), bits(z_k)>`` with +-1 bits,
    as ``<a, b> = g - 2 hamming(a, b)``.
  """
  ip = group - 2 * bits_lib.hamming(x[:, :, None], z[None])  # [S, K, c]
  sgn = sign.astype(jnp.int32)[None, :, None]
  return jnp.sum(sgn * ip, axis=1).astype(jnp.float32)


def _lane_program(chunks, valid, idx, sign, reset, first, count, token, active,
                  forced, rng, a_w, kmat, inv_temp, *, num_samples: int,
                  group: int, teacher: bool, lane_dots: bool,
                  popcount: bool = False):
  """Runs on one device: bank slice [nc, T, c], replicated everything else."""
  nc, num_tok, c = chunks.shape
  s, g, v = num_samples, group, 2**group
  lanes, width_k = idx.shape[1], idx.shape[2]
  axes = DATA_AXES
  sample_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(s))

  def op_bits(samples, o):
    """Op o's context: [L, S, K] tokens (popcount), else signed bits
    [L, S, K g] bf16 in {-1, 0, 1}."""
    tokens = jnp.take(samples, idx[o], axis=1)  # [S, L, K]
    if popcount:
      return tokens.transpose(1, 0, 2)
    xs = bits_lib.unpack(tokens, g, jnp.int32, axis=3)  # [S, L, K, g]
    xs = xs * sign[o][None, :, :, None].astype(jnp.int32)
    return xs.transpose(1, 0, 2, 3).reshape(lanes, s, width_k * g).astype(
        jnp.bfloat16)

  def new_chunk(old, xs, z, zero, sgn):
    """Inner products [L, S, c] after adding xs [L, S, K g] times the bank
    bits of z [L, K, c] to old [L, S, c] (zeroed on lanes where ``zero``);
    with popcount, xs [L, S, K] are tokens and sgn [L, K] their signs."""
    if popcount:
      delta = jax.vmap(popcount_delta, in_axes=(0, 0, 0, None))(
          xs, sgn, z, g)  # [L, S, c]
      return jax.lax.optimization_barrier(
          jnp.where(zero[:, None, None], 0.0, old) + delta)
    zb = bits_lib.unpack(z, g, jnp.int32, axis=2)  # [L, K, g, c]
    zb = zb.reshape(lanes, width_k * g, c).astype(jnp.bfloat16)
    if lane_dots:  # raster's [S, K g] x [K g, c] product, lane by lane
      delta = jnp.stack([jnp.dot(xs[lane], zb[lane],
                                 preferred_element_type=jnp.float32)
                         for lane in range(lanes)])
    else:
      delta = jnp.einsum("lsk,lkc->lsc", xs, zb,
                         preferred_element_type=jnp.float32)
    # As in raster: materialise the new chunk once, update the state in place.
    return jax.lax.optimization_barrier(
        jnp.where(zero[:, None, None], 0.0, old) + delta)

  def fold(m, agg, new, i, cur):
    """Online-softmax step of chunk i: max [L, S], sums [L, V, S]."""
    ok = valid[i][None, None, :]  # [1, 1, c]
    m_new = jnp.maximum(m, jnp.max(jnp.where(ok, new, -jnp.inf), 2))
    scale = jnp.where(m == -jnp.inf, 0.0, jnp.exp(a_w * (m - m_new)))
    w = jnp.where(ok, jnp.exp(a_w * (new - m_new[..., None])), 0.0)
    # vmapped, each lane's sums are raster's to the bit (CPU, measured; a
    # loop over the lanes or one sum over lane-offset ids rounds otherwise).
    sums = jax.vmap(lambda wl, cl: jax.ops.segment_sum(wl.T, cl, v))(
        w, cur.astype(jnp.int32))
    return m_new, agg * scale[:, None, :] + sums

  def apply_op(o, state, samples, tok=None):
    """Op o on all lanes; with tok, also their [L, S] max and [L, V, S] sums."""
    xs = op_bits(samples, o)  # [L, S, K g]

    def body(i, carry):
      state, m, agg = carry
      old = jax.lax.dynamic_index_in_dim(state, i, 0, keepdims=False)
      new = new_chunk(old, xs, chunks[i, idx[o]], reset[o],
                      sign[o])  # [L, S, c]
      state = jax.lax.dynamic_update_index_in_dim(state, new, i, 0)
      if tok is not None:
        m, agg = fold(m, agg, new, i, chunks[i, tok])
      return state, m, agg

    init = (state, jnp.full((lanes, s), -jnp.inf, jnp.float32),
            jnp.zeros((lanes, v, s), jnp.float32))
    return jax.lax.fori_loop(0, nc, body, init)

  def lane_output(carry, lane):
    """Histogram of one lane's token; draws it (or stores the histogram)."""
    samples, hists = carry
    agg, t, act = lane  # [V, S], sequence index, active?
    agg = jnp.where(act, agg, 1.0)  # lanes without a draw: no 0 / 0
    p = jnp.matmul(agg.T, kmat, precision=jax.lax.Precision.HIGHEST)  # [S, V]
    p = p / jnp.sum(agg, 0)[:, None]
    col = jnp.where(act, t, num_tok)  # inactive lanes: the trash column
    if teacher:
      hists = jax.lax.dynamic_update_index_in_dim(hists, p, col, 1)
    else:
      tok = draw_from_histogram(p, t, sample_keys, inv_temp)
      samples = jax.lax.dynamic_update_index_in_dim(samples, tok, col, 1)
    return (samples, hists), None

  def step_body(carry, step):
    state, samples, hists = carry
    op0, n_ops, tok, act = step
    last = op0 + n_ops - 1
    state = jax.lax.fori_loop(op0, last,
                              lambda o, st: apply_op(o, st, samples)[0], state)
    state, m, agg = apply_op(last, state, samples, tok)
    m_all = jax.lax.pmax(m, axes)  # [L, S]
    agg = agg * jnp.where(m == -jnp.inf, 0.0,
                          jnp.exp(a_w * (m - m_all)))[:, None, :]
    agg = jax.lax.psum(agg, axes)  # [L, V, S]
    (samples, hists), _ = jax.lax.scan(lane_output, (samples, hists),
                                       (agg, tok, act))
    return (state, samples, hists), None

  state0 = jnp.zeros((nc, lanes, s, c), jnp.float32)  # IP per lane
  if teacher:
    samples0 = jnp.concatenate([forced, jnp.zeros((s, 1), jnp.int32)], 1)
  else:
    samples0 = jnp.zeros((s, num_tok + 1), jnp.int32)
  hists0 = jnp.zeros((s, num_tok + 1, v) if teacher else (0,), jnp.float32)
  (_, samples, hists), _ = jax.lax.scan(
      step_body, (state0, samples0, hists0), (first, count, token, active))
  return samples[:, :num_tok], hists[:, :num_tok] if teacher else hists


def lane_dots_default(mesh: Mesh) -> bool:
  """Whether the lanes' updates run as L products of raster's shape.

  On CPU: XLA's CPU backend runs the batched [L, S, K g] x [L, K g, c]
  product as a slow loop (4.3x the time of L separate products at S = 1,
  measured). Elsewhere one batched product. Both are exact (integer inner
  products), so the choice never changes a result.
  """
  return mesh.devices.flat[0].platform == "cpu"


@functools.lru_cache(maxsize=32)
def compiled_lane_program(mesh: Mesh, num_samples: int, group: int,
                          teacher: bool, key_impl: str | None,
                          lane_dots: bool, popcount: bool = False):
  """The jitted shard_map program (cached per static configuration).

  Arguments: the bank chunks and valid mask (sharded), then the
  :class:`~mesp_jax.sample.kernel_schedule.LaneSchedule` fields idx, sign,
  reset, first, count, token, active, the forced tokens, the key (data),
  ``a_w``, the kernel matrix and the inverse temperature (replicated).
  Returns ([S, T] tokens, [S, T, V] histograms or [0]).
  """

  def fn(*args):
    args = list(args)
    if key_impl is not None:
      args[_RNG_ARG] = jax.random.wrap_key_data(args[_RNG_ARG], impl=key_impl)
    return _lane_program(*args, num_samples=num_samples, group=group,
                         teacher=teacher, lane_dots=lane_dots,
                         popcount=popcount)

  sharded = P(DATA_AXES)
  rep = P()
  mapped = shard_map(
      fn, mesh=mesh,
      in_specs=(sharded, sharded) + (rep,) * 12,
      out_specs=(rep, rep), **{SHARD_MAP_CHECK_KW: False})
  return jax.jit(mapped)
