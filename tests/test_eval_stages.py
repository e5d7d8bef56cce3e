"""Stages train_feature_net, evaluate and mesp_study; VAE KL; L_rec estimator.

Each test compares with something independent: numpy statistics of features
from a direct forward pass, known copies, closed-form KL, a numpy evaluation
of the pair loss for a linear decoder.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesp_jax import stages
from mesp_jax.base import config as config_lib
from mesp_jax.base.config import load_config
from mesp_jax.base.image import to_float_images
from mesp_jax.data import get_source
from mesp_jax.eval.fid import ReferenceStats
from mesp_jax.experiments import mesp_overlap
from mesp_jax.models.feature_net import FeatureNet
from mesp_jax.models.vae import GaussianVAE, calibrated_elbo_loss, vae_loss
from mesp_jax.train import feature_net as fn_stage

FD_NAME = "fd_fashion_mnist_classifier"


def _config(repo_root, name):
  return load_config(os.path.join(repo_root, "configs", name))


def _images(split, indices):
  src = get_source("fashion_mnist", split, image_size=32)
  return to_float_images(src.read(np.asarray(indices))["image"])


@pytest.fixture(scope="module")
def feature_net_dir(repo_root, tmp_path_factory):
  config = _config(repo_root, "feature_net_fashion_mnist.py:smoke")
  workdir = str(tmp_path_factory.mktemp("feature_net"))
  stats = stages.run(config, workdir)
  return workdir, config, stats


def test_feature_net_stage_writes_reference_stats(feature_net_dir):
  workdir, config, stats = feature_net_dir
  model, params, _, step = fn_stage.load_feature_net(workdir)
  assert step == config.train.num_steps
  n = config.feature_net.reference_examples
  for split in ("train", "test"):
    # Independent features: one direct forward pass, not the batched helper.
    feats = np.asarray(model.apply({"params": params},
                                   jnp.asarray(_images(split, np.arange(n))),
                                   method=FeatureNet.features), np.float64)
    cached = ReferenceStats.load(workdir, "fashion_mnist", split, FD_NAME)
    assert cached.num_samples == n == stats[split].num_samples
    np.testing.assert_allclose(cached.mu, feats.mean(axis=0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(cached.sigma, np.cov(feats, rowvar=False),
                               rtol=1e-3, atol=1e-6)
  with open(os.path.join(workdir, "reference_stats.json")) as f:
    assert json.load(f)["splits"]["test"]["checkpoint_step"] == step
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
  assert 0.0 <= evals[-1]["accuracy"] <= 1.0


def test_evaluate_real_beats_noise_and_counts_copies(repo_root, tmp_path,
                                                     feature_net_dir):
  fn_dir = feature_net_dir[0]
  config = _config(repo_root, "evaluate_fashion_mnist.py:smoke")
  n_train = config.evaluate.copy_rate_train_examples
  # 96 unseen test images + 32 training images (exact copies).
  real = np.concatenate([_images("test", np.arange(5000, 5096)),
                         _images("train", np.arange(0, n_train, n_train // 32
                                                    )[:32])])
  noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(
      np.float32)
  results = {}
  for name, images in (("real", real), ("noise", noise)):
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, images=images)
    config.inputs.samples = path
    config.inputs.feature_net_workdir = fn_dir
    config.evaluate.copy_rate = name == "real"
    results[name] = stages.run(config, str(tmp_path / name))
    with open(tmp_path / name / "eval.json") as f:
      assert json.load(f)[FD_NAME] == pytest.approx(results[name][FD_NAME])
  real_r, noise_r = results["real"], results["noise"]
  assert real_r[FD_NAME] < noise_r[FD_NAME]
  assert real_r["reference_test_vs_train"][FD_NAME] < noise_r[FD_NAME]
  # Honest names: no FID number without the Inception weights.
  assert real_r["fid"] is None and real_r["inception_score"] is None
  assert any("not FID" in note for note in real_r["notes"])
  assert not any(k.startswith("fid") and v is not None
                 for k, v in real_r.items())
  assert real_r["feature_net"]["name"] == FD_NAME
  # Exactly the 32 training images are copies (PSNR = inf >= 25 dB).
  mem = real_r["memorization"]
  assert mem["num_copies"] == 32
  assert mem["copy_rate"] == pytest.approx(32 / 128)
  assert noise_r["memorization"] is None


def test_vae_kl_equals_closed_form():
  model = GaussianVAE(family="downsample", width=8, bits=3,
                      num_res_blocks=1, downsample_factor=4)
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 1)),
                  jnp.float32)
  eps = jnp.zeros((2, 4, 4, 3))
  params = model.init(jax.random.key(0), x, eps)
  mean, logvar = model.apply(params, x, method=GaussianVAE.encode)
  assert mean.shape == logvar.shape == (2, 4, 4, 3)
  # Shift the posterior away from N(0, 1) so the KL is far from zero.
  mean, logvar = mean + 0.7, logvar - 1.3
  recon = model.apply(params, mean, method=GaussianVAE.decode)
  loss, mse, kl = vae_loss(recon, x, mean, logvar, kl_weight=0.25)

  mu = np.asarray(mean, np.float64).reshape(2, -1)
  var = np.exp(np.asarray(logvar, np.float64)).reshape(2, -1)
  d = mu.shape[1]
  kls = []
  for b in range(2):  # KL(N(mu, S) || N(0, I)), general multivariate form
    cov = np.diag(var[b])
    kls.append(0.5 * (np.trace(cov) + mu[b] @ mu[b] - d
                      - np.linalg.slogdet(cov)[1]))
  want_kl = np.mean(kls) / d  # mean-normalised: nats per latent dimension
  want_mse = np.mean((np.asarray(recon, np.float64) - np.asarray(x)) ** 2)
  np.testing.assert_allclose(float(kl), want_kl, rtol=1e-5)
  np.testing.assert_allclose(float(mse), want_mse, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want_mse + 0.25 * want_kl,
                             rtol=1e-5)


def test_calibrated_elbo_is_the_gaussian_nll_at_its_best_variance():
  rng = np.random.default_rng(3)
  x = rng.uniform(-1, 1, (3, 8, 8, 1))
  recon = x + 0.2 * rng.standard_normal(x.shape)
  mean = rng.standard_normal((3, 2, 2, 4))
  logvar = rng.uniform(-3, 0.5, mean.shape)
  loss, mse, kl = calibrated_elbo_loss(*(jnp.asarray(a, jnp.float32)
                                         for a in (recon, x, mean, logvar)))

  def neg_elbo_per_pixel(s2):  # sum over the batch, direct numpy
    nll = np.sum(0.5 * np.log(2 * np.pi * s2) + (recon - x) ** 2 / (2 * s2))
    var = np.exp(logvar)
    kl_sum = np.sum(0.5 * (mean ** 2 + var - 1 - logvar))
    return (nll + kl_sum) / x.size

  want_s2 = np.mean((recon - x) ** 2)
  np.testing.assert_allclose(float(mse), want_s2, rtol=1e-5)
  np.testing.assert_allclose(float(loss), neg_elbo_per_pixel(want_s2),
                             rtol=1e-5)
  # s^2 = mse is the minimiser over the pixel variance.
  for factor in (0.8, 0.95, 1.05, 1.25):
    assert neg_elbo_per_pixel(factor * want_s2) > float(loss)
  assert float(kl) > 0


def _fake_result(name, kind, nn, random, reliable=True, **extra):
  def entry(v):
    return {"log10_mean_overlap": v, "log10_mean_bhattacharyya": v + 1,
            "log10_mean_overlap_lower_bound": 2 * (v + 1) - 0.3,
            "overlap_estimate_reliable": reliable}
  return {"name": name, "kind": kind, "pairs": {"nn": entry(nn),
                                                "random": entry(random)},
          **extra}


def test_compare_ranks_models_and_sets_elbo_vae_against_primary_blae():
  results = [
      _fake_result("vae_kl1e-4", "vae", -50.0, -80.0, kl_weight=1e-4),
      _fake_result("vae_klelbo", "vae", -20.0, -30.0, reliable=False,
                   kl_weight="elbo"),
      _fake_result("blae_sigma0.1", "blae", -25.0, -10.0, sigma=0.1),
      _fake_result("blae_sigma1", "blae", -3.0, -4.0, sigma=1.0)]
  out = mesp_overlap.compare(results, primary_blae_sigma=0.1)
  assert out["nn"]["lowest_overlap_model"] == "vae_kl1e-4"
  assert [n for n, _ in out["random"]["ranking_low_to_high"]] == [
      "vae_kl1e-4", "vae_klelbo", "blae_sigma0.1", "blae_sigma1"]
  assert out["nn"]["blae"] == "blae_sigma0.1"
  assert out["nn"]["blae_below_elbo_vae"] is True
  assert out["random"]["blae_below_elbo_vae"] is False
  assert out["nn"]["conclusive"] is False
  # Certified: the BL-AE's -25 against the VAE's lower bounds -38.3 / -58.3.
  assert out["nn"]["blae_below_elbo_vae_certified"] is False
  results[2]["pairs"]["nn"]["log10_mean_overlap"] = -40.0
  out = mesp_overlap.compare(results, primary_blae_sigma=0.1)
  assert out["nn"]["blae_below_elbo_vae_certified"] is True
  # Without an ELBO VAE there is nothing to set against.
  alone = mesp_overlap.compare(results[2:], primary_blae_sigma=0.1)
  assert "blae_below_elbo_vae" not in alone["nn"]


def test_l_rec_estimator_matches_numpy_for_linear_decoder():
  rng = np.random.default_rng(0)
  n, latent, pixels, s = 5, (2, 2, 3), (4, 4, 1), 7
  dim, npix = int(np.prod(latent)), int(np.prod(pixels))
  w = rng.standard_normal((dim, npix)).astype(np.float32) * 0.3
  bias = rng.standard_normal(npix).astype(np.float32) * 0.1
  mean = rng.standard_normal((n,) + latent).astype(np.float32)
  std = rng.uniform(0.1, 1.0, (n,) + latent).astype(np.float32)
  x = rng.uniform(-1, 1, (n,) + pixels).astype(np.float32)
  eps = rng.standard_normal((s,) + latent).astype(np.float32)
  pairs = np.asarray([[0, 1], [2, 4], [3, 0]])

  def decode(z):
    flat = z.reshape(z.shape[0], -1) @ w + bias
    return flat.reshape((z.shape[0],) + pixels)

  errors = mesp_overlap.expected_reconstruction_errors(
      decode, mean, std, x, eps, batch_size=2)  # uneven batches on purpose
  l_rec, se = mesp_overlap.pair_reconstruction_loss(errors, pairs)

  def err(k):  # [S] direct numpy
    m, sd, t = (a.astype(np.float64).reshape(-1) for a in (mean[k], std[k],
                                                           x[k]))
    z = m[None] + sd[None] * eps.reshape(s, -1).astype(np.float64)
    rec = z @ w.astype(np.float64) + bias
    return np.sum((rec - t[None]) ** 2, axis=1)

  want = [0.5 * (err(i).mean() + err(j).mean()) for i, j in pairs]
  want_se = [0.5 * np.sqrt((err(i).var(ddof=1) + err(j).var(ddof=1)) / s)
             for i, j in pairs]
  np.testing.assert_allclose(l_rec, want, rtol=1e-5)
  np.testing.assert_allclose(se, want_se, rtol=1e-4)


def test_mesp_study_smoke(repo_root, tmp_path):
  config = _config(repo_root, "mesp_study_fashion_mnist.py:smoke")
  summary = stages.run(config, str(tmp_path))
  assert (tmp_path / "mesp_study.png").stat().st_size > 1000
  with open(tmp_path / "mesp_study.json") as f:
    saved = json.load(f)
  kinds = [m["kind"] for m in saved["models"]]
  assert kinds.count("vae") == len(config.vae.kl_weights) + 1  # + ELBO VAE
  assert kinds.count("blae") == len(config.sigma_sweep.sigmas)
  assert saved["all_vae_bounds_below_l_rec"] is True
  comparison = saved["comparison"]["nn"]
  assert comparison["blae"] == f"blae_sigma{config.study.primary_blae_sigma:g}"
  assert isinstance(comparison["blae_below_elbo_vae"], bool)
  elbo = [m for m in saved["models"] if m.get("kl_weight") == "elbo"][0]
  assert elbo["effective_kl_weight"] == pytest.approx(
      2 * elbo["pixel_mse_sampled"] * elbo["latent_dims"] / (32 * 32))
  for m in summary["models"]:
    for s in m["pairs"].values():
      assert s["num_pairs"] > 0
      assert np.isfinite(s["log10_mean_overlap"])
      assert s["log10_mean_overlap"] <= 1e-9  # OVL <= 1
      assert s["mean_bound"] <= s["mean_l_rec"]
      if m["kind"] == "vae":
        assert s["bound_below_l_rec"] is True
        assert s["overlap_above_bhattacharyya"] == 0


@pytest.mark.parametrize("field,value,message", [
    ("study.primary_blae_sigma", 0.5, "primary_blae_sigma=0.5 is not in"),
    ("sigma_sweep.sigmas", (0.1, 0.0), r"sigma_sweep\.sigmas.*> 0"),
    ("vae.kl_weights", (), None),  # fine while calibrated_elbo is on
    ("study.num_nn_pairs", 0, None),
])
def test_mesp_study_config_errors_name_the_field(repo_root, field, value,
                                                 message):
  config = _config(repo_root, "mesp_study_fashion_mnist.py:smoke")
  section, name = field.split(".")
  config[section][name] = value
  if message is None:
    config_lib.validate(config, "mesp_study")
  else:
    with pytest.raises(ValueError, match=message):
      config_lib.validate(config, "mesp_study")
  config = _config(repo_root, "mesp_study_fashion_mnist.py:smoke")
  config.vae.calibrated_elbo = False
  config.vae.kl_weights = ()
  with pytest.raises(ValueError, match="no VAE to train"):
    config_lib.validate(config, "mesp_study")


def test_score_is_one_reproducible_command(repo_root, tmp_path,
                                           feature_net_dir):
  """Stage score: N samples of a sampler with a fixed seed, scored, and
  eval.json records what reproduces the number; a second run in another
  workdir gives the same samples and the same scores."""
  import hashlib

  blae_cfg = _config(repo_root, "blae_fashion_mnist.py:smoke")
  blae_cfg.train.update(num_steps=2, checkpoint_every=2, eval_every=2,
                        log_every=2)
  blae_dir = str(tmp_path / "blae")
  stages.run(blae_cfg, blae_dir)
  tokens_dir = tmp_path / "tokens"
  tokens_dir.mkdir()
  bank = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1))
  np.savez(tokens_dir / "tokens_train.npz", tokens=bank.astype(np.int32),
           labels=np.zeros(64, np.int32), bits=np.int32(8),
           blae_workdir=np.asarray(blae_dir))
  config = _config(repo_root, "score_fashion_mnist.py:smoke")
  config.inputs.update(tokens_dir=str(tokens_dir),
                       feature_net_workdir=feature_net_dir[0])
  runs = [stages.run(config, str(tmp_path / name)) for name in ("a", "b")]

  with open(tmp_path / "a" / "eval.json") as f:
    saved = json.load(f)
  protocol = saved["protocol"]
  assert protocol["num_samples"] == 32
  assert protocol["sampler"]["kind"] == "kernel"
  assert protocol["sampler"]["seed"] == 0
  assert protocol["inception_weights"] is None and saved["fid"] is None

  def sha256(path):
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()

  samples = tmp_path / "a" / "samples" / "samples.npz"
  assert protocol["samples"]["sha256"] == sha256(samples)
  refs = protocol["reference_statistics"]
  assert refs and all(r["sha256"] == sha256(r["path"]) for r in refs)
  assert protocol["feature_net"]["step"] is not None
  assert saved[FD_NAME] == pytest.approx(runs[0][FD_NAME])
  # Same seed, same samples, same numbers.
  with np.load(samples) as a, np.load(tmp_path / "b" / "samples" /
                                      "samples.npz") as b:
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert runs[1][FD_NAME] == runs[0][FD_NAME]
  assert (runs[1]["protocol"]["samples"]["sha256"] ==
          protocol["samples"]["sha256"])
