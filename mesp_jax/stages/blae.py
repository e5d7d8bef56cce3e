"""Stage ``blae``: train (or resume) the binary latent autoencoder.

Writes checkpoints, ``metrics.jsonl``, TensorBoard events and
``recon_latest.png`` (rows: originals, sign-bit decode, continuous decode).
"""

from __future__ import annotations

import ml_collections

from mesp_jax.base import config as config_lib
from mesp_jax.train import blae, loop, provenance

# The data fields that decide which images a BL-AE learns from.
DATA_IDENTITY = ("name", "image_size", "channels", "train_split", "data_dir",
                 "fashion_mnist_dir")


def run(config: ml_collections.ConfigDict, workdir: str):
  config_lib.validate(config, "blae")
  provenance.absolute_inputs(config)
  provenance.check_and_record(
      workdir, "blae", config,
      {"data": {k: config.data.get(k) for k in DATA_IDENTITY}},
      resuming=provenance.has_checkpoints(workdir))
  return loop.train(config, workdir, blae.make_task(config, workdir))
