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
from mesp_jax.sample import kernel, kernel_schedule


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
