"""Overlap coefficients against numerical integration and closed forms."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize, special, stats

from mesp_jax.eval import overlap as ov


def _quad_ovl_1d(m1, s1, m2, s2, points=None) -> float:
  """Reference: integral of min of the two pdfs by adaptive quadrature.

  The integrand has kinks where the densities cross; without them as
  breakpoints quad can miss the requested accuracy (rel. error 6e-6 seen),
  so unless ``points`` are given they are found here by a grid scan and
  root finding, independently of the implementation.
  """
  f = lambda x: min(stats.norm.pdf(x, m1, s1), stats.norm.pdf(x, m2, s2))
  lo = min(m1 - 12 * s1, m2 - 12 * s2)
  hi = max(m1 + 12 * s1, m2 + 12 * s2)
  if points is None:
    diff = lambda x: (stats.norm.logpdf(x, m1, s1)
                      - stats.norm.logpdf(x, m2, s2))
    grid = np.linspace(lo, hi, 4001)
    sign = np.sign(diff(grid))
    points = [optimize.brentq(diff, grid[k], grid[k + 1])
              for k in np.nonzero(sign[:-1] * sign[1:] < 0)[0]] or None
  val, _ = integrate.quad(f, lo, hi, points=points, limit=500,
                          epsabs=0.0, epsrel=1e-11)
  return val


@pytest.mark.parametrize("m1,s1,m2,s2", [
    (0.0, 1.0, 1.0, 1.0),  # equal variances
    (0.0, 1.0, -3.0, 1.0),
    (0.0, 1.0, 1.0, 2.0),  # unequal
    (0.0, 1.0, 3.0, 0.5),
    (2.0, 0.3, -1.0, 5.0),
    (0.0, 1.0, 0.0, 1.5),  # same mean
])
def test_overlap_1d_matches_quadrature(m1, s1, m2, s2):
  ref = _quad_ovl_1d(m1, s1, m2, s2)
  np.testing.assert_allclose(ov.overlap_1d(m1, s1, m2, s2), ref, rtol=1e-7)
  np.testing.assert_allclose(ov.log_overlap_1d(m1, s1, m2, s2), np.log(ref),
                             rtol=1e-7, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(m2=st.floats(-6.0, 6.0), s1=st.floats(0.2, 4.0),
       s2=st.floats(0.2, 4.0))
def test_overlap_1d_property_against_quadrature(m2, s1, s2):
  got = ov.overlap_1d(0.0, s1, m2, s2)
  ref = _quad_ovl_1d(0.0, s1, m2, s2)
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
  assert 0.0 < got <= 1.0 + 1e-12
  np.testing.assert_allclose(ov.overlap_1d(m2, s2, 0.0, s1), got, rtol=1e-12)


def test_overlap_1d_broadcasts_and_is_symmetric():
  m2 = np.array([0.5, 2.0, 4.0])
  s2 = np.array([[0.5], [1.0], [3.0]])  # [3, 1] x [3] -> [3, 3]
  got = ov.overlap_1d(0.0, 1.0, m2, s2)
  assert got.shape == (3, 3)
  np.testing.assert_allclose(got, ov.overlap_1d(m2, s2, 0.0, 1.0), rtol=1e-12)
  for i in range(3):
    for j in range(3):
      np.testing.assert_allclose(got[i, j],
                                 _quad_ovl_1d(0.0, 1.0, m2[j], s2[i, 0]),
                                 rtol=1e-7)


def test_log_overlap_1d_far_tail_unequal_variances():
  # ~1e-30: still in float range, so quadrature can check the log form.
  m1, s1, m2, s2 = 0.0, 1.0, 20.0, 0.7
  diff = lambda x: stats.norm.logpdf(x, m1, s1) - stats.norm.logpdf(x, m2, s2)
  # Independent intersections (root finding), used only as quad breakpoints.
  roots = [optimize.brentq(diff, m1, m2), optimize.brentq(diff, m2, m2 + 99)]
  ref = _quad_ovl_1d(m1, s1, m2, s2, points=roots)
  assert 1e-60 < ref < 1e-20
  np.testing.assert_allclose(ov.log_overlap_1d(m1, s1, m2, s2), np.log(ref),
                             rtol=1e-6)
  lo, hi = ov.gaussian_intersections_1d(m1, s1, m2, s2)
  np.testing.assert_allclose([lo, hi], sorted(roots), rtol=1e-9)


def test_equal_cov_closed_form_1d_and_below_float_range():
  np.testing.assert_allclose(
      ov.overlap_equal_cov([0.0], [1.3], std=0.8),
      _quad_ovl_1d(0.0, 0.8, 1.3, 0.8), rtol=1e-7)
  # Delta = 100: OVL = 2 Phi(-50) ~ 1e-545, below float64.
  log_ovl = ov.log_overlap_equal_cov([0.0], [100.0], std=1.0)
  assert ov.overlap_equal_cov([0.0], [100.0], std=1.0) == 0.0
  # Mills-ratio asymptotics: log Phi(-x) ~ -x^2/2 - log(x sqrt(2 pi)).
  x = 50.0
  approx = math.log(2) - x * x / 2 - math.log(x * math.sqrt(2 * math.pi))
  np.testing.assert_allclose(log_ovl, approx, atol=1e-3)
  np.testing.assert_allclose(ov.log_overlap_1d(0.0, 1.0, 100.0, 1.0),
                             log_ovl, rtol=1e-12)


def _grid_ovl_2d(logp, logq, lo, hi, n=1201) -> float:
  """Reference: Riemann sum of min(p, q) on a fine 2-D grid."""
  t = np.linspace(lo, hi, n)
  xx, yy = np.meshgrid(t, t, indexing="ij")
  z = np.stack([xx, yy], axis=-1)  # [n, n, 2]
  vals = np.exp(np.minimum(logp(z), logq(z)))
  return float(integrate.simpson(integrate.simpson(vals, x=t), x=t))


def test_equal_cov_full_matches_2d_grid():
  cov = np.array([[1.0, 0.6], [0.6, 0.8]])
  mu1, mu2 = np.array([0.0, 0.0]), np.array([1.5, -0.5])
  p = stats.multivariate_normal(mu1, cov)
  q = stats.multivariate_normal(mu2, cov)
  ref = _grid_ovl_2d(p.logpdf, q.logpdf, -8.0, 8.0)
  np.testing.assert_allclose(ov.overlap_equal_cov(mu1, mu2, cov=cov), ref,
                             rtol=2e-4)
  np.testing.assert_allclose(ov.log_overlap_equal_cov(mu1, mu2, cov=cov),
                             np.log(ref), atol=2e-4)


def test_equal_cov_diag_equals_full_diag_and_batches():
  rng = np.random.default_rng(0)
  mu1 = rng.normal(size=(4, 6))
  mu2 = rng.normal(size=(4, 6))
  std = rng.uniform(0.5, 2.0, size=6)
  np.testing.assert_allclose(
      ov.log_overlap_equal_cov(mu1, mu2, std=std),
      ov.log_overlap_equal_cov(mu1, mu2, cov=np.diag(std ** 2)), rtol=1e-10)
  with pytest.raises(ValueError, match="exactly one"):
    ov.overlap_equal_cov(mu1, mu2)


def test_pairwise_jax_matches_numpy():
  rng = np.random.default_rng(1)
  mu = rng.normal(size=(5, 8)).astype(np.float32)
  std = 0.3
  got = np.asarray(ov.pairwise_log_overlap_equal_var(jnp.asarray(mu), std))
  ref = ov.log_overlap_equal_cov(mu[:, None, :], mu[None, :, :], std=std)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("proposal", ["geometric", "mixture", "p"])
def test_mc_matches_1d_closed_form(proposal):
  m1, s1, m2, s2 = 0.0, 1.0, 2.5, 0.6
  est = ov.mc_log_overlap_diag(m1, s1, m2, s2, num_samples=20_000, rng=0,
                               proposal=proposal)
  exact = ov.overlap_1d(m1, s1, m2, s2)
  assert abs(est.overlap - exact) < 4 * est.std_error
  assert est.rel_std_error < 0.1


@pytest.mark.parametrize("proposal", ["geometric", "mixture"])
def test_mc_matches_2d_grid_unequal_variances(proposal):
  mu1, s1 = np.array([0.0, 0.5]), np.array([1.0, 0.5])
  mu2, s2 = np.array([1.0, -0.5]), np.array([0.4, 1.5])
  p = stats.multivariate_normal(mu1, np.diag(s1 ** 2))
  q = stats.multivariate_normal(mu2, np.diag(s2 ** 2))
  ref = _grid_ovl_2d(p.logpdf, q.logpdf, -9.0, 9.0)
  est = ov.mc_log_overlap_diag(mu1, s1, mu2, s2, num_samples=20_000, rng=1,
                               proposal=proposal)
  assert abs(est.overlap - ref) < 4 * est.std_error


def test_mc_equal_variance_converges_in_moderate_dimension():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=20) * 0.3, rng.normal(size=20) * 0.3
  std = rng.uniform(0.5, 1.0, size=20)
  exact = ov.overlap_equal_cov(mu1, mu2, std=std)
  for proposal in ("geometric", "mixture", "p"):
    est = ov.mc_log_overlap_diag(mu1, std, mu2, std, num_samples=10_000,
                                 rng=3, proposal=proposal)
    assert abs(est.overlap - exact) < 4 * est.std_error, proposal


def test_mc_log_form_far_below_float_range():
  # 200 latent dims, Mahalanobis distance 80: OVL ~ 1e-349 (underflows).
  dim = 200
  rng = np.random.default_rng(4)
  direction = rng.normal(size=dim)
  direction /= np.linalg.norm(direction)
  std = rng.uniform(0.3, 1.0, size=dim)
  mu1 = rng.normal(size=dim)
  mu2 = mu1 + 80.0 * std * direction
  exact_log = ov.log_overlap_equal_cov(mu1, mu2, std=std)
  assert exact_log < math.log(1e-300)
  est = ov.mc_log_overlap_diag(mu1, std, mu2, std, num_samples=20_000, rng=5)
  assert est.overlap == 0.0  # only the log form can hold it
  assert est.rel_std_error < 0.1
  assert abs(est.log_overlap - exact_log) < 4 * est.rel_std_error + 1e-3


def test_reconstruction_bound_brackets_optimal_decoder_loss():
  # 1-D posteriors, two 3-pixel images. The optimal decoder for the pair is
  # d(z) = (q_i x_i + q_j x_j) / (q_i + q_j), with loss
  # L* = 1/2 int q_i q_j / (q_i + q_j) dz * ||x_i - x_j||^2, and
  # min/2 <= q_i q_j / (q_i + q_j) <= min gives bound <= L* <= 2 bound.
  x_i = np.array([0.2, -0.4, 0.9])
  x_j = np.array([-0.5, 0.3, 0.1])
  sq = float(np.sum((x_i - x_j) ** 2))
  for m2, s2 in [(0.7, 1.0), (2.0, 0.5), (0.0, 3.0)]:
    # Log densities keep the weights finite where both pdfs underflow.
    lqi = lambda z: stats.norm.logpdf(z, 0.0, 1.0)
    lqj = lambda z, m2=m2, s2=s2: stats.norm.logpdf(z, m2, s2)

    def loss_integrand(z, lqi=lqi, lqj=lqj):
      a, b = np.exp(lqi(z)), np.exp(lqj(z))
      w = special.expit(lqi(z) - lqj(z))  # q_i / (q_i + q_j)
      d = w * x_i + (1 - w) * x_j
      return 0.5 * (a * np.sum((d - x_i) ** 2) + b * np.sum((d - x_j) ** 2))

    def harmonic(z, lqi=lqi, lqj=lqj):  # q_i q_j / (q_i + q_j)
      return np.exp(lqi(z) + lqj(z) - np.logaddexp(lqi(z), lqj(z)))

    l_opt = integrate.quad(loss_integrand, -30, 30, limit=400)[0]
    np.testing.assert_allclose(
        l_opt, 0.5 * sq * integrate.quad(harmonic, -30, 30, limit=400)[0],
        rtol=1e-7)
    ovl = ov.overlap_1d(0.0, 1.0, m2, s2)
    bound = ov.pair_reconstruction_bound(ovl, x_i, x_j)
    np.testing.assert_allclose(bound, ovl * sq / 4, rtol=1e-12)
    assert bound <= l_opt * (1 + 1e-9) <= 2 * bound * (1 + 1e-9)
    np.testing.assert_allclose(
        ov.log_pair_reconstruction_bound(np.log(ovl), x_i, x_j),
        np.log(bound), rtol=1e-12)


def test_reconstruction_bound_batch_axes():
  rng = np.random.default_rng(6)
  xi, xj = rng.normal(size=(2, 4, 3, 3)), rng.normal(size=(2, 4, 3, 3))
  ovl = rng.uniform(size=(2, 4))
  got = ov.pair_reconstruction_bound(ovl, xi, xj, num_batch_dims=2)
  ref = np.array([[ovl[a, b] * np.sum((xi[a, b] - xj[a, b]) ** 2) / 4
                   for b in range(4)] for a in range(2)])
  np.testing.assert_allclose(got, ref, rtol=1e-12)


def _log_bc_1d_quad(m1, s1, m2, s2) -> float:
  f = lambda x: math.sqrt(stats.norm.pdf(x, m1, s1) * stats.norm.pdf(x, m2, s2))
  lo = min(m1 - 15 * s1, m2 - 15 * s2)
  hi = max(m1 + 15 * s1, m2 + 15 * s2)
  return math.log(integrate.quad(f, lo, hi, limit=500, epsabs=0.0,
                                 epsrel=1e-11)[0])


@pytest.mark.parametrize("m1,s1,m2,s2", [
    (0.0, 1.0, 1.0, 1.0), (0.0, 1.0, 4.0, 1.0), (0.0, 1.0, 1.0, 2.0),
    (2.0, 0.3, -1.0, 5.0), (0.0, 1.0, 0.0, 1.5)])
def test_bhattacharyya_diag_matches_quadrature_1d(m1, s1, m2, s2):
  got = ov.log_bhattacharyya_diag([m1], [s1], [m2], [s2])
  np.testing.assert_allclose(got, _log_bc_1d_quad(m1, s1, m2, s2),
                             rtol=1e-7, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.floats(-8, 8), st.floats(0.05, 5), st.floats(0.05, 5))
def test_bc_bracket_contains_the_exact_1d_overlap(m2, s1, s2):
  log_ovl = ov.log_overlap_1d(0.0, s1, m2, s2)
  lower, upper = ov.log_overlap_bracket_from_bc(
      ov.log_bhattacharyya_diag([0.0], [s1], [m2], [s2]))
  assert lower <= log_ovl + 1e-9
  assert log_ovl <= upper + 1e-9


def test_bc_bracket_contains_equal_cov_overlap_far_below_float_range():
  rng = np.random.default_rng(0)
  d = 300
  mu1, mu2 = rng.normal(size=(2, 5, d)) * np.asarray([0.1, 1, 3, 10, 30])[
      :, None]
  std = np.full(d, 0.7)
  log_ovl = ov.log_overlap_equal_cov(mu1, mu2, std=std)  # [5], exact
  lower, upper = ov.log_overlap_bracket_from_bc(
      ov.log_bhattacharyya_diag(mu1, std, mu2, std))
  assert log_ovl.min() < -700  # beyond float64, so the log form matters
  assert np.all(lower <= log_ovl + 1e-9)
  assert np.all(log_ovl <= upper + 1e-9)
  # Identical distributions: BC = OVL = 1, and the bracket closes.
  lower, upper = ov.log_overlap_bracket_from_bc(
      ov.log_bhattacharyya_diag(mu1[0], std, mu1[0], std))
  np.testing.assert_allclose([lower, upper], 0.0, atol=1e-12)


def test_gaussian_ovl_sigma_is_overlap_of_opposite_bits():
  for sigma in (0.1, 0.5, 2.0):
    ref = _quad_ovl_1d(-1.0, sigma, 1.0, sigma, points=[0.0])
    np.testing.assert_allclose(ov.gaussian_ovl_sigma(sigma), ref, rtol=1e-7)
  # Hamming distance h between binary codes in 7 dims.
  a = np.array([1, 1, -1, -1, 1, 1, -1.0])
  b = np.array([1, -1, -1, 1, 1, -1, -1.0])  # h = 3
  np.testing.assert_allclose(
      ov.log_gaussian_ovl_sigma(0.1, hamming=3),
      ov.log_overlap_equal_cov(a, b, std=0.1), rtol=1e-12)
