"""Stages kernel_sample and gamma_sweep on a tiny BL-AE and a synthetic bank.

References are independent of the code under test: brute-force numpy Hamming
distances between sample and bank latents, and the BL-AE's decoder called
directly on the stored tokens.
"""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from test_kernel_arvm import reference_histograms

from mesp_jax import stages
from mesp_jax.base import config as config_lib
from mesp_jax.base import io
from mesp_jax.base.config import load_config
from mesp_jax.base.gamma import parse_gammas
from mesp_jax.data.sources import DataNotFoundError
from mesp_jax.eval import fid as fid_lib
from mesp_jax.experiments import gamma_sweep as gs
from mesp_jax.experiments import plots
from mesp_jax.models.blae import decode_tokens
from mesp_jax.sample import kernel as kernel_lib
from mesp_jax.train import blae as blae_stage

BANK_SIZE = 96
GRID = (8, 8)  # the smoke BL-AE: 32x32 images, factor 4, 8 bits per position


@pytest.fixture(scope="module")
def tiny_bank(repo_root, tmp_path_factory):
  """A 2-step smoke BL-AE and a bank of distinct random 8-bit latents."""
  root = tmp_path_factory.mktemp("gamma_sweep")
  blae_cfg = load_config(os.path.join(repo_root,
                                      "configs/blae_fashion_mnist.py:smoke"))
  blae_cfg.train.update(num_steps=2, checkpoint_every=2, eval_every=2,
                        log_every=2)
  blae_dir = str(root / "blae")
  stages.run(blae_cfg, blae_dir)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, size=(BANK_SIZE, *GRID, 1)).astype(np.int32)
  flat = tokens.reshape(BANK_SIZE, -1)
  assert len(np.unique(flat, axis=0)) == BANK_SIZE  # distinct latents
  token_dir = root / "tokens"
  token_dir.mkdir()
  np.savez(token_dir / "tokens_train.npz", tokens=tokens,
           labels=np.zeros(BANK_SIZE, np.int32), bits=np.int32(8),
           blae_workdir=np.asarray(blae_dir))
  # A small test split, for the neural ARVMs' evaluation (stage lch_study).
  np.savez(token_dir / "tokens_test.npz", tokens=tokens[:16],
           labels=np.zeros(16, np.int32), bits=np.int32(8),
           blae_workdir=np.asarray(blae_dir))
  return {"root": root, "tokens_dir": str(token_dir), "blae_dir": blae_dir,
          "tokens": tokens}


def smoke_config(repo_root, tokens_dir, num_samples=None, batch_size=None,
                 **kernel):
  config = load_config(os.path.join(
      repo_root, "configs/gamma_sweep_fashion_mnist.py:smoke"))
  config.inputs.tokens_dir = tokens_dir
  config.kernel.update(kernel)
  if num_samples:
    config.sampler.update(num_samples=num_samples, batch_size=batch_size)
  return config


def min_hamming_bits(samples: np.ndarray, bank: np.ndarray) -> np.ndarray:
  """Brute force: [S] smallest bitwise Hamming distance to any bank latent."""
  s = samples.reshape(samples.shape[0], -1).astype(np.uint8)
  b = bank.reshape(bank.shape[0], -1).astype(np.uint8)
  xor = s[:, None, :] ^ b[None, :, :]  # [S, N, T]
  return np.unpackbits(xor[..., None], axis=-1).sum(axis=(2, 3)).min(axis=1)


def test_sweep_writes_results_and_global_context_copies(repo_root, tiny_bank,
                                                        tmp_path):
  config = smoke_config(repo_root, tiny_bank["tokens_dir"], sigma_s=0.2)
  config.sweep.gammas = "0,global"
  workdir = str(tmp_path / "sweep")
  stages.run(config, workdir)

  with open(os.path.join(workdir, "gamma_sweep.json")) as f:
    out = json.load(f)
  assert [r["gamma"] for r in out["results"]] == ["0", "global"]
  assert out["bank"]["size"] == BANK_SIZE
  assert out["distance"]["name"] == "fd_pixels"
  for row in out["results"]:
    for key in ("copy_rate", "copy_rate_recon", "copy_rate_latent"):
      assert 0.0 <= row[key] <= 1.0
    assert np.isfinite(row["fd_pixels"]) and row["fd_pixels"] >= 0
    for name in ("samples.png", "triplets.png", "triplets_recon.png"):
      assert os.path.exists(os.path.join(workdir, row["dir"], name))
  with Image.open(os.path.join(workdir, "gamma_sweep.png")) as im:
    assert im.size[0] > 400 and im.size[1] > 200

  bank = tiny_bank["tokens"]
  total_bits = bank[0].size * 8
  by_gamma = {r["gamma"]: r for r in out["results"]}
  for label in ("0", "global"):
    with np.load(os.path.join(workdir, f"kernel_gamma_{label}",
                              "samples.npz")) as f:
      ham = min_hamming_bits(f["tokens"], bank)
    want = np.mean(ham <= 0.01 * total_bits)
    assert by_gamma[label]["copy_rate_latent"] == pytest.approx(want)
    if label == "global":
      # p_flip = Phi(-5) = 3e-7: every sample is exactly a bank entry.
      np.testing.assert_array_equal(ham, 0)
      assert by_gamma[label]["copy_rate_latent"] == 1.0
      assert by_gamma[label]["copy_rate_recon"] == 1.0
    else:
      # Without context, tokens mix bank entries: far from every latent.
      assert by_gamma[label]["copy_rate_latent"] == 0.0


def test_gamma0_large_sigma_does_not_copy(repo_root, tiny_bank, tmp_path):
  config = smoke_config(repo_root, tiny_bank["tokens_dir"], sigma_s=2.0)
  config.sweep.gammas = "0"
  workdir = str(tmp_path / "sweep")
  out = stages.run(config, workdir)
  (row,) = out["results"]
  with np.load(os.path.join(workdir, "kernel_gamma_0", "samples.npz")) as f:
    ham = min_hamming_bits(f["tokens"], tiny_bank["tokens"])
  assert row["copy_rate_latent"] == pytest.approx(np.mean(ham <= 5))
  assert row["copy_rate_latent"] < 0.5
  assert np.median(ham) > 50  # of 512 bits


def test_kernel_sample_stage_images_decode_from_tokens(repo_root, tiny_bank,
                                                       tmp_path):
  config = smoke_config(repo_root, tiny_bank["tokens_dir"], sigma_s=0.5,
                        gamma=1, num_samples=12, batch_size=8)
  config.stage = "kernel_sample"
  workdir = str(tmp_path / "ks")
  stages.run(config, workdir)
  assert os.path.exists(os.path.join(workdir, "samples.png"))
  with np.load(os.path.join(workdir, "samples.npz")) as f:
    tokens, images = f["tokens"], f["images"]
    assert str(f["gamma"]) == "1"
  assert tokens.shape == (12, *GRID, 1)
  assert images.shape == (12, 32, 32, 1)
  assert tokens.min() >= 0 and tokens.max() < 256
  model, params, _, _ = blae_stage.load_blae(tiny_bank["blae_dir"])
  want = np.asarray(decode_tokens(model, params, tokens, 8))
  np.testing.assert_allclose(images, want, atol=1e-5)


def test_config_parsing_and_plot_positions():
  assert parse_gammas("0, 1,global") == [0, 1, None]
  assert parse_gammas((2, "global")) == [2, None]
  with pytest.raises(ValueError, match="duplicates"):
    parse_gammas("1,global,GLOBAL")
  with pytest.raises(ValueError):
    parse_gammas("")
  assert gs.parse_workdir_map("3=/a, global=/b") == {"3": "/a",
                                                     "global": "/b"}
  assert gs.parse_workdir_map({1: "/c"}) == {"1": "/c"}
  with pytest.raises(ValueError, match="gamma=workdir"):
    gs.parse_workdir_map("/a")
  assert plots.gamma_positions(["0", "1", "5", "global"]) == {
      "0": 0.0, "1": 1.0, "5": 5.0, "global": 7.0}
  assert io.json_safe({"a": [float("inf"), 1.0]}) == {"a": ["inf", 1.0]}


@pytest.mark.parametrize("num", [2, 7, 40])
def test_low_rank_frechet_distance_equals_the_reference(num):
  rng = np.random.default_rng(num)
  dim = 24
  ref = rng.normal(size=(200, dim)) @ rng.normal(size=(dim, dim)) + 0.3
  mu, sigma = fid_lib.feature_stats(ref)
  fake = rng.normal(size=(num, dim)) * 1.5
  want = fid_lib.frechet_distance(mu, sigma, *fid_lib.feature_stats(fake))
  got = fid_lib.frechet_distance_to_samples(mu, sigma, fake)
  # The D x D reference takes square roots of the round-off (~1e-13) left in
  # its D - S + 1 zero eigenvalues, which moves it by ~1e-6.
  assert got == pytest.approx(want, rel=1e-7)


def test_non_pixel_copies_are_scored_apart(repo_root, tiny_bank, tmp_path):
  """The authors' protocol in the sweep: the distance of the samples that
  are not pixel copies equals the distance of that subset computed alone."""
  config = smoke_config(repo_root, tiny_bank["tokens_dir"], sigma_s=0.2)
  config.sweep.gammas = "global"
  workdir = str(tmp_path / "sweep")
  out = stages.run(config, workdir)
  (row,) = out["results"]
  with np.load(os.path.join(workdir, "kernel_gamma_global",
                            "samples.npz")) as f:
    images, psnr = f["images"], f["psnr"]
  keep = psnr < config.sweep.threshold_db
  assert row["num_non_pixel_copies"] == int(keep.sum())
  assert row["num_non_copies"] <= row["num_non_pixel_copies"]
  reference = gs.read_images(
      blae_stage.load_blae(tiny_bank["blae_dir"])[2].data, "test",
      config.sweep.reference_examples)
  space = gs.make_distance(reference, "test", "", "fashion_mnist", "")
  want = space.distance(images[keep]) if keep.sum() >= 2 else None
  assert row["fd_pixels_non_pixel_copies"] == pytest.approx(want)
  assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0


@pytest.mark.parametrize("gamma,sigma_s", [(1, 0.6), ("global", 0.3)])
def test_kernel_bits_per_token_matches_the_formula(gamma, sigma_s):
  """Held-out bits per token against -log2 of the literal float64 kernel
  estimator at the true tokens; 5 latents in batches of 2 (a padded last
  batch)."""
  rng = np.random.default_rng(3)
  group, grid = 3, (3, 4, 2)
  bank = rng.integers(0, 2**group, (40, *grid))
  held_out = rng.integers(0, 2**group, (5, *grid))
  held_out[1] = bank[7]  # a held-out latent that is in the bank
  kbank = kernel_lib.prepare_bank(bank, group=group, chunk_size=16)
  got = gs.kernel_bits_per_token(kbank, held_out, sigma_s=sigma_s,
                                 gamma=gamma, order="raster", rng=None,
                                 batch_size=2)
  ref = reference_histograms(bank, held_out, group, sigma_s, gamma,
                             np.arange(grid[0] * grid[1]))
  prob = np.take_along_axis(ref, held_out[..., None], axis=-1)
  assert got == pytest.approx(float(-np.log2(prob).mean()), rel=1e-5)
  with pytest.raises(ValueError, match="do not match the bank's grid"):
    gs.kernel_bits_per_token(kbank, held_out[:, :2], sigma_s=sigma_s,
                             gamma=gamma, order="raster", rng=None,
                             batch_size=2)


def test_missing_test_split_names_bits_examples(repo_root, tiny_bank,
                                                tmp_path):
  """A bank without its test split: the error says how to go on."""
  only_train = tmp_path / "tokens"
  only_train.mkdir()
  shutil.copy(os.path.join(tiny_bank["tokens_dir"], "tokens_train.npz"),
              only_train)
  config = smoke_config(repo_root, str(only_train))
  with pytest.raises(DataNotFoundError, match="bits_examples=0"):
    stages.run(config, str(tmp_path / "sweep"))
  config.sweep.bits_examples = 0  # then the sweep runs without the bits
  out = stages.run(config, str(tmp_path / "sweep"))
  assert all("bits_per_token" not in r for r in out["results"])


def test_lch_study_smoke(repo_root, tiny_bank, tmp_path):
  """One neural ARVM per gamma with the same budget, the kernel at two
  noises and the neural ARVMs once, in one table and figure; a rerun only
  restores the ARVMs."""
  config = load_config(os.path.join(repo_root,
                                    "configs/lch_fashion_mnist.py:smoke"))
  config.sweep.inputs.tokens_dir = tiny_bank["tokens_dir"]
  workdir = str(tmp_path / "lch")
  out = stages.run(config, workdir)
  got = sorted((r["series"], r["gamma"]) for r in out["rows"])
  assert got == sorted(
      [(f"kernel, sigma_s={s}", g) for s in ("0.3", "0.5")
       for g in ("1", "global")] + [("neural", "1"), ("neural", "global")])
  steps = int(config.arvm.train.num_steps)
  for row in out["rows"]:
    assert 0.0 <= row["copy_rate_recon"] <= 1.0
    if row["series"] != "neural":  # the kernel's held-out bits per token
      assert row["bits_examples"] == config.sweep.sweep.bits_examples
      assert np.isfinite(row["bits_per_token"]) and row["bits_per_token"] > 0
      continue
    arvm_dir = os.path.join(workdir, f"arvm_gamma_{row['gamma']}")
    with open(os.path.join(arvm_dir, "arvm_config.json")) as f:
      assert str(json.load(f)["arvm"]["gamma"]) == row["gamma"]
    evals = _evals(arvm_dir)
    assert evals[-1]["step"] == steps  # the same budget for every gamma
    assert row["bits_per_token"] == pytest.approx(evals[-1]["bits_per_token"])
  with open(os.path.join(workdir, "lch.md")) as f:
    table = f.read().splitlines()
  assert len(table) == 2 + len(out["rows"])
  with Image.open(os.path.join(workdir, "lch.png")) as im:
    assert im.size[0] > 600
  before = _evals(os.path.join(workdir, "arvm_gamma_1"))
  again = stages.run(config, workdir)
  assert _evals(os.path.join(workdir, "arvm_gamma_1"))[-1] == before[-1]
  assert ([r.get("bits_per_token") for r in again["rows"]] ==
          [r.get("bits_per_token") for r in out["rows"]])


def _evals(workdir: str) -> list[dict]:
  """The evaluation rows of a training workdir's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r.get("split") == "eval"]


@pytest.mark.parametrize("field,value,message", [
    ("sweep.inputs.tokens_dir", "", "config.sweep.inputs.tokens_dir"),
    ("sigmas", "0.3,-1", "config.sigmas"),
    ("gammas", "1,wide", "config.gammas"),
    ("arvm.train.num_steps", 0, "config.train.num_steps"),
])
def test_lch_study_config_errors_name_the_field(repo_root, field, value,
                                                message, tmp_path):
  config = load_config(os.path.join(repo_root,
                                    "configs/lch_fashion_mnist.py:smoke"))
  config.sweep.inputs.tokens_dir = str(tmp_path)
  node = config
  *path, last = field.split(".")
  for part in path:
    node = node[part]
  node[last] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    stages.run(config, str(tmp_path / "lch"))
  assert not os.path.exists(tmp_path / "lch" / "arvm_gamma_1")
