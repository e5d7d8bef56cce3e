"""Stage ``blae_encode``: a trained BL-AE's token grids of whole splits.

Reads the BL-AE from ``config.inputs.blae_workdir`` and writes
``tokens_{split}.npz`` for each of ``config.encode.splits``: ``tokens`` int32
[N, h, w, 1] (one token of C bits per position, first channel most
significant), ``labels``, ``bits``, ``grid``, the BL-AE workdir (absolute)
and the checkpoint step they came from.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.data import source_from_config
from mesp_jax.train import blae


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.validate(config, "blae_encode")
  blae_dir = os.path.abspath(config.inputs.blae_workdir or workdir)
  mesh = sharding.mesh_from_config(config)
  model, params, blae_config, step = blae.load_blae(blae_dir, mesh)
  dp = sharding.data_parallel_size(mesh)
  batch_size = max(dp, int(config.encode.batch_size) // dp * dp)
  written = {}
  for split in config.encode.splits:
    source = source_from_config(blae_config.data, split)
    tokens, labels = blae.encode_split(model, params, source, batch_size, mesh)
    path = os.path.join(workdir, f"tokens_{split}.npz")
    io.save_npz(path, tokens=tokens, labels=labels,
                bits=np.int32(model.bits), grid=np.asarray(tokens.shape[1:3]),
                checkpoint_step=np.int32(step),
                blae_workdir=np.asarray(blae_dir),
                dataset=np.asarray(blae_config.data.name), split=split)
    if io.is_writer():
      print(f"[blae_encode] {split}: {tokens.shape[0]} images -> tokens "
            f"{tokens.shape[1:]} of {model.bits} bits -> {path}", flush=True)
    written[split] = path
  return written
