"""The stages ``main.py`` dispatches to, by ``config.stage``.

Each stage is one module here with ``run(config, workdir)``: it checks the
config against the schema (:mod:`mesp_jax.base.config`), calls library code
and writes the artefacts. Stage modules are imported only when their stage
runs, and no library module imports a stage.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util

import ml_collections

from mesp_jax.base import io
from mesp_jax.base.config import ConfigError, check_workdir

# config.stage -> module in this package. 'kernel_sample' is the stage
# 'sample' with the kernel sampler (its earlier name).
STAGES = {
    "blae": "blae",
    "blae_encode": "blae_encode",
    "arvm": "arvm",
    "sample": "sample",
    "kernel_sample": "sample",
    "gamma_sweep": "gamma_sweep",
    "lch_study": "lch_study",
    "train_feature_net": "train_feature_net",
    "evaluate": "evaluate",
    "score": "score",
    "mesp_study": "mesp_study",
    "pipeline": "pipeline",
}


# Stages whose workdir may be an object-store URI (gs://...): the two
# training stages of the method, whose outputs (checkpoints, metrics,
# configs, records, pictures) all go through base.io and Orbax (tested on a
# fake bucket). The others memory-map token shards, write sample sets or
# cache statistics with local file APIs.
REMOTE_STAGES = ("blae", "arvm")
# Modules a URI scheme needs besides its fsspec file system (Orbax asks
# the GCS client whether a bucket has a hierarchical namespace).
REMOTE_MODULES = {"gs": ("google.cloud.storage",)}


def _mount_hint(value: str) -> str:
  bucket = value.split("://", 1)[1].split("/", 1)[0]
  return (f"mount the bucket on every machine at the same path (e.g. gcsfuse "
          f"--implicit-dirs --rename-dir-limit=200000 {bucket} /gcs/{bucket})"
          f" and give that path (/gcs/{bucket}/...); launch/tpu_pod.sh does "
          f"this for gs:// workdirs")


def remote_problem(uri: str) -> str | None:
  """What is missing to write ``uri`` (its fsspec file system, for gs://
  the gcsfs package, and :data:`REMOTE_MODULES`), or None."""
  scheme = uri.split("://", 1)[0]
  try:
    import fsspec
    fsspec.get_filesystem_class(scheme)
  except (ImportError, ValueError) as e:
    return f"no {scheme}:// file system is installed ({e})"
  for module in REMOTE_MODULES.get(scheme, ()):
    try:
      found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
      found = False
    if not found:
      return f"the module {module} is not installed"
  return None


def check_paths(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses, before anything runs, URIs (``gs://...``) that the stage
  cannot use.

  A training stage (:data:`REMOTE_STAGES`) may write its workdir to a URI
  when the scheme's file system is installed (``pip install
  'mesp_jax[gcs]'`` for gs://). Inputs and the other stages' workdirs must
  be local or mounted paths: they memory-map token shards and write
  sample sets with local file APIs (a URI would become a local folder named
  ``gs:`` on each worker).
  """
  stage = config.get("stage")
  if workdir and io.is_uri(workdir):
    if stage not in REMOTE_STAGES:
      raise ConfigError(
          f"--workdir={workdir!r}: stage {stage!r} writes local files only; "
          f"{_mount_hint(workdir)}. (The training stages "
          f"{', '.join(REMOTE_STAGES)} can write to a URI directly.)")
    problem = remote_problem(workdir)
    if problem:
      raise ConfigError(
          f"--workdir={workdir!r}: {problem}. Install that file system (for "
          f"gs://: pip install 'mesp_jax[gcs]', which brings gcsfs and "
          f"google-cloud-storage), or {_mount_hint(workdir)}.")
  for key, value in (config.get("inputs") or {}).items():
    if isinstance(value, str) and io.is_uri(value):
      raise ConfigError(
          f"config.inputs.{key}={value!r}: inputs are read with local file "
          f"APIs (memory-mapped token shards); {_mount_hint(value)}.")


def check_stage(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (with a "did you mean") unless ``config.stage``
  names a stage."""
  stage = config.get("stage")
  if stage not in STAGES:
    close = difflib.get_close_matches(str(stage), list(STAGES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config.stage={stage!r} is not a stage{hint} (stages: "
                      f"{', '.join(sorted(STAGES))})")


def with_stage(config: ml_collections.ConfigDict, stage: str, **inputs
               ) -> ml_collections.ConfigDict:
  """A copy of ``config`` for ``stage`` with ``inputs.*`` set: how a stage
  that runs other stages (pipeline, lch_study, score) hands them a config."""
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.stage = stage
  sub.inputs.update(inputs)
  return sub


def run(config: ml_collections.ConfigDict, workdir: str):
  """Runs the stage named by ``config.stage`` in ``workdir``."""
  check_stage(config)
  stage = config.stage
  check_paths(config, workdir)
  check_workdir(workdir)
  module = importlib.import_module(f"{__name__}.{STAGES[stage]}")
  return module.run(config, workdir)
