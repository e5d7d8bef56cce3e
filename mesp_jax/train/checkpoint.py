"""Orbax checkpoints of the train state, the data position and model meta.

Each step folder holds three items: ``state`` (the sharded TrainState),
``loader`` (the data pipeline's position, one JSON file per process,
``process_{i}-of-{n}.json``, through grain's Orbax handler) and ``meta``
(what the model and data were, JSON). Restoring checks ``meta`` against the
current config so a checkpoint is never silently loaded into a different
model. Checkpoints written before the per-process data item (one JSON
``loader`` item) still restore.

Integrity: once a step is complete on disk, process 0 writes
``checksums.json`` into its folder (size and SHA-256 of every file).
Restoring verifies it, then lets Orbax read the items and checks the data
position. A step that fails any of these is *damaged*: the owner of the
workdir (training) moves it to ``checkpoints/damaged/<step>-<time>/`` with a
``NOTE.txt`` saying why, and resumes from the newest good step, so a later
save of the same step number is never blocked. Readers that only consume a
workdir (sampling, encoding) skip a damaged step and leave it in place.
"""

from __future__ import annotations

import fnmatch
import json
import os
import threading
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from mesp_jax.base import io


class CheckpointMismatchError(ValueError):
  """The checkpoint in a workdir was written for a different model or data."""


class DamagedCheckpointError(RuntimeError):
  """A checkpoint step cannot be trusted (unreadable, or its files changed)."""


CHECKSUMS = "checksums.json"
DAMAGED = "damaged"


def make_manager(directory: str, max_to_keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(io.abspath(directory), options=options,
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
  """Starts saving ``step`` (asynchronously when the manager is async).

  Call :func:`seal` once the save has finished (the next :func:`save` or
  the end of training) to write the step's checksums.
  """
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      loader=grain.checkpoint.CheckpointSave(DataPosition(loader_state)),
      meta=ocp.args.JsonSave(meta)), force=True)


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _file_digests(folder: str) -> dict[str, list]:
  """``{relative path: [size, sha256 hex]}`` of every file under ``folder``
  except the checksum file itself."""
  out = {}
  for rel in io.walk_files(folder):
    if rel != CHECKSUMS:
      path = os.path.join(folder, rel)
      out[rel] = [io.file_size(path), io.sha256_of_file(path)]
  return out


def seal(manager: ocp.CheckpointManager, steps, wait: bool = True
         ) -> list[int]:
  """Waits for pending saves (unless ``wait`` is False: the caller knows
  they are complete), then writes ``checksums.json`` into the folder of each
  of ``steps`` that still exists (Orbax may have deleted old ones).

  Only process 0 writes. Returns the steps sealed.
  """
  if wait:
    manager.wait_until_finished()
  sealed = []
  if jax.process_index() != 0:
    return sealed
  for step in steps:
    folder = step_dir(manager, step)
    try:
      body = json.dumps({"step": int(step), "files": _file_digests(folder)},
                        indent=1, sort_keys=True).encode()
    except FileNotFoundError:  # deleted (max_to_keep) while it was read
      continue
    if not io.isdir(folder):
      continue
    io.atomic_write_bytes(os.path.join(folder, CHECKSUMS), body)
    sealed.append(int(step))
  return sealed


class Sealer:
  """Saves steps and seals them, reading them back in a thread.

  :meth:`save` first waits for the previous save to finish (Orbax would
  wait for it anyway) and hashes that step in a background thread, then
  starts the new save; training does not wait for the read-back of a large
  checkpoint. :meth:`close` waits for everything and seals the last step.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self._pending: list[int] = []
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None

  def _join(self) -> None:
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def _start(self) -> None:
    self._join()
    steps, self._pending = self._pending, []
    if not steps:
      return
    self.manager.wait_until_finished()  # the saves are complete on disk

    def work():  # no manager call here: the main thread may be saving
      try:
        seal(self.manager, steps, wait=False)
      except BaseException as e:  # noqa: BLE001 - re-raised by _join
        self._error = e
    self._thread = threading.Thread(target=work, name="checkpoint-sealer",
                                    daemon=True)
    self._thread.start()

  def save(self, step: int, state: Any, loader_state: dict, meta: dict
           ) -> None:
    """:func:`save` of ``step``, sealed later."""
    self._start()
    save(self.manager, step, state, loader_state, meta)
    self._pending.append(int(step))

  def close(self) -> None:
    """Waits for the last save and writes every pending checksum file."""
    self._start()
    self._join()


def verify(manager: ocp.CheckpointManager, step: int) -> bool:
  """True if ``step`` has checksums and every file matches them; False if it
  has none (written before checksums, or a crash before sealing).

  Raises:
    DamagedCheckpointError: a file is missing, added, or differs.
  """
  folder = step_dir(manager, step)
  path = os.path.join(folder, CHECKSUMS)
  if not io.exists(path):
    return False
  try:
    want = json.loads(io.read_bytes(path))["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise DamagedCheckpointError(f"its {CHECKSUMS} is unreadable ({e})"
                                 ) from None
  got = _file_digests(folder)
  problems = [f"{rel}: missing" for rel in sorted(set(want) - set(got))]
  problems += [f"{rel}: not in the checksums" for rel in
               sorted(set(got) - set(want))]
  for rel in sorted(set(got) & set(want)):
    (size, sha), (saved_size, saved_sha) = got[rel], want[rel]
    if size != saved_size:
      problems.append(f"{rel}: {size} bytes, saved {saved_size}")
    elif sha != saved_sha:
      problems.append(f"{rel}: content differs (same size, {size} bytes)")
  if problems:
    raise DamagedCheckpointError("files changed since it was saved: " +
                                 "; ".join(problems[:5]) +
                                 (" ..." if len(problems) > 5 else ""))
  return True


def _verify_on_process_0(manager: ocp.CheckpointManager, step: int) -> None:
  """:func:`verify` on process 0 with one verdict for every process (so
  all of them skip, or restore, the same step)."""
  if jax.process_count() == 1:
    verify(manager, step)
    return
  import numpy as np
  from jax.experimental import multihost_utils
  why = ""
  if jax.process_index() == 0:
    try:
      verify(manager, step)
    except DamagedCheckpointError as e:
      why = str(e)
  bad = multihost_utils.broadcast_one_to_all(np.int32(bool(why)))
  if int(bad):
    raise DamagedCheckpointError(why or "its checksums do not match (see "
                                 "process 0's log)")


def digest(manager: ocp.CheckpointManager, step: int) -> str | None:
  """SHA-256 of ``step``'s checksum file: one identity for the whole step
  (None when it has no checksums)."""
  path = os.path.join(step_dir(manager, step), CHECKSUMS)
  return io.sha256_of_file(path) if io.exists(path) else None


def quarantine(manager: ocp.CheckpointManager, step: int, why: str) -> str:
  """Moves ``step`` into ``damaged/<step>-<UTC time>/`` with a NOTE.txt.

  Process 0 moves; every process then reloads the manager's step list.
  Returns the new folder.
  """
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  target = os.path.join(str(manager.directory), DAMAGED, f"{step}-{stamp}")
  if jax.process_index() == 0:
    io.makedirs(os.path.dirname(target))
    io.move(step_dir(manager, step), target)
    io.atomic_write_bytes(os.path.join(target, "NOTE.txt"), (
        f"checkpoint step {step} was moved here at {stamp} because it "
        f"could not be trusted:\n{why}\n\nTraining goes on from the "
        f"newest good step (or from the start). Nothing in this folder was "
        f"changed; delete it when you no longer need it.\n").encode())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"quarantined checkpoint {step}")
  manager.reload()
  return target


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
    files = [name for name in io.listdir(folder)
             if fnmatch.fnmatch(name, "process_*-of-*.json")]
    if files:
      return json.loads(io.read_bytes(os.path.join(folder, files[0])))
    try:
      return manager.restore(step, args=ocp.args.Composite(
          loader=ocp.args.JsonRestore()))["loader"]
    except Exception:  # noqa: BLE001
      raise per_process from None


def _check_position(position: Any) -> dict:
  """The data position as saved by a loader: a dict with an int ``step``."""
  if not isinstance(position, dict) or "step" not in position:
    raise DamagedCheckpointError(f"its data position is not a loader state: "
                                 f"{str(position)[:80]!r}")
  try:
    if int(position["step"]) < 0:
      raise ValueError("negative")
  except (TypeError, ValueError):
    raise DamagedCheckpointError(f"its data position has step "
                                 f"{position['step']!r}") from None
  return position


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
                   meta: dict, with_position: bool = True,
                   move_damaged: bool = False
                   ) -> tuple[int, Any, dict | None] | None:
  """Restores the newest good checkpoint, or returns None if there is none.

  ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings;
  ``with_position=False`` skips the data position (inference).
  Each step, newest first, is verified against its checksums, then its
  meta, state and data position are read. A damaged step is skipped with a
  warning; with ``move_damaged`` (the workdir's owner, training) it is moved
  into ``damaged/`` (:func:`quarantine`), so its number can be saved again.

  Raises:
    CheckpointMismatchError: the checkpoint's meta differs from ``meta``.
    RuntimeError: checkpoints exist, none can be read and ``move_damaged``
      is off.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  errors = []
  for step in steps:
    try:
      try:
        _verify_on_process_0(manager, step)
        saved_meta = manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )["meta"]
      except (CheckpointMismatchError, DamagedCheckpointError):
        raise
      except Exception as e:  # noqa: BLE001 - any failure means damaged
        raise DamagedCheckpointError(f"{type(e).__name__}: {e}") from None
      _compare_meta(saved_meta, meta, str(manager.directory))
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        position = (_check_position(_restore_position(manager, step))
                    if with_position else None)
      except DamagedCheckpointError:
        raise
      except Exception as e:  # noqa: BLE001
        raise DamagedCheckpointError(f"{type(e).__name__}: {e}") from None
    except DamagedCheckpointError as e:
      why = str(e)
      if move_damaged:
        where = quarantine(manager, step, why)
        note = f"moved to {where}"
      else:
        note = "left in place"
      errors.append(f"step {step}: {why[:500]} ({note})")
      logging.info("checkpoint step %d is damaged (%s): %s", step, note, why)
      if jax.process_index() == 0:
        print(f"warning: checkpoint step {step} in {manager.directory} is "
              f"damaged ({why[:300]}); {note}", flush=True)
      continue
    return step, restored["state"], position
  if move_damaged:
    return None
  raise RuntimeError(
      f"checkpoints exist in {manager.directory} but none can be read:\n  "
      + "\n  ".join(errors) + "\nRerun the training stage in that workdir "
      "(it moves damaged steps aside and resumes) or use a new --workdir.")


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
