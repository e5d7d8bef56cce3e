"""Stage ``arvm``: train (or resume) the neural gamma-ARVM on BL-AE tokens.

Reads the token manifests ``tokens_{split}.json`` (or legacy ``.npz`` files)
from ``config.inputs.tokens_dir``; the BL-AE that made them
(``config.inputs.blae_workdir``, else the one the tokens name) decodes the
periodic ``samples_latest.png``. Writes checkpoints and metrics
(bits per token and per image).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.data import DataNotFoundError
from mesp_jax.data.sources import _tfds_build_dir, default_tfds_dir
from mesp_jax.sample import samplers
from mesp_jax.train import arvm, blae, loop, provenance

GRID_SAMPLES = 16


def _token_paths(tokens_dir: str, split: str) -> list[str]:
  return [os.path.join(tokens_dir, f"tokens_{split}{ext}")
          for ext in (".json", ".npz")]


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any model is built, when the tokens are missing.

  The message gives the exact commands that make them, from the data set's
  preparation on (for ImageNet: prepare, BL-AE, encode).
  """
  tokens_dir = config.inputs.tokens_dir
  split = config.tokens.get("train_split", "train")
  if any(os.path.exists(p) for p in _token_paths(tokens_dir, split)):
    return
  blae_dir = config.inputs.get("blae_workdir") or "runs/blae"
  steps = []
  if config.arvm.num_classes == 1000:  # the ImageNet configs
    tfds_dir = default_tfds_dir()
    if _tfds_build_dir("imagenet2012", tfds_dir) is None:
      steps.append(
          f"prepare ImageNet (not found in {tfds_dir}; needs the ILSVRC2012 "
          f"train and validation tars from image-net.org and, for this one "
          f"step, TensorFlow: pip install tensorflow-cpu):\n"
          f"     python -m mesp_jax.data.prepare --dataset=imagenet2012 "
          f"--manual_dir=DIR_WITH_TARS --data_dir={tfds_dir}")
    blae_cfg = "configs/blae_imagenet.py"
  else:
    blae_cfg = "configs/blae_<dataset>.py"
  if not os.path.exists(os.path.join(blae_dir, "blae_config.json")):
    steps.append(f"train the BL-AE:\n     python -m mesp_jax.main "
                 f"--config={blae_cfg} --workdir={blae_dir}")
  steps.append(f"encode the splits into tokens:\n     python -m mesp_jax.main "
               f"--config={blae_cfg} --config.stage=blae_encode "
               f"--config.inputs.blae_workdir={blae_dir} --workdir={tokens_dir}")
  steps.append("rerun this command (or run configs/imagenet_pipeline.py, "
               "which does every step into one workdir)")
  listing = "\n".join(f"  {i}. {s}" for i, s in enumerate(steps, 1))
  raise DataNotFoundError(
      f"no ARVM training tokens: {_token_paths(tokens_dir, split)[0]} does "
      f"not exist (config.inputs.tokens_dir={tokens_dir!r}). To make them:\n"
      f"{listing}")


def run(config: ml_collections.ConfigDict, workdir: str):
  config_lib.validate(config, "arvm")
  provenance.absolute_inputs(config)
  check_inputs(config)
  splits = (config.tokens.get("train_split", "train"),
            config.tokens.get("eval_split", "test"))
  provenance.check_and_record(
      workdir, "arvm", config,
      {"tokens": provenance.tokens_identity(config.inputs.tokens_dir,
                                            splits)},
      resuming=provenance.has_checkpoints(workdir))
  mesh = sharding.mesh_from_config(config)
  train_src, _ = arvm.token_sources(config)
  blae_dir = arvm.blae_workdir_for(config, train_src)
  if blae_dir and not os.path.exists(os.path.join(blae_dir,
                                                  "blae_config.json")):
    # Checked now, not at the first sample grid after hours of training.
    if io.is_writer():
      print(f"warning: {blae_dir} (the BL-AE of these tokens) is not a "
            f"trained 'blae' workdir, so no samples_latest.png is drawn; set "
            f"config.inputs.blae_workdir to draw them", flush=True)
    blae_dir = ""
  cache = {}

  def visualize(model, params, step, workdir_):
    if "decode" not in cache:
      model_b, params_b, _, _ = blae.load_blae(blae_dir, mesh)
      cache["decode"] = samplers.token_decoder(model_b, params_b, model.group,
                                               None)
    scfg = config.sampler
    sampler = samplers.NeuralSampler(
        model, params, temperature=scfg.temperature, top_k=scfg.top_k,
        top_p=scfg.top_p, cfg_scale=scfg.cfg_scale, cache="ring")
    labels = (np.arange(GRID_SAMPLES) % model.num_classes
              if model.num_classes > 0 else None)
    tokens = sampler.sample(
        jax.random.fold_in(jax.random.key(config.seed), step), GRID_SAMPLES,
        labels)
    io.save_grid(os.path.join(workdir_, "samples_latest.png"),
                 cache["decode"](tokens), ncol=8)

  task = arvm.make_task(config, workdir, visualize if blae_dir else None)
  return loop.train(config, workdir, task, mesh)
