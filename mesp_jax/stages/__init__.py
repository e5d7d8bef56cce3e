"""The stages ``main.py`` dispatches to, by ``config.stage``.

Each stage is one module here with ``run(config, workdir)``: it checks the
config against the schema (:mod:`mesp_jax.base.config`), calls library code
and writes the artefacts. Stage modules are imported only when their stage
runs, and no library module imports a stage.
"""

from __future__ import annotations

import difflib
import importlib
import re

import ml_collections

from mesp_jax.base.config import ConfigError, check_workdir

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

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


def check_paths(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses URI workdirs and inputs (``gs://...``) before anything runs.

  Every stage reads and writes through local file APIs (memory-mapped token
  shards, appended metrics, atomic renames), so a URI would become a local
  folder named ``gs:`` on each worker. A bucket mounted with Cloud Storage
  FUSE at the same path on every worker works (``launch/tpu_pod.sh`` does
  that for ``gs://`` workdirs).
  """
  named = [("--workdir", workdir)] + [
      (f"config.inputs.{k}", v)
      for k, v in (config.get("inputs") or {}).items() if isinstance(v, str)]
  for name, value in named:
    if value and _URI.match(value):
      scheme = value.split("://", 1)[0]
      bucket = value.split("://", 1)[1].split("/", 1)[0]
      raise ConfigError(
          f"{name}={value!r}: {scheme}:// URIs are not read or written "
          f"directly. Mount the bucket on every machine at the same path "
          f"(e.g. gcsfuse --implicit-dirs --rename-dir-limit=200000 {bucket} "
          f"/gcs/{bucket}) and give that path (/gcs/{bucket}/...); "
          f"launch/tpu_pod.sh does this for gs:// workdirs.")


def check_stage(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (with a "did you mean") unless ``config.stage``
  names a stage."""
  stage = config.get("stage")
  if stage not in STAGES:
    close = difflib.get_close_matches(str(stage), list(STAGES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config.stage={stage!r} is not a stage{hint} (stages: "
                      f"{', '.join(sorted(STAGES))})")


def run(config: ml_collections.ConfigDict, workdir: str):
  """Runs the stage named by ``config.stage`` in ``workdir``."""
  check_stage(config)
  stage = config.stage
  check_paths(config, workdir)
  check_workdir(workdir)
  module = importlib.import_module(f"{__name__}.{STAGES[stage]}")
  return module.run(config, workdir)
