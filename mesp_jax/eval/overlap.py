"""Overlap coefficients between latent posteriors (MESP).

The overlap coefficient of two densities is

  ``OVL(p, q) = integral of min(p(z), q(z)) dz``  (in [0, 1]).

In a VAE, where the posteriors ``q(z|x_i)`` and ``q(z|x_j)`` of two images
overlap the decoder cannot tell which image to produce, and the reconstruction
loss has a floor (:func:`pair_reconstruction_bound`). Reconstruction can only
become exact when the posteriors are mutually exclusive (OVL = 0).

Posteriors over hundreds of latent dimensions overlap far less than the
smallest float64 (~1e-308), so every closed form is also given in log space
(``log_overlap_*``, via ``log_ndtr``), and the Monte Carlo estimator works in
log space throughout.

Host functions here use numpy/scipy in float64 and broadcast over leading
axes; :func:`pairwise_log_overlap_equal_var` is a jax twin for use inside
jitted code.

Conventions: ``std`` is a standard deviation (not a variance), ``cov`` a full
covariance matrix; latent vectors are ``[..., D]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.scipy.special import log_ndtr as jax_log_ndtr
from scipy.special import log_ndtr, logsumexp, ndtr

_LOG2 = math.log(2.0)
_LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------
# Equal covariance, any dimension: OVL = 2 Phi(-Delta / 2).
# ----------------------------------------------------------------------------


def mahalanobis_distance(mu1, mu2, std=None, cov=None) -> np.ndarray:
  """Mahalanobis distance Delta between two means under a shared covariance.

  Args:
    mu1, mu2: [..., D] means.
    std: diagonal covariance given as per-dimension standard deviations,
      broadcastable to [..., D] (a scalar means isotropic).
    cov: full covariance [D, D] (symmetric positive definite).
      Exactly one of ``std`` and ``cov`` must be given.

  Returns:
    [...] float64 distances.
  """
  diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)  # [..., D]
  if (std is None) == (cov is None):
    raise ValueError("give exactly one of std (diagonal) or cov (full)")
  if std is not None:
    std = np.asarray(std, np.float64)
    if np.any(std <= 0):
      raise ValueError("std must be positive")
    return np.sqrt(np.sum((diff / std) ** 2, axis=-1))
  cov = np.asarray(cov, np.float64)
  if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] != (
      diff.shape[-1]):
    raise ValueError(f"cov must be [D, D] with D={diff.shape[-1]}, got "
                     f"{cov.shape}")
  chol = np.linalg.cholesky(cov)  # raises LinAlgError if not PD
  # Solve L y = diff for every leading index: y = L^-1 diff, Delta = |y|.
  flat = diff.reshape(-1, diff.shape[-1]).T  # [D, N]
  y = scipy.linalg.solve_triangular(chol, flat, lower=True)  # [D, N]
  return np.sqrt(np.sum(y ** 2, axis=0)).reshape(diff.shape[:-1])


def overlap_equal_cov(mu1, mu2, std=None, cov=None) -> np.ndarray:
  """OVL of N(mu1, S) and N(mu2, S): ``2 Phi(-Delta / 2)``.

  The two densities are equal on the hyperplane half-way between the means
  (in whitened coordinates), and each side carries ``Phi(-Delta / 2)`` of the
  other density. See :func:`mahalanobis_distance` for the arguments.
  """
  delta = mahalanobis_distance(mu1, mu2, std=std, cov=cov)
  return 2.0 * ndtr(-0.5 * delta)


def log_overlap_equal_cov(mu1, mu2, std=None, cov=None) -> np.ndarray:
  """``log OVL`` of :func:`overlap_equal_cov`, exact far below float range."""
  delta = mahalanobis_distance(mu1, mu2, std=std, cov=cov)
  return _LOG2 + log_ndtr(-0.5 * delta)


def pairwise_log_overlap_equal_var(mu: jax.Array,
                                   std: jax.Array | float) -> jax.Array:
  """jax: ``log OVL`` between all pairs of N(mu_i, diag(std^2)).

  Args:
    mu: [B, D] posterior means.
    std: scalar or [D] shared standard deviations.

  Returns:
    [B, B] log overlaps (0 on the diagonal).
  """
  z = mu / std  # [B, D] whitened
  diff = z[:, None, :] - z[None, :, :]  # [B, B, D]
  delta = jnp.sqrt(jnp.sum(diff ** 2, axis=-1))  # [B, B]
  return _LOG2 + jax_log_ndtr(-0.5 * delta)


# ----------------------------------------------------------------------------
# 1-D Gaussians with unequal variances.
# ----------------------------------------------------------------------------


def gaussian_intersections_1d(mu1, std1, mu2, std2
                              ) -> tuple[np.ndarray, np.ndarray]:
  """Points where the two 1-D normal densities are equal.

  Solves ``log N(x; mu1, s1) = log N(x; mu2, s2)``, i.e.
  ``a x^2 + b x + c = 0`` with ``a = s2^2 - s1^2``,
  ``b = -2 (s2^2 mu1 - s1^2 mu2)``,
  ``c = s2^2 mu1^2 - s1^2 mu2^2 + 2 s1^2 s2^2 log(s1 / s2)``.
  Unequal variances always give two real roots (the narrower density exceeds
  the wider one somewhere, and falls below it in both tails). Equal variances
  give one root, the midpoint, returned twice.

  Returns:
    (x_lo, x_hi), each broadcast to the inputs' shape, x_lo <= x_hi.
  """
  mu1, std1, mu2, std2 = np.broadcast_arrays(
      *(np.asarray(v, np.float64) for v in (mu1, std1, mu2, std2)))
  v1, v2 = std1 ** 2, std2 ** 2
  a = v2 - v1
  b = -2.0 * (v2 * mu1 - v1 * mu2)
  c = v2 * mu1 ** 2 - v1 * mu2 ** 2 + 2.0 * v1 * v2 * np.log(std1 / std2)
  disc = np.maximum(b * b - 4.0 * a * c, 0.0)
  # Numerically stable roots: q = -(b + sign(b) sqrt(disc)) / 2; q/a, c/q.
  sign_b = np.where(b >= 0, 1.0, -1.0)
  q = -0.5 * (b + sign_b * np.sqrt(disc))
  equal = a == 0
  with np.errstate(divide="ignore", invalid="ignore"):
    r1 = np.where(equal, 0.0, q / np.where(equal, 1.0, a))
    r2 = np.where(q == 0, r1, c / np.where(q == 0, 1.0, q))
  mid = 0.5 * (mu1 + mu2)
  lo = np.where(equal, mid, np.minimum(r1, r2))
  hi = np.where(equal, mid, np.maximum(r1, r2))
  return lo, hi


def _log1mexp(x: np.ndarray) -> np.ndarray:
  """log(1 - exp(x)) for x <= 0, accurate on both ends."""
  x = np.minimum(x, 0.0)
  with np.errstate(divide="ignore"):
    return np.where(x > -_LOG2, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def _log_normal_interval(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """log(Phi(b) - Phi(a)) for a <= b (standard normal), stable in the tails."""
  upper = a > 0  # both in the upper tail: use Phi(-a) - Phi(-b)
  hi = np.where(upper, log_ndtr(-a), log_ndtr(b))
  lo = np.where(upper, log_ndtr(-b), log_ndtr(a))
  with np.errstate(invalid="ignore"):
    return hi + _log1mexp(lo - hi)


def log_overlap_1d(mu1, std1, mu2, std2) -> np.ndarray:
  """``log OVL`` of N(mu1, std1^2) and N(mu2, std2^2) in 1-D (broadcasts).

  With the narrower density n and the wider w, and their intersections
  x_lo <= x_hi: n is above w between them, so
  ``OVL = F_n(x_lo) + (1 - F_n(x_hi)) + (F_w(x_hi) - F_w(x_lo))``;
  each term is evaluated with ``log_ndtr`` and they are combined by
  logsumexp. Equal variances reduce to ``2 Phi(-|mu1 - mu2| / (2 std))``.
  """
  mu1, std1, mu2, std2 = np.broadcast_arrays(
      *(np.asarray(v, np.float64) for v in (mu1, std1, mu2, std2)))
  if np.any(std1 <= 0) or np.any(std2 <= 0):
    raise ValueError("std1 and std2 must be positive")
  lo, hi = gaussian_intersections_1d(mu1, std1, mu2, std2)
  first_narrow = std1 <= std2
  mu_n = np.where(first_narrow, mu1, mu2)
  s_n = np.where(first_narrow, std1, std2)
  mu_w = np.where(first_narrow, mu2, mu1)
  s_w = np.where(first_narrow, std2, std1)
  left = log_ndtr((lo - mu_n) / s_n)  # narrow's lower tail
  right = log_ndtr(-(hi - mu_n) / s_n)  # narrow's upper tail
  middle = _log_normal_interval((lo - mu_w) / s_w, (hi - mu_w) / s_w)
  general = logsumexp(np.stack([left, right, middle]), axis=0)
  # Equal variances: one crossing at the midpoint, Phi(-Delta/2) each side.
  equal_var = _LOG2 + log_ndtr(-0.5 * np.abs(mu1 - mu2) / std1)
  return np.where(std1 == std2, equal_var, general)


def overlap_1d(mu1, std1, mu2, std2) -> np.ndarray:
  """OVL of two 1-D normals with possibly unequal variances (broadcasts)."""
  return np.exp(log_overlap_1d(mu1, std1, mu2, std2))


# ----------------------------------------------------------------------------
# Monte Carlo, diagonal Gaussians with different variances.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OverlapEstimate:
  """A Monte Carlo overlap estimate.

  Attributes:
    log_overlap: log of the estimate of OVL.
    rel_std_error: standard error of the estimate divided by the estimate,
      which is also (to first order) the standard error of ``log_overlap``.
    num_samples: number of samples drawn.
    proposal: the sampling distribution used.
  """
  log_overlap: float
  rel_std_error: float
  num_samples: int
  proposal: str

  @property
  def overlap(self) -> float:
    """The estimate itself (0.0 when it underflows float64)."""
    return float(np.exp(self.log_overlap))

  @property
  def std_error(self) -> float:
    """Absolute standard error (0.0 when it underflows float64)."""
    return float(np.exp(self.log_overlap) * self.rel_std_error)


def _log_normal_diag(z: np.ndarray, mu: np.ndarray,
                     std: np.ndarray) -> np.ndarray:
  """log N(z; mu, diag(std^2)) for z [M, D] -> [M]."""
  u = (z - mu) / std
  return (-0.5 * np.sum(u * u, axis=-1) - np.sum(np.log(std))
          - 0.5 * z.shape[-1] * _LOG_2PI)


def mc_log_overlap_diag(mu1, std1, mu2, std2, num_samples: int = 10_000,
                        rng: np.random.Generator | int | None = None,
                        proposal: str = "geometric",
                        chunk_size: int = 8192) -> OverlapEstimate:
  """Monte Carlo OVL of N(mu1, diag(std1^2)) and N(mu2, diag(std2^2)).

  Every proposal r gives the unbiased importance-sampling identity
  ``OVL = E_{z~r}[min(p(z), q(z)) / r(z)]``; the estimate is
  ``logsumexp_i(log w_i) - log M`` with ``log w = min(log p, log q) - log r``,
  so it never leaves log space. Proposals:

  * ``"p"``: r = p, the direct form ``E_p[min(1, q/p)]``
    (``log w = min(0, log q - log p)``).
  * ``"mixture"``: r = (p + q) / 2, ``w = 2 min(p, q) / (p + q)`` in [0, 1].
  * ``"geometric"`` (default): r proportional to sqrt(p q), itself a diagonal
    Gaussian with precision ``(1/s1^2 + 1/s2^2) / 2`` and the
    precision-weighted mean. Since ``min(p, q) <= sqrt(p q)`` the weights are
    bounded by the Bhattacharyya coefficient, so the variance is always
    finite, and r puts its mass where min(p, q) has it: between the two
    posteriors. This is the proposal that stays accurate for overlaps of
    1e-300 and below. "p" and "mixture" are unbiased too, but when the
    overlap is tiny their samples never reach the region that carries
    min(p, q): the estimate and its standard error are then both far too
    small (use them only where OVL is not small).

  Args:
    mu1, std1, mu2, std2: [D] means and standard deviations (broadcast).
    num_samples: number of samples M.
    rng: numpy Generator or seed.
    proposal: "geometric", "mixture" or "p".
    chunk_size: samples per chunk (memory is chunk_size * D floats).

  Returns:
    An :class:`OverlapEstimate` (log estimate and its relative standard
    error ``sqrt((E[w^2] / E[w]^2 - 1) / M)``, also computed in log space).
    A relative error near 1 means one sample dominates the sum: the
    estimate is then unreliable (typically a too-small overlap with the
    "p" or "mixture" proposal).
  """
  mu1, std1, mu2, std2 = np.broadcast_arrays(
      *(np.atleast_1d(np.asarray(v, np.float64))
        for v in (mu1, std1, mu2, std2)))
  if mu1.ndim != 1:
    raise ValueError(f"expected [D] vectors, got shape {mu1.shape}")
  if np.any(std1 <= 0) or np.any(std2 <= 0):
    raise ValueError("std1 and std2 must be positive")
  if num_samples < 2:
    raise ValueError("num_samples must be >= 2")
  if proposal not in ("geometric", "mixture", "p"):
    raise ValueError(
        f"proposal must be 'geometric', 'mixture' or 'p', got {proposal!r}")
  rng = np.random.default_rng(rng)
  dim = mu1.shape[0]
  if proposal == "geometric":
    precision = 0.5 * (1.0 / std1 ** 2 + 1.0 / std2 ** 2)  # [D]
    mu_r = 0.5 * (mu1 / std1 ** 2 + mu2 / std2 ** 2) / precision
    std_r = 1.0 / np.sqrt(precision)

  lse_w = -np.inf  # running logsumexp of log w
  lse_w2 = -np.inf  # running logsumexp of 2 log w
  done = 0
  while done < num_samples:
    m = min(chunk_size, num_samples - done)
    eps = rng.standard_normal((m, dim))  # [m, D]
    if proposal == "p":
      z = mu1 + std1 * eps
    elif proposal == "mixture":
      from_p = rng.random(m)[:, None] < 0.5
      z = np.where(from_p, mu1 + std1 * eps, mu2 + std2 * eps)
    else:
      z = mu_r + std_r * eps
    lp = _log_normal_diag(z, mu1, std1)  # [m]
    lq = _log_normal_diag(z, mu2, std2)  # [m]
    if proposal == "p":
      log_w = np.minimum(0.0, lq - lp)
    elif proposal == "mixture":
      log_w = _LOG2 + np.minimum(lp, lq) - np.logaddexp(lp, lq)
    else:
      log_w = np.minimum(lp, lq) - _log_normal_diag(z, mu_r, std_r)
    lse_w = np.logaddexp(lse_w, logsumexp(log_w))
    lse_w2 = np.logaddexp(lse_w2, logsumexp(2.0 * log_w))
    done += m

  log_m = math.log(num_samples)
  log_mean = lse_w - log_m  # log E[w]
  log_second = lse_w2 - log_m  # log E[w^2]
  # Relative variance E[w^2]/E[w]^2 - 1 >= 0 (clip rounding below 0).
  rel_var = max(math.expm1(min(float(log_second - 2.0 * log_mean), 700.0)),
                0.0) if np.isfinite(log_mean) else math.inf
  return OverlapEstimate(log_overlap=float(log_mean),
                         rel_std_error=math.sqrt(rel_var / num_samples),
                         num_samples=num_samples, proposal=proposal)


# ----------------------------------------------------------------------------
# The MESP reconstruction bound and the BL-AE minimum overlap.
# ----------------------------------------------------------------------------


def _pair_sq_dist(x_i, x_j, num_batch_dims: int) -> np.ndarray:
  d = np.asarray(x_i, np.float64) - np.asarray(x_j, np.float64)
  axes = tuple(range(num_batch_dims, d.ndim))
  return np.sum(d * d, axis=axes)


def pair_reconstruction_bound(ovl, x_i, x_j,
                              num_batch_dims: int = 0) -> np.ndarray:
  """Floor of the pair reconstruction loss: ``ovl * ||x_i - x_j||^2 / 4``.

  For posteriors q_i = q(z|x_i), q_j = q(z|x_j) and any deterministic decoder
  d, with ``L_rec(x_i, x_j) = (E_{z~q_i}||d(z) - x_i||^2
  + E_{z~q_j}||d(z) - x_j||^2) / 2`` (squared error summed over pixels):

    2 L_rec = int q_i(z) ||d(z) - x_i||^2 + q_j(z) ||d(z) - x_j||^2 dz
            >= int min(q_i, q_j)(z) (||d(z) - x_i||^2 + ||d(z) - x_j||^2) dz
            >= int min(q_i, q_j)(z) ||x_i - x_j||^2 / 2 dz
             = OVL(q_i, q_j) ||x_i - x_j||^2 / 2,

  using ``||d - a||^2 + ||d - b||^2 >= ||a - b||^2 / 2`` (equality at the
  midpoint d = (a + b) / 2). On the overlap both terms are paid, so
  ``L_rec >= OVL ||x_i - x_j||^2 / 4``: only mutually exclusive posteriors
  (OVL = 0) allow exact reconstruction.

  Args:
    ovl: overlap(s), broadcastable to the batch shape.
    x_i, x_j: images of the same shape ``[*batch, *pixels]``.
    num_batch_dims: how many leading axes are batch axes; the squared error
      is summed over the rest.

  Returns:
    [*batch] bounds.
  """
  return np.asarray(ovl, np.float64) * _pair_sq_dist(
      x_i, x_j, num_batch_dims) / 4.0


def log_pair_reconstruction_bound(log_ovl, x_i, x_j,
                                  num_batch_dims: int = 0) -> np.ndarray:
  """``log`` of :func:`pair_reconstruction_bound` from ``log OVL``."""
  with np.errstate(divide="ignore"):
    return (np.asarray(log_ovl, np.float64)
            + np.log(_pair_sq_dist(x_i, x_j, num_batch_dims)) - 2.0 * _LOG2)


# ----------------------------------------------------------------------------
# Bhattacharyya coefficient: a certified bracket for any overlap.
# ----------------------------------------------------------------------------
def log_bhattacharyya_diag(mu1, std1, mu2, std2) -> np.ndarray:
  """``log BC`` of two diagonal Gaussians over the last axis (float64).

  ``BC = integral sqrt(p q) >= integral min(p, q) = OVL``, so it is an
  upper bound of the overlap (:func:`log_overlap_bracket_from_bc` gives the
  matching lower bound); ``-log BC`` is the Bhattacharyya distance
  ``D_B = sum_d [(mu1 - mu2)^2 / (4 (v1 + v2)) + 0.5 log((v1 + v2) /
  (2 sqrt(v1 v2)))]``.
  """
  mu1, std1, mu2, std2 = (np.asarray(a, np.float64)
                          for a in (mu1, std1, mu2, std2))
  v1, v2 = std1 ** 2, std2 ** 2
  d_b = (np.square(mu1 - mu2) / (4.0 * (v1 + v2))
         + 0.5 * np.log((v1 + v2) / (2.0 * std1 * std2)))
  return -np.sum(d_b, axis=-1)


def log_overlap_bracket_from_bc(log_bc) -> tuple[np.ndarray, np.ndarray]:
  """``(log lower, log upper)`` bounds of OVL from ``log BC``.

  For any two densities, with ``OVL = 1 - TV`` and the Hellinger bounds
  ``1 - BC <= TV <= sqrt(1 - BC^2)``:

    ``1 - sqrt(1 - BC^2) <= OVL <= BC``.

  The lower bound is about ``BC^2 / 2`` for small BC; it is computed as
  ``BC^2 / (1 + sqrt(1 - BC^2))`` so it stays exact far below float range.
  With :func:`log_bhattacharyya_diag` this certifies an overlap without
  Monte Carlo, to within a factor of about ``2 / BC``.
  """
  log_bc = np.minimum(np.asarray(log_bc, np.float64), 0.0)
  with np.errstate(divide="ignore"):
    lower = 2.0 * log_bc - np.log1p(np.sqrt(-np.expm1(2.0 * log_bc)))
  return lower, log_bc


def gaussian_ovl_sigma(sigma, hamming=1) -> np.ndarray:
  """BL-AE minimum overlap ``2 Phi(-sqrt(hamming) / sigma)``.

  The BL-AE code ``z = tanh(.)`` lies in [-1, 1]^D and the decoder sees
  ``z + sigma * eps``. Two codes differing in one coordinate are at most 2
  apart there, so ``Delta <= 2 / sigma`` and ``OVL >= 2 Phi(-1 / sigma)``
  (reached at z = +-1). Binary codes at Hamming distance h have
  ``Delta = 2 sqrt(h) / sigma``, hence the ``hamming`` argument.
  """
  return 2.0 * ndtr(-np.sqrt(np.asarray(hamming, np.float64))
                    / np.asarray(sigma, np.float64))


def log_gaussian_ovl_sigma(sigma, hamming=1) -> np.ndarray:
  """``log`` of :func:`gaussian_ovl_sigma`."""
  return _LOG2 + log_ndtr(-np.sqrt(np.asarray(hamming, np.float64))
                          / np.asarray(sigma, np.float64))
