"""What every artefact came from, and refusal to build on inputs that changed.

Each stage workdir gets ``{stage}_provenance.json`` (beside the
``{stage}_config.json`` of trained stages): the stage, a hash of its config
and its *inputs*: upstream workdirs as absolute paths with the checkpoint
step they were used at and that step's digest (the SHA-256 of its
``checksums.json``, :func:`mesp_jax.train.checkpoint.digest`), token sets
with the SHA-256 of their manifest and shards. A stage that would resume on,
or consume, inputs other than the recorded ones stops with
:class:`InputsChangedError` saying what changed; ``inputs.allow_changed=True``
goes on and appends the new inputs to the file's history.

Earlier run configs of a workdir are kept: :func:`keep_config` moves a
``{name}_config.json`` that differs from the new one into
``config_history/`` before it is replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import ml_collections

from mesp_jax.base import io
from mesp_jax.data import tokens as tokens_lib
from mesp_jax.train import checkpoint as ckpt

HISTORY = "config_history"
INPUT_PATHS = ("blae_workdir", "tokens_dir", "arvm_workdir",
               "feature_net_workdir", "samples")


class InputsChangedError(ckpt.CheckpointMismatchError):
  """A stage's inputs differ from those its workdir was built on."""


def absolute_inputs(config: ml_collections.ConfigDict) -> None:
  """Makes every path in ``config.inputs`` absolute (in place), so that the
  saved configs and records still point at them from another directory."""
  inputs = config.get("inputs")
  if not inputs:
    return
  for key in INPUT_PATHS:
    value = inputs.get(key, "")
    if value:
      inputs[key] = io.abspath(value)


def config_hash(config: ml_collections.ConfigDict | dict) -> str:
  d = config.to_dict() if hasattr(config, "to_dict") else config
  text = json.dumps(d, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_identity(workdir: str, step: int | None = None) -> dict:
  """``{workdir, step, digest}`` of a training workdir at ``step`` (default:
  its newest step); ``digest`` is None for steps saved without checksums."""
  workdir = io.abspath(workdir)
  manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"),
                              async_save=False)
  step = manager.latest_step() if step is None else int(step)
  return {"workdir": workdir, "step": step,
          "digest": None if step is None else ckpt.digest(manager, step)}


def tokens_identity(tokens_dir: str, splits) -> dict:
  """Per split: the token file's path, the BL-AE and step that wrote it (with
  that checkpoint's digest when ``blae_encode`` recorded it) and a SHA-256
  over the manifest and every shard (or the legacy npz)."""
  encoded = (read(tokens_dir, "blae_encode") or {}).get("inputs", {}).get(
      "blae", {})
  out = {}
  for split in splits:
    path = tokens_lib.tokens_path(tokens_dir, split)
    if not os.path.exists(path):
      continue
    info = tokens_lib.read_info(path)
    digest = hashlib.sha256(io.sha256_of_file(path).encode())
    if path.endswith(".json"):
      with open(path) as f:
        manifest = json.load(f)
      folder = os.path.dirname(path)
      for shard in manifest.get("shards", []):
        for key in ("tokens", "labels"):
          digest.update(io.sha256_of_file(os.path.join(folder, shard[key]))
                        .encode())
    out[split] = {"path": os.path.abspath(path), "sha256": digest.hexdigest(),
                  "blae_workdir": info.get("blae_workdir", ""),
                  "blae_step": info.get("checkpoint_step", -1)}
    if (encoded.get("workdir"), encoded.get("step")) == (
        out[split]["blae_workdir"], out[split]["blae_step"]):
      out[split]["blae_digest"] = encoded.get("digest")
  return out


# The data fields that decide which images a model learns from.
DATA_IDENTITY = ("name", "image_size", "channels", "train_split", "data_dir",
                 "fashion_mnist_dir")


def data_identity(data: ml_collections.ConfigDict) -> dict:
  """What a ``config.data`` section names, as an input record."""
  return {k: data.get(k) for k in DATA_IDENTITY}


def file_identity(path: str) -> dict:
  """``{path, sha256}`` of an input file (a samples .npz, say)."""
  return {"path": os.path.abspath(path), "sha256": io.sha256_of_file(path)}


def has_checkpoints(workdir: str) -> bool:
  """Whether a training workdir holds saved steps to resume from."""
  folder = os.path.join(workdir, "checkpoints")
  return any(name.isdigit() for name in io.listdir(folder))


def has_checkpoints_below(workdir: str) -> bool:
  """Whether ``workdir`` or one of its sub-folders holds saved steps (a
  stage that trains several models, one per sub-folder)."""
  if has_checkpoints(workdir):
    return True
  return any(has_checkpoints(os.path.join(workdir, name))
             for name in io.listdir(workdir))


def path_of(workdir: str, stage: str) -> str:
  return os.path.join(workdir, f"{stage}_provenance.json")


def read(workdir: str, stage: str) -> dict | None:
  """The record of ``stage`` in ``workdir``, or None."""
  path = path_of(workdir, stage)
  if not io.exists(path):
    return None
  try:
    return json.loads(io.read_bytes(path))
  except ValueError:
    return None  # a damaged record is rewritten; it guards nothing


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """Human-readable paths where two input records differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += differences(old.get(key), new.get(key),
                         f"{prefix}.{key}" if prefix else key)
    return out
  return [] if old == new else [f"{prefix}: was {old!r}, now {new!r}"]


def check_and_record(workdir: str, stage: str,
                     config: ml_collections.ConfigDict, inputs: dict,
                     resuming: bool) -> dict:
  """Refuses to resume ``workdir`` on inputs other than those it recorded,
  then (re)writes ``{stage}_provenance.json``.

  Args:
    resuming: whether the workdir holds earlier results that the stage will
      build on (its checkpoints); a fresh workdir only records.

  Raises:
    InputsChangedError: the recorded inputs differ and
      ``config.inputs.allow_changed`` is not set.
  """
  old = read(workdir, stage)
  history = []
  if old is not None:
    history = old.get("history", [])
    changed = differences(old.get("inputs", {}), inputs)
    allow = bool(config.get("inputs", {}).get("allow_changed", False))
    if changed and resuming and not allow:
      raise InputsChangedError(
          f"{workdir} holds a '{stage}' run built on other inputs than "
          f"this one's:\n  " + "\n  ".join(changed[:8]) +
          ("\n  ..." if len(changed) > 8 else "") +
          f"\nResuming would mix the two. Use a new --workdir, or pass "
          f"--config.inputs.allow_changed=True to go on anyway (the change "
          f"is recorded in {path_of(workdir, stage)}).")
    if changed:
      history = history + [{"inputs": old.get("inputs", {}),
                            "until": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                   time.gmtime())}]
  record = {"stage": stage, "config_sha256": config_hash(config),
            "inputs": inputs, "history": history,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  io.makedirs(workdir)
  io.write_json(path_of(workdir, stage), record)
  return record


def keep_config(workdir: str, name: str, config: dict) -> str:
  """Writes ``{name}_config.json``; an earlier one that differs is first
  moved to ``config_history/{name}_config.<UTC time>.json``."""
  path = os.path.join(workdir, f"{name}_config.json")
  if io.is_writer() and io.exists(path):
    try:
      same = json.loads(io.read_bytes(path)) == json.loads(
          json.dumps(config, default=str))
    except ValueError:
      same = False
    if not same:
      stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
      target = os.path.join(workdir, HISTORY, f"{name}_config.{stamp}.json")
      k = 1
      while io.exists(target):  # two runs within one second
        k += 1
        target = os.path.join(workdir, HISTORY,
                              f"{name}_config.{stamp}-{k}.json")
      io.makedirs(os.path.dirname(target))
      io.move(path, target)
  io.write_json(path, config)
  return path
