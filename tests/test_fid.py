"""Frechet distance, KID, IS, precision/recall, reference cache, feature net.

Each metric is checked against an independent reference: scipy's sqrtm, a
python double loop, closed-form cases, brute-force neighbour search.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from mesp_jax.eval import fid
from mesp_jax.models import feature_net as fnet


def _sqrtm_reference(mu1, s1, mu2, s2, eps=1e-6) -> float:
  """The reference FID formula (pytorch-fid / TTUR): sqrtm of s1 s2."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,dim", [(400, 16), (20, 32), (12, 64)])
def test_frechet_distance_matches_sqrtm(n, dim):
  # n <= dim gives rank-deficient (singular) covariances.
  rng = np.random.default_rng(n + dim)
  a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
  b = rng.normal(size=(n + 5, dim)) * 1.5 + 0.3
  s_a, s_b = fid.feature_stats(a), fid.feature_stats(b)
  got = fid.frechet_distance(*s_a, *s_b)
  np.testing.assert_allclose(got, _sqrtm_reference(*s_a, *s_b), rtol=1e-6)
  np.testing.assert_allclose(fid.frechet_distance_from_features(a, b), got,
                             rtol=1e-12)
  # Identical statistics: ~0 relative to the scale of the covariance.
  same = fid.frechet_distance(*s_a, *s_a)
  assert abs(same) < 1e-6 * np.trace(s_a[1])


def test_frechet_distance_one_dimensional_closed_form():
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
  got = fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]])
  np.testing.assert_allclose(got, 4.0 + 1.0, rtol=1e-12)
  with pytest.raises(ValueError, match="shape mismatch"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_stats_and_accumulator():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(37, 5)) * 100 + 1e4  # large offset: cancellation
  mu, sigma = fid.feature_stats(f)
  centred = f - f.mean(0)
  np.testing.assert_allclose(mu, f.sum(0) / 37, rtol=1e-12)
  np.testing.assert_allclose(sigma, centred.T @ centred / 36, rtol=1e-10)
  acc = fid.StatsAccumulator()
  for start in range(0, 37, 10):
    acc.update(f[start:start + 10])
  mu2, sigma2 = acc.result()
  np.testing.assert_allclose(mu2, mu, rtol=1e-12)
  np.testing.assert_allclose(sigma2, sigma, rtol=1e-8)


def _mmd2_double_loop(x, y) -> float:
  k = lambda a, b: (float(np.dot(a, b)) / len(a) + 1.0) ** 3
  m, n = len(x), len(y)
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
  return kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2 * kxy / (m * n)


def test_kid_matches_double_loop():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(15, 4))
  y = rng.normal(size=(15, 4)) + 0.5
  ref = _mmd2_double_loop(x, y)
  np.testing.assert_allclose(fid.mmd2_unbiased(x, y), ref, rtol=1e-10)
  np.testing.assert_allclose(fid.mmd2_unbiased(x, y[:9]),
                             _mmd2_double_loop(x, y[:9]), rtol=1e-10)
  # Subsets of the full size are permutations: every subset gives ref.
  mean, std = fid.kid(x, y, num_subsets=3, subset_size=100, rng=0)
  np.testing.assert_allclose(mean, ref, rtol=1e-10)
  assert std < 1e-10 * abs(ref)


def test_kid_subsets_are_unbiased_for_identical_distributions():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 3))
  mean, std = fid.kid(x, x.copy(), num_subsets=20, subset_size=50, rng=3)
  assert abs(mean) < 3 * std / np.sqrt(20) + 1e-3
  assert std > 0


def test_inception_score_closed_forms():
  k = 4
  onehot = np.tile(np.eye(k), (5, 1))  # [20, 4], classes evenly spread
  mean, std = fid.inception_score(onehot, splits=5, from_logits=False)
  np.testing.assert_allclose(mean, k, rtol=1e-12)
  assert std < 1e-12
  uniform = np.full((20, k), 1.0 / k)
  np.testing.assert_allclose(
      fid.inception_score(uniform, splits=2, from_logits=False)[0], 1.0,
      rtol=1e-12)
  logits = np.random.default_rng(4).normal(size=(30, 7)) * 3
  np.testing.assert_allclose(
      fid.inception_score(logits, splits=3),
      fid.inception_score(fid.softmax_probs(logits), splits=3,
                          from_logits=False), rtol=1e-10)


def test_precision_recall():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(50, 6))
  assert fid.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
  # 1-D by hand, k=1: real radii are 1; fake radii are 9.5.
  real = np.arange(5.0)[:, None]
  fake = np.array([[0.5], [10.0]])
  assert fid.precision_recall(real, fake, k=1) == (0.5, 1.0)
  # Brute force on random sets.
  real, fake = rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 0.7

  def brute(a, b, k):
    da = np.linalg.norm(a[:, None] - a[None], axis=-1)
    radii = np.sort(da, axis=1)[:, k]
    db = np.linalg.norm(b[:, None] - a[None], axis=-1)
    return np.mean(np.any(db <= radii[None], axis=1))

  p, r = fid.precision_recall(real, fake, k=3, chunk=7)
  np.testing.assert_allclose(p, brute(real, fake, 3))
  np.testing.assert_allclose(r, brute(fake, real, 3))


def test_reference_stats_cache(tmp_path):
  rng = np.random.default_rng(6)
  feats = rng.normal(size=(30, 4))
  calls = []

  def compute():
    calls.append(1)
    return feats

  name = fnet.feature_net_name("fashion_mnist")
  assert name == "fd_fashion_mnist_classifier"
  s1 = fid.ReferenceStats.load_or_compute(str(tmp_path), "fashion_mnist",
                                          "train", name, compute,
                                          max_features=10)
  path = fid.ReferenceStats.path(str(tmp_path), "fashion_mnist", "train",
                                 name)
  assert os.path.exists(path)
  base = os.path.basename(path)
  assert "fashion_mnist" in base and "train" in base and name in base
  s2 = fid.ReferenceStats.load_or_compute(str(tmp_path), "fashion_mnist",
                                          "train", name, compute)
  assert len(calls) == 1  # second call loaded the file
  np.testing.assert_array_equal(s2.mu, feats.mean(0))
  np.testing.assert_array_equal(s2.sigma, s1.sigma)
  np.testing.assert_array_equal(s2.features, feats[:10])
  assert s2.num_samples == 30
  np.testing.assert_allclose(s2.frechet_distance(feats), 0.0, atol=1e-9)


# ----------------------------------------------------------------------------
# Feature net.
# ----------------------------------------------------------------------------


def _key(seed: int) -> jax.Array:
  # XLA on this CPU compiles threefry initialisers very slowly (~10 s for a
  # small net); the 'rbg' generator compiles in a fraction of that.
  return jax.random.key(seed, impl="rbg")


@pytest.mark.parametrize("channels", [1, 3])
def test_feature_net_shapes(channels):
  model = fnet.FeatureNet(num_classes=10, widths=(8, 16, 32))
  x = jnp.zeros((2, 32, 32, channels))
  variables = jax.jit(model.init)(_key(0), x)
  logits = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 10)
  # Host helper (fixed batch 2, last batch padded) against the direct
  # features of hand-made batches of 2.
  imgs = np.random.default_rng(7).uniform(-1, 1, (3, 32, 32, channels))
  imgs = imgs.astype(np.float32)
  host = fnet.classifier_features(model, variables["params"], imgs,
                                  batch_size=2)
  assert host.shape == (3, fnet.FEATURE_DIM)
  direct = jax.jit(functools.partial(model.apply,
                                     method=fnet.FeatureNet.features))
  np.testing.assert_allclose(host[:2], direct(variables, imgs[:2]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(host[2], direct(variables, imgs[[2, 0]])[0],
                             rtol=1e-5, atol=1e-6)


def test_classifier_loss_matches_numpy():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 1, 4, 2, 2, 3])
  loss, metrics = fnet.classifier_loss(jnp.asarray(logits),
                                       jnp.asarray(labels))
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  ref = -np.mean(np.log(p[np.arange(6), labels]))
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]),
                             np.mean(logits.argmax(1) == labels))


def test_feature_net_learns_a_fixed_batch():
  model = fnet.FeatureNet(num_classes=4, widths=(8, 16), num_groups=4)
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 1)), jnp.float32)
  y = jnp.asarray(np.arange(8) % 4)
  params = jax.jit(model.init)(_key(1), x)["params"]

  @jax.jit
  def step(p):
    def loss_fn(p):
      return fnet.classifier_loss(model.apply({"params": p}, x, train=True),
                                  y)[0]
    loss, g = jax.value_and_grad(loss_fn)(p)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), loss

  losses = []
  for _ in range(8):
    params, loss = step(params)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
