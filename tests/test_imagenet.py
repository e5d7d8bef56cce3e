"""The ImageNet path end to end on a miniature ImageNet made on the spot.

JPEG decode and crops through grain, the 256-px BL-AE design at 64 px,
per-process token shards, the class-conditional ARVM with EMA and gradient
accumulation, CFG samples, the copy evaluation; the headline command's fast
failure; 2 processes against 1; a folder data set by config only.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mesp_jax import stages
from mesp_jax.base.config import load_config
from mesp_jax.data import tokens as tokens_lib
from mesp_jax.data.mini_imagenet import make_mini_imagenet
from mesp_jax.data.sample_set import SampleSet
from mesp_jax.train import arvm as arvm_train
from mesp_jax.train import loop


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  return {(r["split"], r["step"]): r.get("loss", r.get("bits_per_token"))
          for r in _metrics(workdir)}


@pytest.fixture(scope="module")
def mini_imagenet(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  make_mini_imagenet(str(data_dir), num_train=96, num_validation=32, seed=0)
  return str(data_dir)


@pytest.fixture(scope="module")
def pipeline_run(mini_imagenet, repo_root, tmp_path_factory):
  config = load_config(os.path.join(repo_root,
                                    "configs/imagenet_pipeline.py:smoke"))
  config.blae.data.data_dir = mini_imagenet
  workdir = tmp_path_factory.mktemp("imagenet_pipeline")
  report = stages.run(config, str(workdir))
  return str(workdir), report, config


def test_pipeline_smoke_end_to_end(pipeline_run):
  workdir, report, config = pipeline_run
  # BL-AE on 64x64 crops: f = 16, 24 bits -> 4x4x24 latents.
  assert report["blae_eval"]["step"] == config.blae.train.num_steps
  assert np.isfinite(report["blae_eval"]["psnr"])
  # Tokens: a manifest and per-process shards for train and validation.
  for split, n in (("train", 96), ("validation", 32)):
    info = tokens_lib.read_info(tokens_lib.tokens_path(
        os.path.join(workdir, "tokens"), split))
    assert info["num_examples"] == n and info["bits"] == 24
    assert tuple(info["grid"]) == (4, 4)
  # ARVM: class-conditional over 1000 classes, 2 tokens of 12 bits a position.
  assert report["arvm_eval"]["step"] == config.arvm.train.num_steps
  assert np.isfinite(report["arvm_eval"]["bits_per_token"])
  samples = SampleSet.load(report["samples"]["npz"])
  assert samples.tokens.shape == (16, 4, 4, 2) and samples.group == 12
  assert samples.images.shape == (16, 64, 64, 3)
  assert samples.labels.min() >= 0 and samples.labels.max() < 1000
  assert samples.settings["cfg_scale"] == config.arvm.sampler.cfg_scale > 0
  m = report["memorisation"]
  assert m["train_examples"] == 96 and m["bits_per_latent"] == 4 * 4 * 24
  assert 0.0 <= m["latent_copy_rate"] <= 1.0
  text = open(os.path.join(workdir, "report.md")).read()
  assert "latent copy rate" in text
  for png in ("blae/recon_latest.png", "samples/samples.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 0


def test_sampling_uses_the_ema_parameters(pipeline_run):
  workdir, _, _ = pipeline_run
  arvm_dir = os.path.join(workdir, "arvm")
  model, ema, config, _, _ = arvm_train.load_arvm(arvm_dir)
  assert config.train.ema_decay > 0
  train_src, _ = arvm_train.token_sources(config)
  example = train_src.read(np.arange(1))["tokens"]
  raw, _ = loop.restore_params(
      arvm_dir, config,
      lambda r: model.init(r, example, np.zeros((1,), np.int32)),
      arvm_train.model_meta(config, train_src.grid, train_src.bits),
      use_ema=False)
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw),
                           strict=True)]
  assert max(diffs) > 0  # load_arvm (what sampling calls) gives the EMA


def test_headline_command_fails_fast_without_imagenet(repo_root, tmp_path):
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "no_tfds"),
             JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  start = time.time()
  result = subprocess.run(
      [sys.executable, "-m", "mesp_jax.main",
       f"--config={repo_root}/configs/arvm_imagenet.py",
       f"--workdir={tmp_path / 'run'}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  elapsed = time.time() - start
  assert result.returncode == 2, result.stderr[-2000:]
  assert elapsed < 10, elapsed
  for step in ("python -m mesp_jax.data.prepare --dataset=imagenet2012",
               "--manual_dir=", "configs/blae_imagenet.py",
               "--config.stage=blae_encode"):
    assert step in result.stderr
  assert "Traceback" not in result.stderr


def _arvm_param_count(config, grid=(16, 16), bits=24) -> int:
  from mesp_jax.models import arvm as arvm_lib
  model = arvm_lib.build_arvm(config.arvm, grid, bits)
  tp = bits // config.arvm.group
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          np.zeros((1,) + grid + (tp,), np.int32),
                          np.zeros((1,), np.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_full_configs_are_what_their_docs_say(repo_root):
  config = load_config(os.path.join(repo_root, "configs/arvm_imagenet.py"))
  count = _arvm_param_count(config)
  doc = open(os.path.join(repo_root, "configs/arvm_imagenet.py")).read()
  assert f"{count:,} parameters" in doc, count
  assert 2**config.arvm.group <= 4096
  assert config.arvm.num_classes == 1000 and config.arvm.label_drop == 0.1
  blae = load_config(os.path.join(repo_root, "configs/blae_imagenet.py"))
  from mesp_jax.models.blae import build_blae
  model = build_blae(blae.blae, 3)
  assert model.latent_shape((256, 256, 3)) == (16, 16, 24)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          np.zeros((1, 256, 256, 3), np.float32),
                          np.zeros((1, 16, 16, 24), np.float32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  doc = open(os.path.join(repo_root, "configs/blae_imagenet.py")).read()
  assert f"{count:,} parameters" in doc, count
  stages_cfg = load_config(os.path.join(repo_root,
                                        "configs/imagenet_pipeline.py"))
  assert stages_cfg.blae.data.image_size == 256


def test_two_processes_train_the_arvm_like_one(pipeline_run, repo_root,
                                               tmp_path):
  """The ARVM ImageNet smoke: 2 processes x 4 devices == 1 process x 8."""
  workdir, _, _ = pipeline_run
  tokens_dir = os.path.join(workdir, "tokens")
  flags = [f"--config.inputs.tokens_dir={tokens_dir}",
           f"--config.inputs.blae_workdir={workdir}/blae",
           "--config.tokens.train_split=train",
           "--config.tokens.eval_split=validation"]
  env = dict(os.environ, PY=sys.executable, N="2", D="4",
             PORT=str(20000 + (os.getpid() + 7) % 20000))
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      ["bash", "launch/multiprocess_local.sh",
       "--config=configs/arvm_imagenet.py:smoke",
       f"--workdir={tmp_path / 'multi'}"] + flags,
      cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

  config = load_config(os.path.join(repo_root,
                                    "configs/arvm_imagenet.py:smoke"))
  config.inputs.update(tokens_dir=tokens_dir, blae_workdir=f"{workdir}/blae")
  config.tokens.update(train_split="train", eval_split="validation")
  stages.run(config, str(tmp_path / "single"))
  multi, single = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
  assert multi.keys() == single.keys() and single
  for key, value in single.items():
    assert multi[key] == pytest.approx(value, rel=1e-5), key
  procs = os.listdir(tmp_path / "multi" / "checkpoints" / "4" / "loader")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(procs)


def test_bf16_smoke_losses_stay_near_float32(pipeline_run, repo_root,
                                            tmp_path):
  """The ARVM smoke trains in bf16 (the ImageNet config's dtype); the same
  run in float32 has losses within 1 % at every logged step."""
  workdir, _, config = pipeline_run
  assert config.arvm.arvm.dtype == "bfloat16"
  f32 = load_config(os.path.join(repo_root, "configs/arvm_imagenet.py:smoke"))
  f32.arvm.dtype = "float32"
  f32.inputs.update(tokens_dir=os.path.join(workdir, "tokens"),
                    blae_workdir=os.path.join(workdir, "blae"))
  f32.tokens.update(train_split="train", eval_split="validation")
  stages.run(f32, str(tmp_path / "f32"))
  bf16, full = _losses(os.path.join(workdir, "arvm")), _losses(tmp_path / "f32")
  assert bf16.keys() == full.keys()
  for key, value in full.items():
    assert bf16[key] != value, key  # really two dtypes
    assert bf16[key] == pytest.approx(value, rel=0.01), key


def test_folder_data_set_trains_a_blae_by_config_only(repo_root, tmp_path):
  """A few hundred PNGs in class folders; only config fields change."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for c in range(4):
    folder = tmp_path / "pngs" / f"class_{c}"
    folder.mkdir(parents=True)
    for i in range(60):
      h, w = rng.integers(28, 48, 2)
      base = np.zeros((h, w, 3), np.uint8)
      base[..., c % 3] = rng.integers(100, 256)
      noise = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
      Image.fromarray(base + noise).save(folder / f"{i}.png")
  config = load_config(os.path.join(repo_root,
                                    "configs/blae_fashion_mnist.py:smoke"))
  config.data.update(name="folder", data_dir=str(tmp_path / "pngs"),
                     image_size=32, augment="inception", workers=1)
  workdir = tmp_path / "blae"
  stages.run(config, str(workdir))
  evals = [r for r in _metrics(workdir) if r["split"] == "eval"]
  assert evals and np.isfinite(evals[-1]["psnr"])
  train = [r for r in _metrics(workdir) if r["split"] == "train"]
  assert train[-1]["step"] == config.train.num_steps
