"""The ahead-of-time check (``python -m mesp_jax.aot``) on fake CPU devices,
and for a TPU topology where libtpu is installed."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mesp_jax import aot
from mesp_jax.base import config as config_lib
from mesp_jax.models import arvm as arvm_lib

LATENT = (4, 4, 24)
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _arvm_smoke():
  return config_lib.load_config("configs/arvm_imagenet.py:smoke")


def test_cpu8_report_counts_parameters_and_splits_the_work():
  """Parameter count equals the model's own; per-device FLOPs of the
  8-device train step are an eighth of the 1-device step's (data parallel:
  the same work, split), within 5 %. Each device also runs the whole AdamW
  update (the parameters are replicated), so the batch is large enough for
  the model's own work to dominate."""
  config = _arvm_smoke()
  config.train.grad_accum_steps = 1  # no loop XLA would count once
  config.train.batch_size = 256
  report = aot.check(config, "cpu:8", latent=LATENT, compare_scan=True)
  model = arvm_lib.build_arvm(config.arvm, LATENT[:2], LATENT[2])
  shapes = jax.eval_shape(
      model.init, jax.random.key(0),
      np.zeros((1, 4, 4, model.tokens_per_pos), np.int32),
      np.zeros((1,), np.int32))
  assert report["params"] == sum(math.prod(x.shape)
                                 for x in jax.tree.leaves(shapes))
  labels = [r.label for r in report["results"]]
  assert labels[0] == "train step (no scan)"
  assert labels[1].startswith("decode step (16 rows")
  assert labels[2] == "train step (scan)"
  train = report["results"][0]
  assert train.flops > 0 and train.temp_bytes > 0 and train.argument_bytes > 0
  assert not train.loops and report["results"][2].loops
  # The 1-device compile of the same step.
  config.mesh.data = 1
  one = aot.check(config, "cpu:1", latent=LATENT, with_sampler=False)
  np.testing.assert_allclose(train.flops * 8, one["results"][0].flops,
                             rtol=0.05)
  text = aot.format_report("smoke", report)
  assert "| train step (scan) |" in text and "no prediction" in text


def test_bad_topologies_say_what_to_use():
  config = _arvm_smoke()
  with pytest.raises(aot.AotError, match="use v4-32, v5e-256"):
    aot.check(config, "v9-8", latent=LATENT)
  with pytest.raises(aot.AotError, match="xla_force_host_platform_device_count"):
    aot.check(config, f"cpu:{jax.device_count() * 2}", latent=LATENT)
  with pytest.raises(aot.AotError, match="--latent=HxWxC"):
    aot.check(config, "cpu:8")  # no tokens in the smoke config


def test_cli_compiles_the_blae_smoke_on_cpu8():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the command sets up cpu:8 itself
  out = subprocess.run(
      [sys.executable, "-m", "mesp_jax.aot",
       "--config=configs/blae_imagenet.py:smoke", "--topology=cpu:8"],
      capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "configs/blae_imagenet.py:smoke on cpu:8" in out.stdout
  assert "| train step |" in out.stdout
  assert "'data': 8" in out.stdout


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install .[tpu])")
def test_tpu_topology_compiles_and_an_oversized_model_fails_clearly():
  config = _arvm_smoke()
  report = aot.check(config, "v5e-4", latent=LATENT, with_sampler=False)
  assert report["target"].hbm_bytes == 16 * aot.GiB
  assert report["results"][0].total_bytes < report["target"].hbm_bytes
  config.arvm.update(num_layers=8, d_model=4096, num_heads=16,
                     scan_layers=True)
  with pytest.raises(aot.AotError, match="needs .* of device memory and the "
                     "device has"):
    aot.check(config, "v5e-4", latent=LATENT, with_sampler=False)
