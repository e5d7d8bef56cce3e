"""The demo pipeline end to end (smoke sizes): BL-AE -> tokens -> ARVM ->
samples -> report; then the Python API on the same run (the README's
example, executed as written)."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mesp_jax
from mesp_jax import stages
from mesp_jax.base.config import load_config
from mesp_jax.data.sample_set import SampleSet
from mesp_jax.models.blae import decode_tokens
from mesp_jax.stages.pipeline import run
from mesp_jax.train import blae as blae_stage
from mesp_jax.train import provenance


@pytest.fixture(scope="module")
def smoke_run(repo_root, tmp_path_factory):
  config = load_config(os.path.join(repo_root, "configs/demo.py:smoke"))
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  run(config, workdir)
  return config, workdir


def test_smoke_pipeline(smoke_run):
  config, workdir = smoke_run
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  assert report["blae_eval"]["step"] == config.blae.train.num_steps
  assert "psnr" in report["blae_eval"] and "bin_rate" in report["blae_eval"]
  assert report["arvm_eval"]["bits_per_token"] > 0
  for name in ("report.md", "blae/recon_latest.png", "samples/samples.png",
               "arvm/samples_latest.png"):
    assert os.path.exists(os.path.join(workdir, name)), name

  samples = SampleSet.load(os.path.join(workdir, "samples", "samples.npz"))
  assert samples.kind == "neural" and samples.gamma == "3"
  assert samples.sources["arvm_workdir"] == os.path.join(workdir, "arvm")
  assert samples.sources["blae_step"] == config.blae.train.num_steps
  tokens, images = samples.tokens, samples.images
  assert len(samples) == config.arvm.sampler.num_samples
  assert tokens.min() >= 0 and tokens.max() < 2**samples.group
  np.testing.assert_array_equal(samples.labels, np.arange(len(samples)) % 10)
  model, params, _, _ = blae_stage.load_blae(os.path.join(workdir, "blae"))
  np.testing.assert_allclose(
      np.asarray(decode_tokens(model, params, tokens, samples.group)), images,
      atol=1e-5)


def _readme_example(repo_root: str) -> str:
  with open(os.path.join(repo_root, "README.md")) as f:
    text = f.read()
  part = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
  return re.search(r"```python\n(.*?)```", part, re.S).group(1)


def test_readme_python_example_runs_as_written(repo_root, smoke_run):
  _, workdir = smoke_run
  code = _readme_example(repo_root)
  assert "runs/demo" in code
  scope: dict = {}
  exec(compile(code.replace("runs/demo", workdir), "README.md", "exec"),
       scope)
  images, tokens, again = scope["images"], scope["tokens"], scope["again"]
  assert images.shape == (16, 32, 32, 1)
  assert images.min() >= -1 and images.max() <= 1
  assert tokens.shape == (16, 8, 8, 1) and tokens.dtype == np.int32
  # decode(encode(decode(t))) is decode(encode(...)): the sign bits of a
  # decoded image's code are a fixed point for this round trip only if the
  # BL-AE is perfect, so compare with the reference decode instead.
  model, params, _, _ = blae_stage.load_blae(os.path.join(workdir, "blae"))
  np.testing.assert_allclose(
      np.asarray(decode_tokens(model, params, tokens, 8)), again, atol=1e-5)


def test_generator_draws_what_the_sample_stage_drew(smoke_run):
  config, workdir = smoke_run
  stage = SampleSet.load(os.path.join(workdir, "samples", "samples.npz"))
  gen = mesp_jax.load_generator(workdir,
                                batch_size=config.arvm.sampler.batch_size)
  tokens = gen.sample_tokens(len(stage), seed=config.arvm.sampler.seed)
  np.testing.assert_array_equal(tokens, stage.tokens)
  with pytest.raises(FileNotFoundError, match="no trained ARVM"):
    mesp_jax.load_generator(os.path.join(workdir, "blae"), kind="neural")


def test_two_processes_write_the_samples_of_one(repo_root, smoke_run,
                                                tmp_path):
  """Stage sample on 2 JAX processes (4 CPU devices each): each writes its
  shard, process 0 a manifest, and the set equals one process's."""
  _, workdir = smoke_run
  args = ["--config=configs/arvm_fashion_mnist.py:smoke",
          "--config.stage=sample",
          f"--config.inputs.arvm_workdir={os.path.join(workdir, 'arvm')}",
          "--config.sampler.num_samples=20", "--config.sampler.batch_size=8",
          "--config.sampler.order=wavefront"]
  env = dict(os.environ, PY=sys.executable, N="2", D="4",
             PORT=str(20000 + (os.getpid() + 7) % 20000))
  env.pop("XLA_FLAGS", None)
  multi = tmp_path / "multi"
  result = subprocess.run(
      ["bash", "launch/multiprocess_local.sh", f"--workdir={multi}", *args],
      cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  for name in ("samples-00000-of-00002.npz", "samples-00001-of-00002.npz",
               "samples_manifest.json", "samples.png"):
    assert (multi / name).exists(), (name, sorted(os.listdir(multi)))
  assert not (multi / "samples.npz").exists()

  config = load_config(os.path.join(repo_root,
                                    "configs/arvm_fashion_mnist.py:smoke"))
  config.stage = "sample"
  config.inputs.arvm_workdir = os.path.join(workdir, "arvm")
  config.sampler.update(num_samples=20, batch_size=8, order="raster")
  one = stages.run(config, str(tmp_path / "single"))
  single = SampleSet.load(one["npz"])
  joined = SampleSet.load(str(multi / "samples_manifest.json"))
  np.testing.assert_array_equal(joined.tokens, single.tokens)
  np.testing.assert_array_equal(joined.labels, single.labels)
  np.testing.assert_allclose(joined.images, single.images, atol=1e-5)
  # Batches 0 and 2 on process 0, batch 1 on process 1 (the last one short).
  shard = SampleSet.load(str(multi / "samples-00001-of-00002.npz"))
  np.testing.assert_array_equal(shard.extra["index"], np.arange(8, 16))


def test_samples_record_their_checkpoints(smoke_run):
  _, workdir = smoke_run
  samples = SampleSet.load(os.path.join(workdir, "samples", "samples.npz"))
  for stage in ("arvm", "blae"):
    folder = os.path.join(workdir, stage)
    want = provenance.checkpoint_identity(folder)
    assert samples.sources[f"{stage}_step"] == want["step"]
    assert samples.sources[f"{stage}_digest"] == want["digest"] is not None
  record = provenance.read(os.path.join(workdir, "samples"), "sample")
  assert record["inputs"]["arvm"]["workdir"] == os.path.join(workdir, "arvm")


def test_decoding_with_another_blae_is_refused(repo_root, smoke_run,
                                               tmp_path):
  """A copy of the BL-AE is another workdir: the ARVM's tokens were not
  made by it, so its images would not be what the tokens mean."""
  _, workdir = smoke_run
  other = tmp_path / "other_blae"
  shutil.copytree(os.path.join(workdir, "blae"), other)
  config = load_config(os.path.join(repo_root,
                                    "configs/arvm_fashion_mnist.py:smoke"))
  config.stage = "sample"
  config.inputs.update(arvm_workdir=os.path.join(workdir, "arvm"),
                       blae_workdir=str(other))
  config.sampler.update(num_samples=8, batch_size=8)
  with pytest.raises(provenance.InputsChangedError,
                     match=f"(?s)encoded by the BL-AE {workdir}/blae at "
                     f"checkpoint step .*decoded by {other}"):
    stages.run(config, str(tmp_path / "s"))
  assert not (tmp_path / "s" / "samples.npz").exists()
  config.inputs.allow_changed = True
  stages.run(config, str(tmp_path / "s"))
  assert (tmp_path / "s" / "samples.npz").exists()
