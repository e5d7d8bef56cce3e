"""The stages ``main.py`` dispatches to, by ``config.stage``.

Each stage is one module here with ``run(config, workdir)``: it checks the
config against the schema (:mod:`mesp_jax.base.config`), calls library code
and writes the artefacts. Stage modules are imported only when their stage
runs, and no library module imports a stage.
"""

from __future__ import annotations

import importlib

import ml_collections

# config.stage -> module in this package. 'kernel_sample' is the stage
# 'sample' with the kernel sampler (its earlier name).
STAGES = {
    "blae": "blae",
    "blae_encode": "blae_encode",
    "arvm": "arvm",
    "sample": "sample",
    "kernel_sample": "sample",
    "gamma_sweep": "gamma_sweep",
    "train_feature_net": "train_feature_net",
    "evaluate": "evaluate",
    "mesp_study": "mesp_study",
    "pipeline": "pipeline",
}


def run(config: ml_collections.ConfigDict, workdir: str):
  """Runs the stage named by ``config.stage`` in ``workdir``."""
  stage = config.get("stage")
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r} is not a stage; choose one of "
                     f"{sorted(STAGES)}")
  module = importlib.import_module(f"{__name__}.{STAGES[stage]}")
  return module.run(config, workdir)
