"""The stages ``main.py`` dispatches to, by ``config.stage``.

Each entry is ``module:function`` taking ``(config, workdir)``; modules are
imported only when their stage runs.
"""

from __future__ import annotations

import importlib

import ml_collections

STAGES = {
    "blae": "mesp_jax.train.blae:train_and_evaluate",
    "blae_encode": "mesp_jax.train.blae:encode_stage",
    "arvm": "mesp_jax.train.arvm:train_and_evaluate",
    "sample": "mesp_jax.train.arvm:sample_stage",
    "kernel_sample": "mesp_jax.experiments.gamma_sweep:kernel_sample_stage",
    "gamma_sweep": "mesp_jax.experiments.gamma_sweep:gamma_sweep_stage",
    "train_feature_net": "mesp_jax.train.feature_net:train_and_evaluate",
    "evaluate": "mesp_jax.eval.evaluate:evaluate_stage",
    "mesp_study": "mesp_jax.experiments.mesp_overlap:mesp_study_stage",
    "pipeline": "mesp_jax.pipeline:run",
}


def run(config: ml_collections.ConfigDict, workdir: str):
  stage = config.get("stage")
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r} is not a stage; choose one of "
                     f"{sorted(STAGES)}")
  module_name, fn_name = STAGES[stage].split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      raise NotImplementedError(
          f"stage {stage!r} is not implemented yet ({module_name})") from e
    raise
  return getattr(module, fn_name)(config, workdir)
