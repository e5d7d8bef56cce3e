"""Orbax checkpoints of the train state, the data position and model meta.

Each step folder holds three items: ``state`` (the sharded TrainState),
``loader`` (the data pipeline's position, one JSON file per process,
``process_{i}-of-{n}.json``, through grain's Orbax handler) and ``meta``
(what the model and data were, JSON). Restoring checks ``meta`` against the
current config so a checkpoint is never silently loaded into a different
model. Checkpoints written before the per-process data item (one JSON
``loader`` item) still restore.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
  """The checkpoint in a workdir was written for a different model or data."""


def make_manager(directory: str, max_to_keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "loader", "meta"))


class DataPosition:
  """A data iterator's ``get_state`` dict as grain's checkpoint item.

  grain's Orbax handler writes ``item.get_state()`` (bytes) to this
  process's own file and on restore calls ``set_state`` and
  ``start_prefetch``; a restored position is read back with :attr:`state`.
  """

  def __init__(self, state: dict | None = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state, sort_keys=True).encode()

  def set_state(self, raw: bytes) -> None:
    self.state = json.loads(raw)

  def start_prefetch(self) -> None:
    pass


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         loader_state: dict, meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      loader=grain.checkpoint.CheckpointSave(DataPosition(loader_state)),
      meta=ocp.args.JsonSave(meta)), force=True)


def _restore_position(manager: ocp.CheckpointManager, step: int) -> dict:
  """This process's data position at ``step``.

  Positions count global batches, so when the run resumes with another
  process count (no file for this process) any process's file serves; a
  checkpoint from before per-process positions has one JSON item.
  """
  try:
    item = manager.restore(step, args=ocp.args.Composite(
        loader=grain.checkpoint.CheckpointRestore(DataPosition())))["loader"]
    return item.state
  except Exception as per_process:  # noqa: BLE001 - try the other layouts
    folder = os.path.join(str(manager.directory), str(step), "loader")
    files = sorted(glob.glob(os.path.join(folder, "process_*-of-*.json")))
    if files:
      with open(files[0]) as f:
        return json.load(f)
    try:
      return manager.restore(step, args=ocp.args.Composite(
          loader=ocp.args.JsonRestore()))["loader"]
    except Exception:  # noqa: BLE001
      raise per_process from None


def upgrade_meta(saved: dict) -> dict:
  """Reads meta written before a field was renamed or added in today's terms.

  ARVM checkpoints before the config schema called the model width
  ``width``; it is ``d_model`` now (the same number). BL-AE and VAE
  checkpoints before ``norm`` / ``num_groups`` existed were all
  ``norm='none'`` models; they get
  :data:`mesp_jax.models.blae.ARCHITECTURE_DEFAULTS` filled in.
  """
  from mesp_jax.models.blae import ARCHITECTURE_DEFAULTS

  model = saved.get("model")
  if saved.get("stage") == "arvm" and isinstance(model, dict) and (
      "width" in model and "d_model" not in model):
    model = dict(model)
    model["d_model"] = model.pop("width")
    saved = dict(saved, model=model)
  if saved.get("stage") in ("blae", "vae") and isinstance(model, dict) and (
      any(k not in model for k in ARCHITECTURE_DEFAULTS)):
    saved = dict(saved, model={**ARCHITECTURE_DEFAULTS, **model})
  return saved


def _compare_meta(saved: dict, current: dict, directory: str) -> None:
  saved = upgrade_meta(saved)
  current = json.loads(json.dumps(current))  # tuples -> lists, as saved
  diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
           for k in sorted(set(saved) | set(current))
           if saved.get(k) != current.get(k)]
  if diffs:
    raise CheckpointMismatchError(
        f"the checkpoint in {directory} was written for a different model or "
        f"data set:\n  " + "\n  ".join(diffs) +
        "\nUse a new --workdir, or set the config to match the checkpoint.")


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   meta: dict, with_position: bool = True
                   ) -> tuple[int, Any, dict | None] | None:
  """Restores the newest readable checkpoint, or returns None if none exist.

  ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings;
  ``with_position=False`` skips the data position (inference).
  A step that cannot be read (e.g. a crash while it was written) is skipped
  with a warning and the next older one is tried; nothing is deleted.

  Raises:
    CheckpointMismatchError: the checkpoint's meta differs from ``meta``.
    RuntimeError: checkpoints exist but none can be read.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  errors = []
  for step in steps:
    try:
      saved_meta = manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - report and try an older step
      errors.append(f"step {step}: {type(e).__name__}: {e}")
      logging.warning("checkpoint step %d unreadable: %s", step, e)
      continue
    _compare_meta(saved_meta, meta, str(manager.directory))
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
      position = (_restore_position(manager, step) if with_position
                  else None)
    except Exception as e:  # noqa: BLE001
      errors.append(f"step {step}: {type(e).__name__}: {e}")
      logging.warning("checkpoint step %d unreadable: %s", step, e)
      continue
    return step, restored["state"], position
  raise RuntimeError(
      f"checkpoints exist in {manager.directory} but none can be read:\n  "
      + "\n  ".join(errors) + "\nMove the broken step folders away (they are "
      "left untouched) or use a new --workdir.")


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
