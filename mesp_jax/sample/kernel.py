"""Kernel (non-parametric) gamma-ARVM: the authors' exact estimator, fast.

The model is a bank of N training token grids ``z^n`` ([N, H, W, Tp], Tp tokens
of g bits per latent position), a flip probability ``p = Phi(-1/sigma_s)`` and
an observation range gamma. Tokens are generated one at a time (positions in
raster or random order, the Tp groups of a position in order); for the token at
grid position ``i`` the context ``C`` is every already generated token whose
position lies within Chebyshev distance gamma of ``i`` (all generated tokens
for gamma = global) and

  log w_n = sum_{j in C} log K(x_j | z^n_j),
  p(v)    = sum_n softmax(log w)_n K(v | z^n_i),
  log K(a|b) = d log p + (g - d) log(1 - p),   d = popcount(a xor b).

How it is evaluated exactly, but fast:

* ``log w_n = const + L * D_n`` with ``L = log(p / (1 - p))`` and ``D_n`` the
  Hamming distance summed over the context. With +-1 bits,
  ``hamming(a, b) = (g - <a, b>) / 2``, so ``log w_n = const + a_w * IP_n``
  where ``a_w = -L / 2 >= 0`` and ``IP_n`` is the inner product of the
  context's bits with the bank's bits. ``IP`` is an integer, computed exactly
  by a bf16 matmul of +-1/0 values with float32 accumulation.
* ``IP`` (one number per sample and bank entry) is kept as state and updated
  incrementally: between consecutive steps only the tokens entering and
  leaving the window are added/subtracted, or the state is reset and rebuilt
  where that is cheaper (row wraps, random order). The host computes this
  schedule once (:func:`mesp_jax.sample.kernel_schedule.build_schedule`);
  each schedule op carries a fixed number ``K`` of signed token indices, so a
  long rebuild is split into several ops; the histogram is formed in the same
  pass as a step's last op.
* The weights are aggregated by the bank's token value at the current position
  first, ``A[u] = sum_n w_n [z^n_i = u]`` (a segment sum), then
  ``p = A @ Kmat / sum(A)`` with the 2^g x 2^g kernel matrix. Weights are
  ``exp(a_w (IP_n - max_n IP_n))``, so the largest is exactly 1 (log-space
  max subtraction; the running max per chunk rescales the partial sums like
  an online softmax, and the devices' maxima are combined by ``pmax``).
* The bank is split over every device of the mesh (``shard_map``); each device
  keeps its [N_local, S] slice of the state and produces partial maxima and
  partial histograms, combined by ``pmax`` / ``psum``. Within a device the bank
  is processed in chunks of ``chunk_size`` entries, so temporaries are
  O(chunk_size * (S + K g)) and nothing of size S x N x |C| x 2^g ever exists.
* The whole generation is one jitted program (``lax.scan`` over the steps, a
  ``fori_loop`` over a step's extra ops and over the chunks); the token of
  sample s at sequence index t is drawn with the key
  ``fold_in(fold_in(rng, s), t)``, independent of the device count and order.
  order='wavefront' draws raster order's tokens in ``Tp (W + (H-1)(gamma+1))``
  steps, one state per lane of rows (:mod:`mesp_jax.sample.kernel_wavefront`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mesp_jax.base import bits as bits_lib
from mesp_jax.base.sharding import (
  DATA_AXES,
  SHARD_MAP_CHECK_KW,
  make_mesh,
  shard_map,
)
from mesp_jax.sample import kernel_wavefront
from mesp_jax.sample.kernel_schedule import (
  LaneSchedule,
  Schedule,
  plan_schedule,
)

# ---------------------------------------------------------------------------
# Closed forms: flip probability and kernel matrix.
# ---------------------------------------------------------------------------


def flip_probability(sigma_s: float) -> float:
  """``p_flip = Phi(-1 / sigma_s)``: the chance that one latent bit flips."""
  return float(scipy.special.ndtr(-1.0 / sigma_s))


def log_flip_probabilities(sigma_s: float) -> tuple[float, float]:
  """``(log p_flip, log(1 - p_flip))`` computed without underflow."""
  if sigma_s <= 0:
    raise ValueError(f"sigma_s must be > 0, got {sigma_s}")
  log_p = float(scipy.special.log_ndtr(-1.0 / sigma_s))
  log_q = float(scipy.special.log_ndtr(1.0 / sigma_s))
  return log_p, log_q


def kernel_matrix(group: int, sigma_s: float) -> np.ndarray:
  """The [2^g, 2^g] float64 matrix ``Kmat[u, v] = K(v | u)`` (rows sum to 1)."""
  log_p, log_q = log_flip_probabilities(sigma_s)
  values = np.arange(2**group)
  d = np.asarray([bin(x).count("1") for x in range(2**group)])
  dist = d[np.bitwise_xor(values[:, None], values[None, :])]  # [V, V]
  return np.exp(dist * log_p + (group - dist) * log_q)


def _weight_scale(sigma_s: float) -> float:
  """``a_w = -log(p / (1 - p)) / 2``: log w_n = const + a_w * IP_n."""
  log_p, log_q = log_flip_probabilities(sigma_s)
  return 0.5 * (log_q - log_p)


# ---------------------------------------------------------------------------
# The bank, laid out for the device program.
# ---------------------------------------------------------------------------


def _token_dtype(group: int):
  if group <= 7:
    return np.int8
  if group <= 15:
    return np.int16
  return np.int32


@dataclasses.dataclass(frozen=True)
class KernelBank:
  """A token bank placed on a mesh for :func:`kernel_sample`.

  Attributes:
    chunks: [D * nc, T, c] tokens (int8/int16/int32), sharded over the mesh on
      axis 0: device d holds chunks ``d * nc .. (d + 1) * nc - 1``; entry
      ``(chunk, :, j)`` is bank grid ``chunk * c + j``.
    valid: [D * nc, c] bool, False for padding.
    mesh: the mesh.
    size: N (real entries).
    grid: (H, W, Tp).
    group: g.
    chunk: c.
  """
  chunks: jax.Array
  valid: jax.Array
  mesh: Mesh
  size: int
  grid: tuple[int, int, int]
  group: int
  chunk: int

  @property
  def chunks_per_device(self) -> int:
    return self.chunks.shape[0] // self.mesh.size


def _default_mesh() -> Mesh:
  return make_mesh(devices=jax.devices()[:1])


def prepare_bank(bank_tokens: np.ndarray | jax.Array, *, group: int,
                 chunk_size: int = 8192, mesh: Mesh | None = None
                 ) -> KernelBank:
  """Pads, chunks and shards a [N, H, W, Tp] token bank over ``mesh``.

  N is padded to ``D * nc * c`` (D devices, nc chunks of c <= chunk_size
  entries per device) with masked entries.
  """
  bank = np.asarray(bank_tokens)
  if bank.ndim != 4:
    raise ValueError(f"bank_tokens must be [N, H, W, Tp], got {bank.shape}")
  if bank.size and (bank.min() < 0 or bank.max() >= 2**group):
    raise ValueError(f"bank tokens must lie in [0, 2^{group})")
  mesh = _default_mesh() if mesh is None else mesh
  if tuple(mesh.axis_names)[:2] != DATA_AXES or math.prod(
      mesh.shape[a] for a in mesh.axis_names if a not in DATA_AXES) != 1:
    raise ValueError(f"the kernel sampler splits its bank over the mesh axes "
                     f"{DATA_AXES} only; got mesh {dict(mesh.shape)} (set "
                     f"mesh.model=1)")
  num, height, width, tp = bank.shape
  if num < 1:
    raise ValueError("the bank is empty")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  num_dev = mesh.size
  per_dev = -(-num // num_dev)
  nc = -(-per_dev // chunk_size)
  c = -(-per_dev // nc)
  padded = num_dev * nc * c
  seq = bank.reshape(num, height * width * tp).astype(_token_dtype(group))
  seq = np.concatenate([seq, np.zeros((padded - num, seq.shape[1]), seq.dtype)])
  chunks = seq.reshape(num_dev * nc, c, -1).transpose(0, 2, 1)  # [D nc, T, c]
  chunks = np.ascontiguousarray(chunks)
  valid = (np.arange(padded) < num).reshape(num_dev * nc, c)
  spec = NamedSharding(mesh, P(DATA_AXES))

  def place(x):
    return jax.make_array_from_callback(x.shape, spec, lambda i: x[i])

  return KernelBank(chunks=place(chunks), valid=place(valid), mesh=mesh,
                    size=num, grid=(height, width, tp), group=group, chunk=c)


def kernel_memory_bytes(bank: KernelBank, num_samples: int,
                        schedule_width: int, teacher_forcing: bool = False,
                        lanes: int | None = None) -> dict[str, int]:
  """Analytic per-device peak memory of the sampling program (bytes).

  Returns a dict with the bank slice, the [N_local, S] state (one per lane
  for wavefront order, ``lanes=L``) and the chunk-sized temporaries
  (independent of N), and their sum 'total'.
  """
  height, width, tp = bank.grid
  num_tok = height * width * tp
  nc, c, s, g = bank.chunks_per_device, bank.chunk, num_samples, bank.group
  itemsize = np.dtype(bank.chunks.dtype).itemsize
  num_lanes, cols = (1, num_tok) if lanes is None else (lanes, num_tok + 1)
  out = {
      "bank": nc * c * num_tok * itemsize + nc * c,
      "state": nc * c * s * 4 * num_lanes,
      # bits [K g, c] bf16 (+ int32 unpack); product, new state, weights and
      # their transpose [S, c]; bank row ids [c]; the histogram [V, S].
      "chunk_temporaries": num_lanes * (c * schedule_width * g * (2 + 4) +
                                        4 * c * s * 4 + c * 4 + 2**g * s * 4),
      "samples": s * cols * 4 * (1 + (2**g if teacher_forcing else 0)),
  }
  out["total"] = sum(out.values())
  return out


# ---------------------------------------------------------------------------
# The device program.
# ---------------------------------------------------------------------------
def popcount_default(mesh: Mesh) -> bool:
  """Whether updates use
  :func:`~mesp_jax.sample.kernel_wavefront.popcount_delta` (else the bf16
  product).

  On CPU: XOR and popcount of the packed tokens skip unpacking K x g bits
  of every bank entry and the product, and run several times faster (see
  docs/benchmarks.md). Elsewhere the product runs on the matrix units and
  stays the default. Both are exact (integer inner products), so the choice
  never changes a result.
  """
  return mesh.devices.flat[0].platform == "cpu"


def _local_program(chunks, valid, idx, sign, reset, first, count, token,
                   forced, rng, a_w, kmat, inv_temp, *, num_samples: int,
                   group: int, teacher: bool, popcount: bool):
  """Runs on one device: bank slice [nc, T, c], replicated everything else."""
  nc, num_tok, c = chunks.shape
  s, g, v = num_samples, group, 2**group
  width_k = idx.shape[1]
  axes = DATA_AXES
  sample_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(s))

  def op_bits(samples, o):
    """Op o's context: [S, K] tokens (popcount), else signed bits [S, K g]
    bf16 in {-1, 0, 1}."""
    tokens = jnp.take(samples, idx[o], axis=1)  # [S, K]
    if popcount:
      return tokens
    xs = bits_lib.unpack(tokens, g, jnp.int32, axis=2)  # [S, K, g]
    xs = xs * sign[o][None, :, None].astype(jnp.int32)
    return xs.reshape(s, width_k * g).astype(jnp.bfloat16)

  def chunk_state(i, state, xs, o):
    """Inner products [S, c] of chunk i after op o."""
    z = chunks[i, idx[o]]  # [K, c]
    if popcount:
      delta = kernel_wavefront.popcount_delta(xs, sign[o], z, g)  # [S, c]
    else:
      zb = bits_lib.unpack(z, g, jnp.int32, axis=1)  # [K, g, c]
      zb = zb.reshape(width_k * g, c).astype(jnp.bfloat16)
      delta = jnp.dot(xs, zb, preferred_element_type=jnp.float32)  # [S, c]
    old = jax.lax.dynamic_index_in_dim(state, i, 0, keepdims=False)  # [S, c]
    # The barrier materialises the new chunk once, so the state is updated in
    # place instead of being copied to keep the old chunk alive.
    return jax.lax.optimization_barrier(jnp.where(reset[o], 0.0, old) + delta)

  def update_only(o, carry):
    state, samples = carry
    xs = op_bits(samples, o)

    def body(i, state):
      new = chunk_state(i, state, xs, o)
      return jax.lax.dynamic_update_index_in_dim(state, new, i, 0)

    return jax.lax.fori_loop(0, nc, body, state), samples

  def update_and_histogram(state, samples, o, t):
    """Applies op o and returns the new state and p [S, V] of token t."""
    xs = op_bits(samples, o)

    def body(i, carry):
      state, m, agg = carry  # [S] running max inner product, [V, S] weights
      new = chunk_state(i, state, xs, o)  # [S, c]
      state = jax.lax.dynamic_update_index_in_dim(state, new, i, 0)
      ok = valid[i][None, :]  # [1, c]
      m_new = jnp.maximum(m, jnp.max(jnp.where(ok, new, -jnp.inf), 1))
      scale = jnp.where(m == -jnp.inf, 0.0, jnp.exp(a_w * (m - m_new)))
      w = jnp.where(ok, jnp.exp(a_w * (new - m_new[:, None])), 0.0)  # [S, c]
      cur = jax.lax.dynamic_index_in_dim(chunks[i], t, 0, keepdims=False)
      agg = agg * scale[None, :] + jax.ops.segment_sum(
          w.T, cur.astype(jnp.int32), v)  # [V, S]
      return state, m_new, agg

    init = (state, jnp.full((s,), -jnp.inf, jnp.float32),
            jnp.zeros((v, s), jnp.float32))
    state, m, agg = jax.lax.fori_loop(0, nc, body, init)
    m_all = jax.lax.pmax(m, axes)  # [S]
    agg = agg * jnp.where(m == -jnp.inf, 0.0, jnp.exp(a_w * (m - m_all)))
    agg = jax.lax.psum(agg, axes)  # [V, S]
    p = jnp.matmul(agg.T, kmat, precision=jax.lax.Precision.HIGHEST)  # [S, V]
    return state, p / jnp.sum(agg, 0)[:, None]

  def step_body(carry, step):
    state, samples, hists = carry
    op0, n_ops, t = step
    last = op0 + n_ops - 1
    state, samples = jax.lax.fori_loop(op0, last, update_only,
                                       (state, samples))
    state, p = update_and_histogram(state, samples, last, t)  # p: [S, V]
    if teacher:
      hists = jax.lax.dynamic_update_index_in_dim(hists, p, t, 1)
    else:
      tok = kernel_wavefront.draw_from_histogram(p, t, sample_keys, inv_temp)
      samples = jax.lax.dynamic_update_index_in_dim(samples, tok, t, 1)
    return (state, samples, hists), None

  state0 = jnp.zeros((nc, s, c), jnp.float32)  # inner products IP[n, s]
  samples0 = forced if teacher else jnp.zeros((s, num_tok), jnp.int32)
  hists0 = jnp.zeros((s, num_tok, v) if teacher else (0,), jnp.float32)
  (_, samples, hists), _ = jax.lax.scan(
      step_body, (state0, samples0, hists0), (first, count, token))
  return samples, hists


@functools.lru_cache(maxsize=32)
def _compiled_program(mesh: Mesh, num_samples: int, group: int, teacher: bool,
                      key_impl: str | None, popcount: bool):
  """The jitted shard_map program (cached per static configuration)."""

  def fn(*args):
    args = list(args)
    if key_impl is not None:  # typed keys travel as their key data
      args[9] = jax.random.wrap_key_data(args[9], impl=key_impl)
    return _local_program(*args, num_samples=num_samples, group=group,
                          teacher=teacher, popcount=popcount)

  sharded = P(DATA_AXES)
  rep = P()
  mapped = shard_map(
      fn, mesh=mesh,
      in_specs=(sharded, sharded) + (rep,) * 11,
      out_specs=(rep, rep), **{SHARD_MAP_CHECK_KW: False})
  return jax.jit(mapped)


def _replicate(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array as a replicated global array (works across processes)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()),
                                      lambda i: x[i])


def _run(bank: KernelBank, schedule: Schedule | LaneSchedule, *,
         sigma_s: float, num_samples: int, rng: jax.Array,
         forced: np.ndarray | None, temperature: float,
         popcount: bool | None = None):
  """Runs the device program; returns ([S, T] tokens, [S, T, V] or [0]).

  ``popcount``: the update's form (default :func:`popcount_default`).
  """
  if popcount is None:
    popcount = popcount_default(bank.mesh)
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  height, width, tp = bank.grid
  num_tok = height * width * tp
  teacher = forced is not None
  if not teacher:
    forced = np.zeros((0,), np.int32)
  else:
    forced = np.asarray(forced, np.int32).reshape(num_samples, num_tok)
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    key_impl = str(jax.random.key_impl(rng))
    key_data = np.asarray(jax.random.key_data(rng))
  else:
    key_impl, key_data = None, np.asarray(rng)
  steps = (schedule.idx, schedule.sign, schedule.reset, schedule.first,
           schedule.count, schedule.token)
  if isinstance(schedule, LaneSchedule):  # wavefront order
    steps += (schedule.active,)
    program = kernel_wavefront.compiled_lane_program(
        bank.mesh, num_samples, bank.group, teacher, key_impl,
        kernel_wavefront.lane_dots_default(bank.mesh), popcount)
  else:
    program = _compiled_program(bank.mesh, num_samples, bank.group,
                                teacher, key_impl, popcount)
  host = steps + (
      forced, key_data, np.float32(_weight_scale(sigma_s)),
      kernel_matrix(bank.group, sigma_s).astype(np.float32),
      np.float32(min(1.0 / temperature, 1e30) if temperature > 0 else 0.0))
  return program(bank.chunks, bank.valid,
                 *[_replicate(x, bank.mesh) for x in host])


def _as_bank(bank_tokens, group, chunk_size, mesh) -> KernelBank:
  if isinstance(bank_tokens, KernelBank):
    if bank_tokens.group != group:
      raise ValueError(f"bank was prepared for g={bank_tokens.group}, "
                       f"not g={group}")
    if mesh is not None and bank_tokens.mesh != mesh:
      raise ValueError("bank was prepared on a different mesh")
    return bank_tokens
  return prepare_bank(bank_tokens, group=group, chunk_size=chunk_size,
                      mesh=mesh)


def kernel_sample(bank_tokens: np.ndarray | jax.Array | KernelBank, *,
                  group: int, sigma_s: float, gamma: int | str | None, num_samples: int,
                  rng: jax.Array, order: str | Sequence[int] = "raster",
                  temperature: float = 1.0, chunk_size: int = 8192,
                  mesh: Mesh | None = None,
                  max_tokens: int | None = None,
                  popcount: bool | None = None) -> jax.Array:
  """Draws samples from the kernel gamma-ARVM.

  Args:
    bank_tokens: [N, H, W, Tp] int tokens in [0, 2^g) (training latents), or
      a :class:`KernelBank` from :func:`prepare_bank`.
    group: bits per token g.
    sigma_s: sampling noise; ``p_flip = Phi(-1/sigma_s)``.
    gamma: observation range (Chebyshev radius); None or 'global' = all
      generated tokens.
    num_samples: S.
    rng: PRNG key. Token t of sample s uses ``fold_in(fold_in(rng, s), t)``;
      order='random' draws the order from ``fold_in(rng, ORDER_SALT)``
      (:mod:`mesp_jax.sample.kernel_schedule`).
    order: 'raster', 'random', an explicit permutation of the H*W positions,
      or 'wavefront' (raster order's tokens, several positions a step).
    temperature: tokens are drawn from ``p(v)^(1/temperature)`` (normalised);
      0 takes the most likely token.
    chunk_size: bank entries processed at once per device (bounds memory).
    mesh: ('data', 'fsdp') mesh; the bank is split over all its devices.
      None: one device.
    max_tokens: generate only the first ``max_tokens`` tokens of the order
      (the rest stay 0); for timing slices. For 'wavefront', the first steps
      that hold at most ``max_tokens`` tokens (at least one step).
    popcount: the update's form, XOR and popcount or the bf16 product (the
      same tokens); None: :func:`popcount_default`.

  Returns:
    [S, H, W, Tp] int32 tokens (replicated over the mesh).
  """
  bank = _as_bank(bank_tokens, group, chunk_size, mesh)
  height, width, tp = bank.grid
  schedule = plan_schedule(height, width, tp, gamma, order, group, rng,
                           max_tokens=max_tokens)
  samples, _ = _run(bank, schedule, sigma_s=sigma_s, num_samples=num_samples,
                    rng=rng, forced=None, temperature=temperature,
                    popcount=popcount)
  return samples.reshape(num_samples, height, width, tp)


def kernel_histograms(bank_tokens: np.ndarray | jax.Array | KernelBank,
                      context_tokens: np.ndarray | jax.Array, *, group: int,
                      sigma_s: float, gamma: int | str | None,
                      order: str | Sequence[int] = "raster",
                      rng: jax.Array | None = None, chunk_size: int = 8192,
                      mesh: Mesh | None = None) -> jax.Array:
  """Every step's histogram for fixed (teacher-forced) sequences.

  Args:
    bank_tokens: [N, H, W, Tp] tokens or a :class:`KernelBank`.
    context_tokens: [S, H, W, Tp] tokens; the histogram of a token is computed
      from the context formed by these tokens (as if they had been sampled).
    group, sigma_s, gamma, order, chunk_size, mesh: as in
      :func:`kernel_sample`; ``rng`` is needed only for order='random'.

  Returns:
    [S, H, W, Tp, 2^g] float32 histograms, indexed by the token they predict;
    each sums to 1.
  """
  bank = _as_bank(bank_tokens, group, chunk_size, mesh)
  height, width, tp = bank.grid
  ctx = np.asarray(context_tokens)
  if ctx.shape[1:] != (height, width, tp):
    raise ValueError(f"context_tokens {ctx.shape} do not match the bank grid "
                     f"{bank.grid}")
  num_samples = ctx.shape[0]
  schedule = plan_schedule(height, width, tp, gamma, order, group, rng)
  _, hists = _run(bank, schedule, sigma_s=sigma_s, num_samples=num_samples,
                  rng=jax.random.key(0), forced=ctx, temperature=1.0)
  return hists.reshape(num_samples, height, width, tp, 2**group)
