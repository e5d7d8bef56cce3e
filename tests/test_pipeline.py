"""The demo pipeline end to end (smoke sizes): BL-AE -> tokens -> ARVM ->
samples -> report, and the stored samples decode from the stored tokens."""

import json
import os

import numpy as np

from mesp_jax.base.config import load_config
from mesp_jax.models.blae import decode_tokens
from mesp_jax.stages.pipeline import run
from mesp_jax.train import blae as blae_stage


def test_smoke_pipeline(repo_root, tmp_path):
  config = load_config(os.path.join(repo_root, "configs/demo.py:smoke"))
  workdir = str(tmp_path)
  run(config, workdir)
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  assert report["blae_eval"]["step"] == config.blae.train.num_steps
  assert "psnr" in report["blae_eval"] and "bin_rate" in report["blae_eval"]
  assert report["arvm_eval"]["bits_per_token"] > 0
  for name in ("report.md", "blae/recon_latest.png", "samples/samples.png",
               "arvm/samples_latest.png"):
    assert os.path.exists(os.path.join(workdir, name)), name

  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
  group = int(samples["group"])
  tokens, images = samples["tokens"], samples["images"]
  assert tokens.shape[0] == config.arvm.sampler.num_samples
  assert tokens.min() >= 0 and tokens.max() < 2**group
  model, params, _, _ = blae_stage.load_blae(os.path.join(workdir, "blae"))
  np.testing.assert_allclose(
      np.asarray(decode_tokens(model, params, tokens, group)), images,
      atol=1e-5)
