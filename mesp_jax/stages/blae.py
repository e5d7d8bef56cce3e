"""Stage ``blae``: train (or resume) the binary latent autoencoder.

Writes checkpoints, ``metrics.jsonl``, TensorBoard events and
``recon_latest.png`` (rows: originals, sign-bit decode, continuous decode).
"""

from __future__ import annotations

import ml_collections

from mesp_jax.base import config as config_lib
from mesp_jax.train import blae, loop, provenance


def run(config: ml_collections.ConfigDict, workdir: str):
  config_lib.validate(config, "blae")
  provenance.absolute_inputs(config)
  provenance.check_and_record(
      workdir, "blae", config,
      {"data": provenance.data_identity(config.data)},
      resuming=provenance.has_checkpoints(workdir))
  return loop.train(config, workdir, blae.make_task(config, workdir))
