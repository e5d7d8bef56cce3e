"""The MESP study: posterior overlap against the reconstruction floor.

MESP (docs/method.md, section 'MESP'): for posteriors ``q_i = q(z|x_i)``,
``q_j = q(z|x_j)`` and any deterministic decoder d,

  ``L_rec(x_i, x_j) = (E_{z~q_i}||d(z) - x_i||^2 + E_{z~q_j}||d(z) - x_j||^2)
  / 2 >= OVL(q_i, q_j) * ||x_i - x_j||^2 / 4``

(squared error summed over pixels). The study trains, with the same
encoder/decoder family and size,

* Gaussian VAEs (:mod:`mesp_jax.models.vae`) for a list of KL weights, and
  optionally one at its ELBO with a calibrated decoder
  (:func:`mesp_jax.models.vae.calibrated_elbo_loss`: no free KL weight),
  whose posteriors are diagonal Gaussians with learned variances, and
* BL-AEs (:mod:`mesp_jax.models.blae`) for a list of noise levels sigma,
  whose training posterior is ``N(tanh(enc(x)), sigma^2 I)``,

each by :func:`mesp_jax.train.loop.train` into ``{workdir}/{model}``
(resumable; the VAE's task is :func:`mesp_jax.train.vae.vae_task`), then
measures on held-out test images, for nearest-neighbour pairs (pixel L2) and
for random pairs:

* the overlap ``OVL(q_i, q_j)``: closed form ``2 Phi(-Delta / 2)`` for the
  BL-AE's equal variances; importance-sampled Monte Carlo with the geometric
  proposal for the VAEs' unequal diagonal variances
  (:func:`mesp_jax.eval.overlap.mc_log_overlap_diag`), checked against the
  certified bracket ``1 - sqrt(1 - BC^2) <= OVL <= BC`` from the
  Bhattacharyya coefficient; all in log space (overlaps of hundreds of
  latent dimensions underflow float64);
* ``L_rec`` by Monte Carlo over posterior samples with one fixed set of
  standard-normal draws shared by every image (common random numbers);
* the bound ``OVL * ||x_i - x_j||^2 / 4`` and the bin rate.

The stage (:mod:`mesp_jax.stages.mesp_study`) writes ``mesp_study.json`` and
``mesp_study.png`` (:func:`mesp_jax.experiments.plots.plot_mesp_study`: mean
L_rec and mean bound against the mean overlap, log axes, one point per model
and pair set). The JSON flags, for every model, whether the mean bound stays
below the mean measured L_rec (it must: a violation means a bug, or Monte
Carlo noise on a bound that is tight), and holds the comparison of
docs/mesp_study.md: the ELBO VAE against the BL-AE at
``study.primary_blae_sigma``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy.special import logsumexp

from mesp_jax.base import sharding
from mesp_jax.base.image import psnr
from mesp_jax.eval import overlap as ovl_lib
from mesp_jax.models.blae import (
  ARCHITECTURE_FIELDS,
  BLAE,
  bin_rate,
)
from mesp_jax.models.vae import GaussianVAE, gaussian_kl
from mesp_jax.train import blae as blae_stage
from mesp_jax.train import loop
from mesp_jax.train.vae import ELBO, format_weight, vae_task

_LOG10 = math.log(10.0)


# --------------------------------------------------------------------------
# Estimators (pure; tested against numpy).
# --------------------------------------------------------------------------
def expected_reconstruction_errors(decode: Callable[[jax.Array], jax.Array],
                                   mean: np.ndarray, std, images: np.ndarray,
                                   eps: np.ndarray, batch_size: int = 128
                                   ) -> np.ndarray:
  """``||d(mean_n + std_n * eps_s) - x_n||^2`` (summed over pixels).

  Args:
    decode: jax function, latents [B, *L] -> images [B, H, W, C].
    mean: [N, *L] posterior means.
    std: [N, *L] posterior standard deviations, or a scalar.
    images: [N, H, W, C] targets.
    eps: [S, *L] standard-normal draws, the same for every image.
    batch_size: images decoded per call (times S samples in sequence).

  Returns:
    [N, S] float64 squared errors; their mean over S estimates
    ``E_{z~q_n} ||d(z) - x_n||^2``.
  """
  mean = np.asarray(mean, np.float32)
  std = np.broadcast_to(np.asarray(std, np.float32), mean.shape)
  images = np.asarray(images, np.float32)
  eps = jnp.asarray(eps, jnp.float32)

  @jax.jit
  def errors(m, s, x):
    def one(e):  # e: [*L] one draw for the whole batch
      rec = decode(m + s * e[None])  # [B, H, W, C]
      return jnp.sum(jnp.square(rec - x), axis=tuple(range(1, x.ndim)))
    return jax.lax.map(one, eps).T  # [B, S]

  n = mean.shape[0]
  batch_size = min(batch_size, n)
  out = []
  for start in range(0, n, batch_size):
    args = [_pad_rows(a[start:start + batch_size], batch_size)
            for a in (mean, std, images)]  # one compiled shape
    real = min(batch_size, n - start)
    out.append(np.asarray(errors(*args), np.float64)[:real])
  return np.concatenate(out)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  """Pads the leading axis to ``rows`` by repeating the last row."""
  if a.shape[0] == rows:
    return a
  return np.concatenate([a, np.repeat(a[-1:], rows - a.shape[0], axis=0)])


def pair_reconstruction_loss(errors: np.ndarray, pairs: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
  """Monte Carlo ``L_rec(x_i, x_j)`` and its standard error per pair.

  Args:
    errors: [N, S] from :func:`expected_reconstruction_errors`.
    pairs: [P, 2] indices into the N images.

  Returns:
    (L_rec [P], standard error [P]): ``(mean_s e_i + mean_s e_j) / 2`` and
    ``sqrt(var_i / S + var_j / S) / 2`` (the two images' draws are treated as
    independent; the estimate itself is unbiased either way).
  """
  errors = np.asarray(errors, np.float64)
  s = errors.shape[1]
  m = errors.mean(axis=1)  # [N]
  var = errors.var(axis=1, ddof=1) if s > 1 else np.zeros_like(m)
  i, j = pairs[:, 0], pairs[:, 1]
  return 0.5 * (m[i] + m[j]), 0.5 * np.sqrt((var[i] + var[j]) / s)


def log_mean_exp(log_values: np.ndarray) -> float:
  """``log mean exp(v)`` without leaving log space."""
  v = np.asarray(log_values, np.float64)
  return float(logsumexp(v) - math.log(v.size))


# --------------------------------------------------------------------------
# Pairs of held-out images.
# --------------------------------------------------------------------------
def select_pairs(images: np.ndarray, num_nn: int, num_random: int,
                 seed: int) -> dict[str, np.ndarray]:
  """Nearest-neighbour and random pairs among held-out images.

  ``nn``: for images 0, 1, ... in order, the pair (i, nearest other image in
  pixel L2), unordered duplicates dropped, until ``num_nn`` pairs.
  ``random``: uniform pairs i != j. Identical images (distance 0) are never
  paired. Returns {"nn": [P, 2], "random": [P', 2]} int arrays.
  """
  flat = np.asarray(images, np.float64).reshape(images.shape[0], -1)
  n = flat.shape[0]
  sq = np.sum(flat ** 2, axis=1)
  d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
  d[np.arange(n), np.arange(n)] = np.inf
  d[d < 1e-9] = np.inf  # exact duplicates say nothing about the bound
  nn = np.argmin(d, axis=1)
  seen, nn_pairs = set(), []
  for i in range(n):
    key = (min(i, nn[i]), max(i, nn[i]))
    if np.isfinite(d[i, nn[i]]) and key not in seen:
      seen.add(key)
      nn_pairs.append((i, int(nn[i])))
    if len(nn_pairs) == num_nn:
      break
  rng = np.random.default_rng(seed)
  rand_pairs = []
  for _ in range(100 * num_random):  # bounded: duplicates are skipped
    if len(rand_pairs) == num_random:
      break
    i, j = rng.choice(n, 2, replace=False)
    if np.isfinite(d[i, j]):
      rand_pairs.append((int(i), int(j)))
  return {"nn": np.asarray(nn_pairs, np.int64).reshape(-1, 2),
          "random": np.asarray(rand_pairs, np.int64).reshape(-1, 2)}


# --------------------------------------------------------------------------
# Training the models (sub-workdirs, loop.train, resumable).
# --------------------------------------------------------------------------
def blae_config(config: ml_collections.ConfigDict, sigma: float
                ) -> ml_collections.ConfigDict:
  """The stage-``blae`` config of the study's BL-AE with a fixed ``sigma``."""
  sub = ml_collections.ConfigDict()
  sub.stage = "blae"
  sub.seed = config.seed
  sub.data = config.data
  sub.mesh = config.mesh
  sub.train = config.train
  fields = {k: config.model[k] for k in ARCHITECTURE_FIELDS}
  fields["conv"] = config.model.get("conv", "xla")
  fields.update(sigma=float(sigma), sigma_start=float(sigma),
                sigma_ramp_steps=0, beta=float(config.sigma_sweep.beta))
  sub.blae = ml_collections.ConfigDict(fields)
  return sub


def train_models(config: ml_collections.ConfigDict, workdir: str, mesh
                 ) -> list[dict]:
  """Trains (or resumes) every model; returns descriptions with params."""
  models = []
  weights = [float(w) for w in config.vae.kl_weights]
  if config.vae.calibrated_elbo:
    weights.append(ELBO)
  for w in weights:
    name = f"vae_kl{format_weight(w)}"
    state = loop.train(config, os.path.join(workdir, name),
                       vae_task(config, w), mesh=mesh)
    models.append({"name": name, "kind": "vae", "kl_weight": w,
                   "params": sharding.to_host(state.params),
                   "steps": int(jax.device_get(state.step))})
  for sigma in config.sigma_sweep.sigmas:
    name = f"blae_sigma{float(sigma):g}"
    sub = blae_config(config, sigma)
    task = blae_stage.make_task(sub, os.path.join(workdir, name))
    task.visualize = None
    state = loop.train(sub, os.path.join(workdir, name), task, mesh=mesh)
    models.append({"name": name, "kind": "blae", "sigma": float(sigma),
                   "beta": float(sub.blae.beta),
                   "params": sharding.to_host(state.params),
                   "steps": int(jax.device_get(state.step))})
  return models


# --------------------------------------------------------------------------
# Measuring one model.
# --------------------------------------------------------------------------
def posteriors(model_info: dict, net, images: np.ndarray, batch: int = 256
               ) -> dict[str, np.ndarray]:
  """Posterior parameters and reconstructions of held-out images.

  Returns {"mean": [N, *L], "std": [N, *L], "rec_mean": [N, H, W, C]
  decoded from the posterior mean, and for the BL-AE "rec_sign" decoded from
  the sign bits}.
  """
  params = model_info["params"]
  if model_info["kind"] == "vae":
    @jax.jit
    def enc(x):
      mean, logvar = net.apply(params, x, method=GaussianVAE.encode)
      return {"mean": mean, "std": jnp.exp(0.5 * logvar),
              "rec_mean": net.apply(params, mean, method=GaussianVAE.decode)}
  else:
    sigma = model_info["sigma"]

    @jax.jit
    def enc(x):
      z = net.apply(params, x, method=BLAE.encode_continuous)
      sign = jnp.where(z > 0, 1.0, -1.0)
      return {"mean": z, "std": jnp.full_like(z, sigma),
              "rec_mean": net.apply(params, z, method=BLAE.decode),
              "rec_sign": net.apply(params, sign, method=BLAE.decode)}
  n = images.shape[0]
  batch = min(batch, n)
  outs = [jax.tree.map(lambda o, r=min(batch, n - s): np.asarray(o)[:r],
                       enc(_pad_rows(images[s:s + batch], batch)))
          for s in range(0, n, batch)]
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def measure_model(model_info: dict, net, images: np.ndarray,
                  pairs: dict[str, np.ndarray], cfg: ml_collections.ConfigDict,
                  seed: int) -> dict:
  """Overlaps, L_rec and bounds of one model on every pair set."""
  kind = model_info["kind"]
  params = model_info["params"]
  used = np.unique(np.concatenate([p.reshape(-1) for p in pairs.values()]))
  post = posteriors(model_info, net, images[used])
  mean, std = post["mean"], post["std"]
  pos = {int(u): k for k, u in enumerate(used)}  # image index -> row
  decode_method = GaussianVAE.decode if kind == "vae" else BLAE.decode

  def decode(z):
    return net.apply(params, z, method=decode_method)

  eps = np.random.default_rng([seed, 1]).standard_normal(
      (int(cfg.rec_samples),) + mean.shape[1:]).astype(np.float32)
  errors = expected_reconstruction_errors(decode, mean, std, images[used],
                                          eps, int(cfg.decode_batch_size))
  flat_mean = mean.reshape(mean.shape[0], -1).astype(np.float64)
  flat_std = std.reshape(std.shape[0], -1).astype(np.float64)
  x_used = images[used].astype(np.float64)

  out = {k: v for k, v in model_info.items() if k != "params"}
  out["latent_dims"] = int(flat_mean.shape[1])
  out["bin_rate"] = float(bin_rate(jnp.asarray(mean)))
  out["psnr_mean_decode"] = float(np.mean(np.asarray(
      psnr(jnp.asarray(post["rec_mean"]), jnp.asarray(images[used])))))
  out["posterior_std_geomean"] = float(np.exp(np.mean(np.log(flat_std))))
  # Per-pixel squared error under posterior draws: the maximum-likelihood
  # variance of a Gaussian decoder on these images.
  pixels_per_image = int(np.prod(images.shape[1:]))
  out["pixel_mse_sampled"] = float(errors.mean() / pixels_per_image)
  if model_info.get("kl_weight") == ELBO:
    # The KL weight it trained at, in vae_loss units: 2 s^2 D / P.
    out["effective_kl_weight"] = float(
        2.0 * out["pixel_mse_sampled"] * flat_mean.shape[1]
        / pixels_per_image)
  if kind == "vae":
    kl = np.asarray(gaussian_kl(jnp.asarray(mean),
                                jnp.log(jnp.asarray(std) ** 2)))
    per_dim = kl.reshape(kl.shape[0], -1).mean(axis=0)  # [D]
    out["kl_per_dim"] = float(per_dim.mean())
    out["active_dims"] = int(np.sum(per_dim > 0.01))
  else:
    out["psnr_sign_decode"] = float(np.mean(np.asarray(
        psnr(jnp.asarray(post["rec_sign"]), jnp.asarray(images[used])))))
    out["min_log_overlap_per_bit"] = float(
        ovl_lib.log_gaussian_ovl_sigma(model_info["sigma"]))

  rng = np.random.default_rng([seed, 2])
  out["pairs"] = {}
  for set_name, p in pairs.items():
    a = np.asarray([pos[int(i)] for i in p[:, 0]])
    b = np.asarray([pos[int(j)] for j in p[:, 1]])
    if kind == "blae":
      log_ovl = ovl_lib.log_overlap_equal_cov(
          flat_mean[a], flat_mean[b], std=model_info["sigma"])
      rel_err = np.zeros_like(log_ovl)
      method = "closed form 2 Phi(-Delta/2), equal variances"
    else:
      ests = [ovl_lib.mc_log_overlap_diag(
          flat_mean[i], flat_std[i], flat_mean[j], flat_std[j],
          num_samples=int(cfg.overlap_samples), rng=rng,
          proposal=cfg.overlap_proposal) for i, j in zip(a, b, strict=True)]
      log_ovl = np.asarray([e.log_overlap for e in ests])
      rel_err = np.asarray([e.rel_std_error for e in ests])
      method = (f"Monte Carlo, {cfg.overlap_proposal} proposal, "
                f"{int(cfg.overlap_samples)} samples per pair")
    log_bc = ovl_lib.log_bhattacharyya_diag(flat_mean[a], flat_std[a],
                                            flat_mean[b], flat_std[b])
    log_lower, _ = ovl_lib.log_overlap_bracket_from_bc(log_bc)
    l_rec, l_se = pair_reconstruction_loss(errors, np.stack([a, b], 1))
    log_bound = ovl_lib.log_pair_reconstruction_bound(
        log_ovl, x_used[a], x_used[b], num_batch_dims=1)
    bound = np.exp(log_bound)
    sq_dist = np.sum((x_used[a] - x_used[b]) ** 2, axis=(1, 2, 3))
    mean_bound = float(np.exp(log_mean_exp(log_bound)))
    mean_l_rec = float(l_rec.mean())
    out["pairs"][set_name] = {
        "num_pairs": int(p.shape[0]),
        "overlap_method": method,
        "mean_overlap": float(np.exp(log_mean_exp(log_ovl))),
        "log10_mean_overlap": log_mean_exp(log_ovl) / _LOG10,
        "mean_log10_overlap": float(np.mean(log_ovl) / _LOG10),
        "median_log10_overlap": float(np.median(log_ovl) / _LOG10),
        "min_log10_overlap": float(np.min(log_ovl) / _LOG10),
        "max_log10_overlap": float(np.max(log_ovl) / _LOG10),
        "overlap_rel_std_error_median": float(np.median(rel_err)),
        "overlap_estimate_reliable": bool(np.median(rel_err) <= 0.5),
        "log10_mean_bhattacharyya": log_mean_exp(log_bc) / _LOG10,
        "log10_mean_overlap_lower_bound": log_mean_exp(log_lower) / _LOG10,
        "overlap_below_lower_bound": int(np.sum(log_ovl < log_lower - 1e-9)),
        "overlap_above_bhattacharyya": int(np.sum(
            log_ovl > log_bc + 3.0 * rel_err + 1e-9)),
        "mean_sq_dist": float(sq_dist.mean()),
        "mean_l_rec": mean_l_rec,
        "l_rec_std_error": float(np.sqrt(np.sum(l_se ** 2)) / len(l_se)),
        "mean_bound": mean_bound,
        "log10_mean_bound": log_mean_exp(log_bound) / _LOG10,
        "max_bound_over_l_rec": float(np.max(bound / l_rec)),
        "pairs_bound_above_l_rec": int(np.sum(bound > l_rec)),
        "pairs_bound_above_l_rec_3se": int(np.sum(bound > l_rec + 3 * l_se)),
        "bound_below_l_rec": bool(mean_bound <= mean_l_rec),
    }
  return out


def compare(results: list[dict], primary_blae_sigma: float | None) -> dict:
  """The comparison of docs/mesp_study.md, per pair set.

  Ranks every model by its log10 mean overlap and, where both exist, sets
  the ELBO VAE against the BL-AE with ``sigma == primary_blae_sigma``:
  ``blae_below_elbo_vae`` says whether the BL-AE's overlap is lower;
  ``conclusive`` is False when the VAE's Monte Carlo estimate is unreliable
  (then only its Bhattacharyya upper bound is trustworthy);
  ``blae_below_elbo_vae_certified`` says whether the BL-AE's (exact) overlap
  is below the VAE's certified lower bound ``1 - sqrt(1 - BC^2)``, which
  needs no Monte Carlo.
  """
  elbo = [r for r in results
          if r["kind"] == "vae" and r["kl_weight"] == ELBO]
  primary = [r for r in results if r["kind"] == "blae"
             and primary_blae_sigma is not None
             and math.isclose(r["sigma"], float(primary_blae_sigma))]
  out = {}
  for set_name in results[0]["pairs"]:
    ranked = sorted(results,
                    key=lambda r: r["pairs"][set_name]["log10_mean_overlap"])
    entry = {"ranking_low_to_high": [
                 [r["name"], r["pairs"][set_name]["log10_mean_overlap"]]
                 for r in ranked],
             "lowest_overlap_model": ranked[0]["name"]}
    if elbo and primary:
      v, b = elbo[0]["pairs"][set_name], primary[0]["pairs"][set_name]
      entry.update(
          elbo_vae=elbo[0]["name"],
          elbo_vae_log10_mean_overlap=v["log10_mean_overlap"],
          elbo_vae_log10_mean_bhattacharyya=v["log10_mean_bhattacharyya"],
          blae=primary[0]["name"],
          blae_log10_mean_overlap=b["log10_mean_overlap"],
          elbo_vae_log10_mean_overlap_lower_bound=v[
              "log10_mean_overlap_lower_bound"],
          blae_below_elbo_vae=bool(
              b["log10_mean_overlap"] < v["log10_mean_overlap"]),
          blae_below_elbo_vae_certified=bool(
              b["log10_mean_overlap"] < v["log10_mean_overlap_lower_bound"]),
          conclusive=bool(v["overlap_estimate_reliable"]))
    out[set_name] = entry
  return out


# --------------------------------------------------------------------------
# Labels.
# --------------------------------------------------------------------------
def model_label(m: dict) -> str:
  if m["kind"] == "vae":
    if m["kl_weight"] == ELBO:
      return "VAE ELBO (calibrated)"
    return f"VAE KL {format_weight(m['kl_weight'])}"
  return f"BL-AE sigma {m['sigma']:g}"
