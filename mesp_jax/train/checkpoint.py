"""Orbax checkpoints of the train state, the loader position and model meta.

Each step folder holds three items: ``state`` (the sharded TrainState),
``loader`` (the data position, JSON) and ``meta`` (what the model and data
were, JSON). Restoring checks ``meta`` against the current config so a
checkpoint is never silently loaded into a different model.
"""

from __future__ import annotations

import json
import os
from typing import Any

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


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         loader_state: dict, meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      loader=ocp.args.JsonSave(loader_state),
      meta=ocp.args.JsonSave(meta)), force=True)


def upgrade_meta(saved: dict) -> dict:
  """Reads meta written before a field was renamed in today's names.

  ARVM checkpoints before the config schema called the model width
  ``width``; it is ``d_model`` now (the same number).
  """
  model = saved.get("model")
  if saved.get("stage") == "arvm" and isinstance(model, dict) and (
      "width" in model and "d_model" not in model):
    model = dict(model)
    model["d_model"] = model.pop("width")
    saved = dict(saved, model=model)
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
                   meta: dict) -> tuple[int, Any, dict] | None:
  """Restores the newest readable checkpoint, or returns None if none exist.

  ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings.
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
          state=ocp.args.StandardRestore(abstract_state),
          loader=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      errors.append(f"step {step}: {type(e).__name__}: {e}")
      logging.warning("checkpoint step %d unreadable: %s", step, e)
      continue
    return step, restored["state"], restored["loader"]
  raise RuntimeError(
      f"checkpoints exist in {manager.directory} but none can be read:\n  "
      + "\n  ".join(errors) + "\nMove the broken step folders away (they are "
      "left untouched) or use a new --workdir.")


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
