"""Kernel ARVM: histograms against a direct float64 evaluation of the formula.

The reference below follows the paper's definition literally (loops over
samples, tokens and context tokens; log-sum-exp over the bank) and shares no
code with the sampler (which uses inner products, incremental updates,
chunking and sharding).
"""

import math

import jax
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from mesp_jax.base.gamma import parse_gamma
from mesp_jax.base.sharding import make_mesh
from mesp_jax.sample import kernel, kernel_schedule, kernel_wavefront


def popcount(x: np.ndarray) -> np.ndarray:
  return np.vectorize(lambda v: bin(int(v)).count("1"))(x)


def reference_context(height, width, tp, gamma, positions, pos, k):
  """Tokens (i, j, group) generated before (pos, k) within the window."""
  rank = {int(p): r for r, p in enumerate(positions)}
  i, j = divmod(int(pos), width)
  out = []
  for q in range(height * width):
    qi, qj = divmod(q, width)
    if gamma is not None and max(abs(qi - i), abs(qj - j)) > gamma:
      continue
    for kk in range(tp):
      if rank[q] < rank[int(pos)] or (q == int(pos) and kk < k):
        out.append((qi, qj, kk))
  return out


def reference_histograms(bank, ctx, group, sigma_s, gamma, positions):
  """[S, H, W, Tp, 2^g] float64 straight from the definition."""
  num, height, width, tp = bank.shape
  p = 0.5 * math.erfc(1.0 / sigma_s / math.sqrt(2.0))  # Phi(-1/sigma_s)
  log_p, log_q = math.log(p), math.log1p(-p)
  gamma = None if gamma in (None, "global") else gamma
  out = np.zeros(ctx.shape + (2**group,))
  for s in range(ctx.shape[0]):
    for pos in positions:
      i, j = divmod(int(pos), width)
      for k in range(tp):
        log_w = np.zeros(num)
        for qi, qj, kk in reference_context(height, width, tp, gamma,
                                            positions, pos, k):
          d = popcount(np.bitwise_xor(ctx[s, qi, qj, kk], bank[:, qi, qj, kk]))
          log_w += d * log_p + (group - d) * log_q
        w = np.exp(log_w - scipy.special.logsumexp(log_w))
        for v in range(2**group):
          d = popcount(np.bitwise_xor(v, bank[:, i, j, k]))
          out[s, i, j, k, v] = np.sum(w * np.exp(d * log_p + (group - d) * log_q))
  return out


def mesh8():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_"
                "device_count=8)")
  return make_mesh(devices=jax.devices()[:8])


@pytest.mark.parametrize(
    "num,height,width,tp,group,sigma_s,gamma,order",
    [(40, 4, 5, 1, 3, 0.7, 1, "raster"),
     (30, 3, 4, 2, 2, 0.5, None, "raster"),   # g < C: two tokens a position
     (30, 4, 4, 1, 4, 1.0, 2, "random"),
     (25, 3, 3, 3, 2, 0.4, 0, "raster"),      # gamma 0: own earlier groups
     (60, 4, 4, 2, 3, 0.15, "global", "random")])  # peaked weights
def test_histograms_match_formula(num, height, width, tp, group, sigma_s,
                                  gamma, order):
  rng = np.random.default_rng(num + height + group)
  bank = rng.integers(0, 2**group, (num, height, width, tp))
  ctx = rng.integers(0, 2**group, (3, height, width, tp))
  ctx[2] = bank[5]  # a context that matches a bank entry exactly
  positions = (rng.permutation(height * width) if order == "random"
               else np.arange(height * width))
  hist = np.asarray(kernel.kernel_histograms(
      bank, ctx, group=group, sigma_s=sigma_s, gamma=gamma, order=positions,
      chunk_size=16))
  ref = reference_histograms(bank, ctx, group, sigma_s, gamma, positions)
  np.testing.assert_allclose(hist, ref, atol=2e-6, rtol=1e-4)
  np.testing.assert_allclose(hist.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("order", ["raster", "random"])
def test_sharded_and_chunked_equal_single_device(order):
  mesh = mesh8()
  rng = np.random.default_rng(7)
  group, sigma_s, gamma = 3, 0.6, 1
  bank = rng.integers(0, 2**group, (101, 4, 4, 2))  # 101: padding on 8 devices
  ctx = rng.integers(0, 2**group, (3, 4, 4, 2))
  key = jax.random.key(3)
  common = dict(group=group, sigma_s=sigma_s, gamma=gamma, order=order)
  h1 = kernel.kernel_histograms(bank, ctx, rng=key, chunk_size=1000, **common)
  h8 = kernel.kernel_histograms(bank, ctx, rng=key, chunk_size=5, mesh=mesh,
                                **common)
  hc = kernel.kernel_histograms(bank, ctx, rng=key, chunk_size=7, **common)
  np.testing.assert_allclose(np.asarray(h8), np.asarray(h1), atol=1e-6)
  np.testing.assert_allclose(np.asarray(hc), np.asarray(h1), atol=1e-6)
  s1 = kernel.kernel_sample(bank, num_samples=4, rng=key, chunk_size=1000,
                            **common)
  s8 = kernel.kernel_sample(bank, num_samples=4, rng=key, chunk_size=5,
                            mesh=mesh, **common)
  np.testing.assert_array_equal(np.asarray(s8), np.asarray(s1))
  assert s1.shape == (4, 4, 4, 2) and s1.dtype == np.int32


def test_global_small_sigma_reproduces_a_bank_entry():
  rng = np.random.default_rng(11)
  bank = rng.integers(0, 16, (60, 4, 4, 1))
  assert len({b.tobytes() for b in bank}) == len(bank)  # distinct latents
  samples = np.asarray(kernel.kernel_sample(
      bank, group=4, sigma_s=0.1, gamma="global", num_samples=6,
      rng=jax.random.key(0), chunk_size=16))
  for sample in samples:
    assert (bank == sample[None]).all(axis=(1, 2, 3)).any()


def test_sampling_follows_the_histograms():
  rng = np.random.default_rng(5)
  bank = rng.integers(0, 8, (50, 3, 4, 1))
  common = dict(group=3, sigma_s=0.6, gamma=1, chunk_size=16)
  greedy = np.asarray(kernel.kernel_sample(
      bank, num_samples=3, rng=jax.random.key(1), temperature=0.0, **common))
  hist = np.asarray(kernel.kernel_histograms(bank, greedy, **common))
  np.testing.assert_array_equal(hist.argmax(-1), greedy)
  drawn = np.asarray(kernel.kernel_sample(
      bank, num_samples=3, rng=jax.random.key(2), **common))
  hist = np.asarray(kernel.kernel_histograms(bank, drawn, **common))
  chosen = np.take_along_axis(hist, drawn[..., None], -1)
  assert (chosen > 1e-6).all()  # every drawn token had real probability
  # Per-sample keys fold_in(rng, s): a smaller batch gives the same samples.
  fewer = np.asarray(kernel.kernel_sample(
      bank, num_samples=2, rng=jax.random.key(2), **common))
  np.testing.assert_array_equal(fewer, drawn[:2])


def test_sampling_frequencies_match_histogram():
  # gamma=0 with one token per position: tokens are independent, each with
  # the histogram mean_n K(v | z^n_i); check a chi-square-like bound.
  rng = np.random.default_rng(9)
  bank = rng.integers(0, 4, (20, 1, 2, 1))
  common = dict(group=2, sigma_s=0.8, gamma=0, chunk_size=8)
  samples = np.asarray(kernel.kernel_sample(
      bank, num_samples=2000, rng=jax.random.key(4), **common))
  kmat = kernel.kernel_matrix(2, 0.8)
  for j in range(2):
    expected = kmat[bank[:, 0, j, 0]].mean(0)  # [4]
    counts = np.bincount(samples[:, 0, j, 0], minlength=4)
    assert np.all(np.abs(counts / 2000 - expected) <
                  5 * np.sqrt(expected * (1 - expected) / 2000) + 1e-3)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3),
       st.sampled_from([0, 1, 2, 3, None]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_schedule_rebuilds_every_context(height, width, tp, gamma, random,
                                         seed):
  positions = (np.random.default_rng(seed).permutation(height * width)
               if random else np.arange(height * width))
  sched = kernel_schedule.build_schedule(height, width, tp, gamma, positions,
                                         group=3)
  state = np.zeros(height * width * tp)
  step = 0
  for pos in positions:
    for k in range(tp):
      first, count = sched.first[step], sched.count[step]
      for o in range(first, first + count):
        if sched.reset[o]:
          state[:] = 0
        np.add.at(state, sched.idx[o], sched.sign[o])
      expected = np.zeros_like(state)
      for qi, qj, kk in reference_context(height, width, tp, gamma,
                                          positions, pos, k):
        expected[(qi * width + qj) * tp + kk] = 1
      np.testing.assert_array_equal(state, expected)
      assert sched.token[step] == int(pos) * tp + k
      step += 1
  assert step == len(sched.token)


def test_closed_forms_and_validation():
  assert kernel.flip_probability(1.0) == pytest.approx(0.15865525393145707)
  kmat = kernel.kernel_matrix(3, 0.5)
  p = kernel.flip_probability(0.5)
  assert kmat[0b101, 0b011] == pytest.approx(p**2 * (1 - p))
  np.testing.assert_allclose(kmat.sum(1), 1.0)
  assert parse_gamma("global") is None
  assert parse_gamma(3) == 3
  for bad in ("wide", -1, 1.5):
    with pytest.raises(ValueError):
      parse_gamma(bad)
  with pytest.raises(ValueError):
    kernel_schedule.generation_order(2, 2, [0, 1, 1, 3])
  with pytest.raises(ValueError):
    kernel.prepare_bank(np.full((2, 2, 2, 1), 8), group=3)


def test_memory_bound_does_not_grow_with_the_bank():
  small = kernel.prepare_bank(np.zeros((128, 4, 4, 1), np.int32), group=7,
                              chunk_size=32)
  large = kernel.prepare_bank(np.zeros((1024, 4, 4, 1), np.int32), group=7,
                              chunk_size=32)
  m_small = kernel.kernel_memory_bytes(small, 64, 12)
  m_large = kernel.kernel_memory_bytes(large, 64, 12)
  assert m_small["chunk_temporaries"] == m_large["chunk_temporaries"]
  assert m_large["state"] == large.chunks.shape[0] * 32 * 64 * 4


# ---------------------------------------------------------------------------
# Wavefront order: raster order's tokens, several positions a step.
# ---------------------------------------------------------------------------


def wavefront_index(width, gamma, pos):
  """Brute force: the step of position pos is r (gamma_eff + 1) + c."""
  g = None if gamma in (None, "global") else gamma
  skew = width if g is None or g >= width - 1 else g + 1
  r, c = divmod(int(pos), width)
  return r * skew + c


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 7), st.integers(1, 3),
       st.sampled_from([0, 1, 2, 3, 9, None]))
def test_wavefront_schedule_brute_force(height, width, tp, gamma):
  """Every lane's state is exactly the token's raster context when it draws,
  and its ops read only tokens of earlier steps (a lane between two grid rows
  prepares the next row's context early); Tp (W + (H-1)(ge+1)) steps."""
  sched = kernel_schedule.build_wavefront_schedule(height, width, tp, gamma,
                                                   group=3)
  g_eff = width - 1 if gamma is None or gamma >= width - 1 else gamma
  steps = tp * (width + (height - 1) * (g_eff + 1))
  assert sched.num_steps == steps == kernel_schedule.wavefront_steps(
      height, width, tp, gamma)
  assert sched.lanes == -(-width // (g_eff + 1))
  num_tok = height * width * tp
  raster = np.arange(height * width)
  state = np.zeros((sched.lanes, num_tok))
  step_of = np.full(num_tok, -1)  # the step that draws each token
  for step in range(sched.num_steps):
    first, count = sched.first[step], sched.count[step]
    for o in range(first, first + count):
      for lane in range(sched.lanes):
        if sched.reset[o, lane]:
          state[lane] = 0
        used = sched.idx[o, lane][sched.sign[o, lane] != 0]
        assert (0 <= step_of[used]).all() and (step_of[used] < step).all()
        np.add.at(state[lane], sched.idx[o, lane], sched.sign[o, lane])
    for lane in np.flatnonzero(sched.active[step]):
      t = int(sched.token[step, lane])
      assert step_of[t] == -1  # drawn once
      pos, k = divmod(t, tp)
      expected = np.zeros(num_tok)
      for qi, qj, kk in reference_context(height, width, tp, gamma, raster,
                                          pos, k):
        q = (qi * width + qj) * tp + kk
        expected[q] = 1
        assert 0 <= step_of[q] < step  # drawn at an earlier step
      np.testing.assert_array_equal(state[lane], expected)
      assert step == wavefront_index(width, gamma, pos) * tp + k
      assert lane == (pos // width) % sched.lanes
      step_of[t] = step
  assert (step_of >= 0).all()  # every token drawn


def test_wavefront_step_counts():
  assert kernel_schedule.wavefront_steps(32, 32, 1, 5) == 218
  assert kernel_schedule.wavefront_steps(8, 8, 2, 5) == 2 * (8 + 7 * 6)
  for gamma in (31, 40, None, "global"):  # raster order: one position a step
    assert kernel_schedule.wavefront_steps(32, 32, 1, gamma) == 1024
    assert kernel_schedule.wavefront_lanes(32, gamma) == 1
  assert kernel_schedule.wavefront_lanes(32, 5) == 6
  sched = kernel_schedule.build_wavefront_schedule(8, 8, 2, 5, group=7,
                                                   max_tokens=9)
  assert sched.active.sum() <= 9 and sched.num_steps == 9  # one token a step


# Wavefront and raster decoding form each histogram from the same context with
# the same float operations and shapes per lane, so on CPU the histograms are
# bitwise equal and no draw can flip (measured: 0 differing tokens in every
# case below). Elsewhere a different summation order could change round-off;
# then a draw may flip only at a near-tie, allowed for at most 1% of tokens.
@pytest.mark.parametrize(
    "num,height,width,tp,group,sigma_s,gamma,samples",
    [(40, 4, 5, 1, 3, 0.7, 1, 3),
     (30, 3, 4, 2, 2, 0.5, 0, 1),
     (50, 5, 7, 2, 3, 0.6, 2, 4),
     (35, 4, 6, 1, 4, 0.4, 2, 2),
     (45, 3, 4, 2, 3, 0.5, 9, 3),           # gamma > W: raster order
     (25, 6, 3, 1, 3, 0.3, "global", 2),
     (60, 7, 9, 1, 3, 0.5, 1, 5)])
def test_wavefront_equals_raster(num, height, width, tp, group, sigma_s,
                                 gamma, samples):
  rng = np.random.default_rng(num + width)
  bank = rng.integers(0, 2**group, (num, height, width, tp))
  key = jax.random.key(num)
  common = dict(group=group, sigma_s=sigma_s, gamma=gamma, chunk_size=16)
  for temperature in (1.0, 0.0):
    raster = np.asarray(kernel.kernel_sample(
        bank, num_samples=samples, rng=key, temperature=temperature,
        **common))
    front = np.asarray(kernel.kernel_sample(
        bank, num_samples=samples, rng=key, temperature=temperature,
        order="wavefront", **common))
    h_raster = np.asarray(kernel.kernel_histograms(bank, raster, **common))
    h_front = np.asarray(kernel.kernel_histograms(bank, raster,
                                                  order="wavefront", **common))
    np.testing.assert_allclose(h_front, h_raster, atol=1e-6, rtol=1e-5)
    flips = int((front != raster).sum())
    if jax.default_backend() == "cpu":
      np.testing.assert_array_equal(h_front, h_raster)
    if np.array_equal(h_front, h_raster):
      assert flips == 0
    else:
      assert flips <= 0.01 * raster.size


def test_wavefront_batched_product_equals_lane_products(monkeypatch):
  # Accelerators run the lanes' updates as one batched product, CPU as L
  # products (kernel_wavefront.lane_dots_default); both are exact.
  rng = np.random.default_rng(4)
  bank = rng.integers(0, 8, (40, 4, 7, 2))
  common = dict(group=3, sigma_s=0.5, gamma=1, chunk_size=16,
                num_samples=2, rng=jax.random.key(5))
  lanes = np.asarray(kernel.kernel_sample(bank, order="wavefront", **common))
  monkeypatch.setattr(kernel_wavefront, "lane_dots_default", lambda mesh: False)
  batched = np.asarray(kernel.kernel_sample(bank, order="wavefront", **common))
  np.testing.assert_array_equal(batched, lanes)
  np.testing.assert_array_equal(
      batched, np.asarray(kernel.kernel_sample(bank, **common)))


@pytest.mark.parametrize("order", ["raster", "random", "wavefront"])
def test_popcount_and_product_updates_are_identical(monkeypatch, order):
  """The two exact forms of the update (kernel.popcount_default) give the
  same histograms bit for bit, and so the same tokens."""
  rng = np.random.default_rng(6)
  group = 5
  bank = rng.integers(0, 2**group, (50, 4, 6, 2))
  common = dict(group=group, sigma_s=0.6, gamma=2, chunk_size=16,
                order=order, rng=jax.random.key(7))
  draws = {}
  for popcount in (True, False):
    monkeypatch.setattr(kernel, "popcount_default",
                        lambda mesh, p=popcount: p)
    tokens = np.asarray(kernel.kernel_sample(bank, num_samples=3, **common))
    hists = np.asarray(kernel.kernel_histograms(bank, tokens, **common))
    draws[popcount] = tokens, hists
  np.testing.assert_array_equal(draws[True][0], draws[False][0])
  np.testing.assert_array_equal(draws[True][1], draws[False][1])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.data())
def test_popcount_delta_is_the_signed_inner_product(group, data):
  """Against unpacked +-1 bits and a numpy dot product."""
  s, k, c = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 5),
                                st.integers(1, 6)))
  ints = st.integers(0, 2**group - 1)
  x = np.array(data.draw(st.lists(ints, min_size=s * k, max_size=s * k)),
               np.int32).reshape(s, k)
  z = np.array(data.draw(st.lists(ints, min_size=k * c, max_size=k * c)),
               np.int32).reshape(k, c)
  sign = np.array(data.draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]),
                                     min_size=k, max_size=k)), np.float32)
  shifts = np.arange(group - 1, -1, -1)
  xb = 2 * ((x[..., None] >> shifts) & 1) - 1  # [s, k, g]
  zb = 2 * ((z[..., None] >> shifts) & 1) - 1  # [k, c, g]
  want = np.einsum("skg,kcg,k->sc", xb, zb, sign)
  got = np.asarray(kernel_wavefront.popcount_delta(x, sign, z, group))
  np.testing.assert_array_equal(got, want)


def test_wavefront_sharded_and_sampler_equal_raster():
  mesh = mesh8()
  rng = np.random.default_rng(3)
  group, sigma_s, gamma = 3, 0.6, 1
  bank = rng.integers(0, 2**group, (101, 5, 6, 2))  # padding on 8 devices
  key = jax.random.key(8)
  common = dict(group=group, sigma_s=sigma_s, gamma=gamma, num_samples=3,
                rng=key)
  raster = np.asarray(kernel.kernel_sample(bank, chunk_size=1000, **common))
  front = np.asarray(kernel.kernel_sample(bank, chunk_size=5, mesh=mesh,
                                          order="wavefront", **common))
  np.testing.assert_array_equal(front, raster)
  # max_tokens keeps whole steps: their tokens are raster's, the rest 0.
  part = np.asarray(kernel.kernel_sample(bank, chunk_size=16, max_tokens=10,
                                         order="wavefront", **common))
  sched = kernel_schedule.build_wavefront_schedule(5, 6, 2, gamma, group,
                                                   max_tokens=10)
  drawn = np.zeros(5 * 6 * 2, bool)
  drawn[sched.token[sched.active]] = True
  flat_part, flat_raster = part.reshape(3, -1), raster.reshape(3, -1)
  np.testing.assert_array_equal(flat_part[:, drawn], flat_raster[:, drawn])
  assert (flat_part[:, ~drawn] == 0).all() and 0 < drawn.sum() <= 10
  # The sampler interface passes the order through.
  from mesp_jax.sample import samplers
  prepared = kernel.prepare_bank(bank, group=group, chunk_size=8, mesh=mesh)
  tokens = {}
  for order in ("raster", "wavefront"):
    sampler = samplers.KernelSampler(prepared, sigma_s=sigma_s, gamma=gamma,
                                     order=order)
    tokens[order], _ = samplers.draw(sampler, key, 4, 2)
  np.testing.assert_array_equal(tokens["wavefront"], tokens["raster"])


def test_wavefront_memory_has_one_state_per_lane():
  bank = kernel.prepare_bank(np.zeros((256, 8, 8, 2), np.int32), group=7,
                             chunk_size=64)
  raster = kernel.kernel_memory_bytes(bank, 4, 7)
  front = kernel.kernel_memory_bytes(bank, 4, 7, lanes=2)
  assert front["state"] == 2 * raster["state"] == 2 * 256 * 4 * 4
  assert front["chunk_temporaries"] == 2 * raster["chunk_temporaries"]
