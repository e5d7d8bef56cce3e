"""Two JAX processes (jax.distributed, 4 CPU devices each) train exactly like
one process with 8 devices: the loader shards by process, only process 0
writes, and the checkpoints are shared."""

import json
import os
import subprocess

import pytest

from mesp_jax import stages
from mesp_jax.base.config import load_config


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  return {(r["split"], r["step"]): r.get("loss", r.get("psnr")) for r in recs}


def test_two_processes_equal_one(repo_root, tmp_path):
  import sys
  env = dict(os.environ, PY=sys.executable, N="2", D="4",
             PORT=str(20000 + os.getpid() % 20000))
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      ["bash", "launch/multiprocess_local.sh",
       "--config=configs/blae_fashion_mnist.py:smoke",
       f"--workdir={tmp_path / 'multi'}"],
      cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

  config = load_config(os.path.join(repo_root,
                                    "configs/blae_fashion_mnist.py:smoke"))
  stages.run(config, str(tmp_path / "single"))
  multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
  assert multi.keys() == single.keys()
  for key, value in single.items():
    assert multi[key] == pytest.approx(value, rel=1e-5), key
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["2", "4"]
