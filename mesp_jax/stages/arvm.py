"""Stage ``arvm``: train (or resume) the neural gamma-ARVM on BL-AE tokens.

Reads ``tokens_{split}.npz`` from ``config.inputs.tokens_dir``; the BL-AE
that made them (``config.inputs.blae_workdir``, else the one the tokens name)
decodes the periodic ``samples_latest.png``. Writes checkpoints and metrics
(bits per token and per image).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.sample import samplers
from mesp_jax.train import arvm, blae, loop

GRID_SAMPLES = 16


def run(config: ml_collections.ConfigDict, workdir: str):
  config_lib.validate(config, "arvm")
  mesh = sharding.mesh_from_config(config)
  train_src, _ = arvm.token_sources(config)
  blae_dir = arvm.blae_workdir_for(config, train_src)
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
