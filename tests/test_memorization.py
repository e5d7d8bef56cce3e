"""Memorisation: exact nearest neighbours against brute-force numpy."""

import jax
import numpy as np
import pytest

from mesp_jax.base.sharding import make_mesh
from mesp_jax.eval import memorization as mem


def meshes():
  out = [None]
  if jax.device_count() >= 8:
    out.append(make_mesh(devices=jax.devices()[:8]))
  return out


def brute_force(queries, refs, metric):
  q = np.asarray(queries, np.float64)[:, None, :]
  r = np.asarray(refs, np.float64)[None, :, :]
  if metric == "l2":
    dist = np.sqrt(((q - r) ** 2).sum(-1))
  elif metric == "l1":
    dist = np.abs(q - r).sum(-1)
  else:
    dist = (q != r).sum(-1)
  return dist.argmin(1), dist.min(1)


@pytest.mark.parametrize("metric", ["l2", "l1", "hamming"])
def test_nearest_neighbours_match_brute_force(metric):
  rng = np.random.default_rng(0)
  if metric == "hamming":
    refs = rng.choice([-1.0, 1.0], (150, 40))
    queries = rng.choice([-1.0, 1.0], (6, 40))
    queries[1] = refs[77]
  else:
    refs = rng.normal(size=(150, 24))
    queries = rng.normal(size=(6, 24))
    queries[1] = refs[77] + 1e-3
  want_idx, want_dist = brute_force(queries, refs, metric)
  for mesh in meshes():
    for chunk in (7, 1000):
      idx, dist = mem.nearest_neighbours(queries, refs, metric,
                                         chunk_size=chunk, mesh=mesh)
      np.testing.assert_array_equal(idx, want_idx)
      np.testing.assert_allclose(dist, want_dist, rtol=1e-5, atol=1e-4)


def test_l2_is_exact_where_float32_matmul_cancels():
  # Values near 1000 with differences near 1e-2: ||q||^2 - 2 q.r + ||r||^2
  # in float32 without centring and rechecking loses these differences.
  rng = np.random.default_rng(1)
  base = 1000.0 + rng.normal(size=(1, 64))
  refs = base + 1e-2 * rng.normal(size=(120, 64))
  queries = base + 1e-2 * rng.normal(size=(5, 64))
  q32, r32 = queries.astype(np.float32), refs.astype(np.float32)
  want_idx, _ = brute_force(q32, r32, "l2")
  naive = ((q32 * q32).sum(1)[:, None] - 2 * q32 @ r32.T +
           (r32 * r32).sum(1)[None, :])
  assert (naive.argmin(1) != want_idx).any()  # the trap is real
  idx, _ = mem.nearest_neighbours(queries, refs, "l2", chunk_size=32)
  np.testing.assert_array_equal(idx, want_idx)


def test_nearest_latents_match_brute_force_popcount():
  rng = np.random.default_rng(2)
  bank = rng.integers(0, 128, (90, 3, 3, 2))
  samples = rng.integers(0, 128, (5, 3, 3, 2))
  samples[3] = bank[41]
  samples[4] = bank[12]
  samples[4, 1, 2, 0] ^= 4  # one bit away
  xor = np.bitwise_xor(samples.reshape(5, 1, -1), bank.reshape(1, 90, -1))
  ham = np.vectorize(lambda v: bin(int(v)).count("1"))(xor).sum(-1)
  for mesh in meshes():
    idx, dist = mem.nearest_latents(samples, bank, group=7, chunk_size=16,
                                    mesh=mesh)
    np.testing.assert_array_equal(idx, ham.argmin(1))
    np.testing.assert_array_equal(dist, ham.min(1))
  assert dist[3] == 0 and dist[4] == 1


def test_psnr_and_copy_rates():
  rng = np.random.default_rng(3)
  a = rng.uniform(-1, 1, (4, 5, 5, 3))
  b = np.clip(a + 0.05 * rng.normal(size=a.shape), -1, 1)
  a255, b255 = (a + 1) * 127.5, (b + 1) * 127.5
  mse = ((a255 - b255) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(mem.psnr(a, b), 20 * np.log10(255 / np.sqrt(mse)))
  assert np.isinf(mem.psnr(a, a)).all()
  assert mem.copy_rate(np.array([24.9, 25.0, 40.0, np.inf])) == 0.75
  assert mem.latent_copy_rate(np.array([0, 1, 2, 3]), 100, 0.02) == 0.75


def test_memorization_report_counts_planted_copies():
  rng = np.random.default_rng(4)
  train = rng.uniform(-1, 1, (30, 6, 6, 1))
  samples = rng.uniform(-1, 1, (5, 6, 6, 1))
  samples[0] = train[7]
  samples[1] = np.clip(train[19] + 0.01 * rng.normal(size=(6, 6, 1)), -1, 1)
  recons = np.clip(train + 0.2 * rng.normal(size=train.shape), -1, 1)
  bank = rng.integers(0, 16, (30, 6, 6, 1))
  tokens = rng.integers(0, 16, (5, 6, 6, 1))
  tokens[2] = bank[3]
  report = mem.memorization_report(
      samples, train, train_recons=recons, sample_tokens=tokens,
      bank_tokens=bank, group=4)
  assert report["copy_rate"] == pytest.approx(2 / 5)
  np.testing.assert_array_equal(report["nearest"][:2], [7, 19])
  np.testing.assert_array_equal(report["is_copy"],
                                [True, True, False, False, False])
  assert report["psnr_quantiles"]["q1.00"] == np.inf
  assert report["copy_rate_recon"] <= report["copy_rate"]
  assert report["copy_rate_latent"] == pytest.approx(1 / 5)
  assert report["nearest_latent"][2] == 3 and report["hamming"][2] == 0

  grid = mem.triplet_grid(samples, train[report["nearest"]], pad=1)
  assert grid.shape == (5 * 7 + 1, 3 * 7 + 1, 3) and grid.dtype == np.uint8
  want = np.rint((samples[0, ..., 0] + 1) * 127.5).astype(np.uint8)
  np.testing.assert_array_equal(grid[1:7, 1:7, 0], want)  # the sample
  np.testing.assert_array_equal(grid[1:7, 15:21], 0)  # |difference| of a copy


def test_non_copy_filter_matches_brute_force_psnr():
  """The authors' protocol keeps the samples whose nearest training image
  lies below 25 dB; brute force: every pair's PSNR in numpy (float64)."""
  rng = np.random.default_rng(7)
  train = rng.uniform(-1, 1, (40, 6, 6, 1)).astype(np.float32)
  samples = rng.uniform(-1, 1, (12, 6, 6, 1)).astype(np.float32)
  # Near copies at noise levels whose PSNR straddles 25 dB (20 log10(2 /
  # noise): inf, 40, 30.5, 26, 23.7 and 20 dB).
  for i, noise in enumerate([0.0, 0.02, 0.06, 0.1, 0.13, 0.2]):
    samples[i] = np.clip(train[3 * i] + noise * rng.normal(size=(6, 6, 1)),
                         -1, 1)
  report = mem.memorization_report(samples, train)
  keep = mem.non_copies(report["psnr"], 25.0)
  a = (samples.astype(np.float64) + 1) * 127.5
  b = (train.astype(np.float64) + 1) * 127.5
  mse = ((a[:, None] - b[None]) ** 2).mean(axis=(2, 3, 4))  # [S, N]
  with np.errstate(divide="ignore"):
    best = 10 * np.log10(255.0**2 / mse.min(axis=1))
  np.testing.assert_array_equal(keep, best < 25.0)
  assert 3 <= (~keep).sum() <= 5 and keep.sum() >= 7
