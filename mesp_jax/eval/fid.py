"""Distances between image sets in a feature space: FD/FID, KID, IS, P&R.

Everything here works on host feature arrays ``[N, D]`` (numpy, float64
arithmetic). The feature net is a separate choice: the standard FID
Inception-v3 (:mod:`mesp_jax.eval.inception`, "FID" proper) or the project's
own classifier (:mod:`mesp_jax.models.feature_net`, reported under an honest
name such as ``fd_fashion_mnist_classifier``, never "FID").
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable

import numpy as np
from scipy.special import log_softmax, softmax

from mesp_jax.base import io as mio

# ----------------------------------------------------------------------------
# Gaussian statistics and the Frechet distance.
# ----------------------------------------------------------------------------


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features.

  Args:
    features: [N, D], N >= 2.

  Returns:
    (mu [D], sigma [D, D]) in float64; sigma is the unbiased (N - 1)
    covariance, as in the reference FID code.
  """
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


class StatsAccumulator:
  """Streaming mean and covariance for feature sets too large to hold.

  Sums are kept in float64 around a shift (the first batch's mean), which
  avoids the cancellation of the naive ``E[x x^T] - mu mu^T``.
  """

  def __init__(self):
    self.n = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, features) -> None:
    """Adds a batch of features [B, D]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
      raise ValueError(f"features must be [B, D], got {f.shape}")
    if self._shift is None:
      self._shift = f.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((f.shape[1], f.shape[1]))
    c = f - self._shift  # [B, D]
    self._sum += c.sum(axis=0)
    self._outer += c.T @ c
    self.n += f.shape[0]

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]), identical to :func:`feature_stats`."""
    if self.n < 2:
      raise ValueError("need at least 2 samples")
    mean_c = self._sum / self.n
    sigma = (self._outer - self.n * np.outer(mean_c, mean_c)) / (self.n - 1)
    return self._shift + mean_c, sigma


def _sym_sqrt_psd(s: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root by eigh (negative round-off clipped to 0)."""
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  ``d^2 = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^{1/2})``.

  Method: ``s1 s2`` is similar to the symmetric PSD matrix
  ``M = s1^{1/2} s2 s1^{1/2}``, so ``tr((s1 s2)^{1/2}) = sum_k sqrt(l_k(M))``.
  Both steps are symmetric eigen-decompositions (``eigh``) in float64, with
  negative round-off eigenvalues clipped to 0. This needs no matrix inverse
  and no eps offset, so rank-deficient covariances (fewer samples than
  feature dimensions, dead features) are handled exactly, where
  ``scipy.linalg.sqrtm(s1 @ s2)`` may return a complex or inaccurate result
  and the reference code falls back to adding ``eps * I``.

  Args:
    mu1, mu2: [D] means.
    sigma1, sigma2: [D, D] covariances.

  Returns:
    The (squared) Frechet distance as a python float, >= 0 up to round-off.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(
        f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 "
        f"{s1.shape}, sigma2 {s2.shape}")
  for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1),
                  ("sigma2", s2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} has non-finite entries")
  s1 = 0.5 * (s1 + s1.T)
  s2 = 0.5 * (s2 + s2.T)
  r1 = _sym_sqrt_psd(s1)
  m = r1 @ s2 @ r1
  eig = np.linalg.eigvalsh(0.5 * (m + m.T))
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_from_features(f1, f2) -> float:
  """:func:`frechet_distance` of the Gaussian fits to two feature sets."""
  return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def frechet_distance_to_samples(mu: np.ndarray, sigma: np.ndarray,
                                features: np.ndarray) -> float:
  """Frechet distance between N(mu, sigma) and the Gaussian fit of features.

  Equal to ``frechet_distance(mu, sigma, *feature_stats(features))``
  but, for S - 1 < D samples, computed through the rank of the sample
  covariance: with ``s2 = A A^T``, ``A = (f - mean)^T / sqrt(S - 1)`` [D, S],
  the non-zero eigenvalues of ``sigma s2`` (whose square roots sum to
  ``tr((sigma s2)^{1/2})``) are those of the PSD [S, S] matrix
  ``A^T sigma A``. That costs O(D^2 S + S^3) instead of two D x D eigen
  decompositions (seconds each for D = 1024 pixels on a busy CPU).

  Args:
    mu: [D] reference mean.
    sigma: [D, D] reference covariance (symmetric PSD).
    features: [S, D], S >= 2.
  """
  f = np.asarray(features, np.float64)
  num, dim = f.shape
  if num - 1 >= dim:
    return frechet_distance(mu, sigma, *feature_stats(f))
  mean = f.mean(axis=0)  # [D]
  a = (f - mean).T / np.sqrt(num - 1)  # [D, S]
  sig = 0.5 * (sigma + sigma.T)
  m = a.T @ sig @ a  # [S, S]
  eig = np.linalg.eigvalsh(0.5 * (m + m.T))
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = np.asarray(mu, np.float64) - mean
  return float(diff @ diff + np.trace(sig) + np.sum(a * a) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------
# KID.
# ----------------------------------------------------------------------------


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """k(x, y) = (x . y / d + 1)^3 for rows of x [m, d], y [n, d] -> [m, n]."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
  """Unbiased MMD^2 with the cubic polynomial kernel (one subset).

  ``sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j)
  / (n (n - 1)) - 2 sum_{i, j} k(x_i, y_j) / (m n)``.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  m, n = x.shape[0], y.shape[0]
  if m < 2 or n < 2:
    raise ValueError("need at least 2 samples in each set")
  kxx = _poly_kernel(x, x)
  kyy = _poly_kernel(y, y)
  kxy = _poly_kernel(x, y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
               - 2.0 * kxy.mean())


def kid(f1, f2, num_subsets: int = 100, subset_size: int = 1000,
        rng: np.random.Generator | int | None = 0) -> tuple[float, float]:
  """Kernel Inception Distance (Binkowski et al. 2018).

  The unbiased MMD^2 (:func:`mmd2_unbiased`) averaged over ``num_subsets``
  random subsets of ``subset_size`` rows drawn without replacement from each
  set. ``subset_size`` is clipped to the smaller set size.

  Args:
    f1, f2: [N1, D], [N2, D] features.
    num_subsets: number of subsets.
    subset_size: rows per subset.
    rng: numpy Generator or seed (deterministic by default).

  Returns:
    (mean, std) of the per-subset MMD^2 (std is 0 for one subset).
  """
  f1 = np.asarray(f1, np.float64)
  f2 = np.asarray(f2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"features must be [N, D] with equal D: {f1.shape}, "
                     f"{f2.shape}")
  rng = np.random.default_rng(rng)
  m = min(subset_size, f1.shape[0], f2.shape[0])
  vals = np.empty(num_subsets)
  for s in range(num_subsets):
    x = f1[rng.choice(f1.shape[0], m, replace=False)]
    y = f2[rng.choice(f2.shape[0], m, replace=False)]
    vals[s] = mmd2_unbiased(x, y)
  return float(vals.mean()), float(vals.std())


# ----------------------------------------------------------------------------
# Inception score.
# ----------------------------------------------------------------------------


def inception_score(scores, splits: int = 10,
                    from_logits: bool = True) -> tuple[float, float]:
  """Inception score ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` parts.

  Args:
    scores: [N, K] logits (``from_logits=True``; softmax is taken here, e.g.
      the 1008-way logits of the FID Inception, which leave out the fc bias
      as the reference does) or class probabilities.
    splits: number of equal parts; p(y) is the mean within each part.
    from_logits: whether ``scores`` are logits.

  Returns:
    (mean, std) over the parts.
  """
  s = np.asarray(scores, np.float64)
  if s.ndim != 2 or s.shape[0] < splits:
    raise ValueError(f"scores must be [N >= splits, K], got {s.shape}")
  if from_logits:
    log_p = log_softmax(s, axis=1)
  else:
    with np.errstate(divide="ignore"):
      log_p = np.log(s / s.sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  values = []
  for part in np.array_split(np.arange(s.shape[0]), splits):
    p_y = p[part].mean(axis=0)  # [K]
    with np.errstate(divide="ignore", invalid="ignore"):
      kl = np.where(p[part] > 0, p[part] * (log_p[part] - np.log(p_y)), 0.0)
    values.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(values)), float(np.std(values))


def softmax_probs(logits) -> np.ndarray:
  """Float64 softmax over the last axis (for IS from stored logits)."""
  return softmax(np.asarray(logits, np.float64), axis=-1)


# ----------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019).
# ----------------------------------------------------------------------------


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances [len(a), len(b)], clipped at 0."""
  d = (np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :]
       - 2.0 * a @ b.T)
  return np.maximum(d, 0.0)


def _knn_radii_sq(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
  """Squared distance of each row to its k-th nearest other row."""
  out = np.empty(x.shape[0])
  for i in range(0, x.shape[0], chunk):
    d = _sq_dists(x[i:i + chunk], x)  # [c, N], includes self at ~0
    # Index k: position 0 is the point itself.
    out[i:i + chunk] = np.partition(d, k, axis=1)[:, k]
  return out


def _coverage(manifold: np.ndarray, radii_sq: np.ndarray,
              queries: np.ndarray, chunk: int) -> float:
  """Share of queries inside some ball (centre in manifold, radius)."""
  inside = 0
  for i in range(0, queries.shape[0], chunk):
    d = _sq_dists(queries[i:i + chunk], manifold)  # [c, N]
    inside += int(np.sum(np.any(d <= radii_sq[None, :], axis=1)))
  return inside / queries.shape[0]


def precision_recall(real_feats, fake_feats, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019).

  Each set's manifold is the union of balls around its points with radius
  the distance to the point's k-th nearest neighbour in the same set.
  Precision: share of fake points inside the real manifold. Recall: share of
  real points inside the fake manifold.

  Args:
    real_feats: [N, D] real features, N > k.
    fake_feats: [M, D] generated features, M > k.
    k: neighbourhood size (3 in the paper).
    chunk: rows per distance block (memory is chunk * N floats).

  Returns:
    (precision, recall) in [0, 1].
  """
  real = np.asarray(real_feats, np.float64)
  fake = np.asarray(fake_feats, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"features must be [N, D] with equal D: {real.shape}, "
                     f"{fake.shape}")
  if min(real.shape[0], fake.shape[0]) <= k:
    raise ValueError(f"each set needs more than k={k} points")
  # Squared distances computed by expansion carry round-off of order
  # eps * |x|^2; a relative slack keeps a point inside its own ball.
  slack = 1e-9 * max(np.max(np.sum(real ** 2, 1)), np.max(np.sum(fake ** 2,
                                                                  1)), 1.0)
  r_real = _knn_radii_sq(real, k, chunk) + slack
  r_fake = _knn_radii_sq(fake, k, chunk) + slack
  precision = _coverage(real, r_real, fake, chunk)
  recall = _coverage(fake, r_fake, real, chunk)
  return precision, recall


# ----------------------------------------------------------------------------
# Reference statistics cache.
# ----------------------------------------------------------------------------


def _slug(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-")


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """Feature statistics of a reference set, cached as one npz file.

  The file is ``refstats_{dataset}_{split}_{feature_net}.npz`` in a cache
  directory (names reduced to ``[A-Za-z0-9_.-]``) and holds ``mu``,
  ``sigma``, ``num_samples``, the three names (checked on load, so two names
  that reduce to the same file name cannot be confused) and optionally up to
  ``max_features`` raw feature rows (for KID and precision/recall).

  Attributes:
    mu: [D] mean.
    sigma: [D, D] covariance.
    num_samples: number of feature rows the statistics came from.
    dataset, split, feature_net: what the statistics describe.
    features: [K, D] a stored subset of the features (first K rows), or None.
  """
  mu: np.ndarray
  sigma: np.ndarray
  num_samples: int
  dataset: str
  split: str
  feature_net: str
  features: np.ndarray | None = None

  @staticmethod
  def path(cache_dir: str, dataset: str, split: str,
           feature_net: str) -> str:
    """The cache file name for these names."""
    name = f"refstats_{_slug(dataset)}_{_slug(split)}_{_slug(feature_net)}.npz"
    return os.path.join(cache_dir, name)

  @classmethod
  def from_features(cls, features, dataset: str, split: str,
                    feature_net: str,
                    max_features: int | None = 10_000) -> ReferenceStats:
    """Statistics of ``features`` [N, D]; keeps up to ``max_features`` rows
    (None keeps all, 0 keeps none)."""
    f = np.asarray(features)
    mu, sigma = feature_stats(f)
    keep = f if max_features is None else f[:max_features]
    return cls(mu=mu, sigma=sigma, num_samples=int(f.shape[0]),
               dataset=dataset, split=split, feature_net=feature_net,
               features=keep if keep.shape[0] else None)

  def save(self, cache_dir: str) -> str:
    """Atomic npz write (process 0 only); returns the path."""
    path = self.path(cache_dir, self.dataset, self.split, self.feature_net)
    arrays = dict(mu=self.mu, sigma=self.sigma,
                  num_samples=np.int64(self.num_samples),
                  dataset=np.str_(self.dataset), split=np.str_(self.split),
                  feature_net=np.str_(self.feature_net))
    if self.features is not None:
      arrays["features"] = self.features
    mio.save_npz(path, **arrays)
    return path

  @classmethod
  def load(cls, cache_dir: str, dataset: str, split: str,
           feature_net: str) -> ReferenceStats:
    """Loads the cached file; FileNotFoundError if absent, ValueError if
    it describes other names."""
    path = cls.path(cache_dir, dataset, split, feature_net)
    with np.load(path, allow_pickle=False) as z:
      got = (str(z["dataset"]), str(z["split"]), str(z["feature_net"]))
      if got != (dataset, split, feature_net):
        raise ValueError(
            f"{path} holds statistics for (dataset, split, feature_net)="
            f"{got}, not {(dataset, split, feature_net)}; delete it or use "
            "another cache_dir")
      return cls(mu=z["mu"], sigma=z["sigma"],
                 num_samples=int(z["num_samples"]), dataset=dataset,
                 split=split, feature_net=feature_net,
                 features=z["features"] if "features" in z else None)

  @classmethod
  def load_or_compute(cls, cache_dir: str, dataset: str, split: str,
                      feature_net: str,
                      compute_features: Callable[[], np.ndarray],
                      max_features: int | None = 10_000) -> ReferenceStats:
    """Loads the cache if present, else computes, saves and returns it.

    ``compute_features()`` returns the [N, D] reference features; it is
    called only on a cache miss (on every process: feature extraction is
    usually collective; only process 0 writes).
    """
    path = cls.path(cache_dir, dataset, split, feature_net)
    if os.path.exists(path):
      return cls.load(cache_dir, dataset, split, feature_net)
    stats = cls.from_features(compute_features(), dataset, split, feature_net,
                              max_features=max_features)
    stats.save(cache_dir)
    return stats

  def frechet_distance(self, features) -> float:
    """Frechet distance from these statistics to those of ``features``."""
    return frechet_distance(self.mu, self.sigma, *feature_stats(features))
