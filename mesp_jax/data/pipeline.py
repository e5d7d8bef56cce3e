"""The grain training pipeline: shuffle, shard by process, decode, crop, batch.

One global stream per seed: position ``g`` of the stream is example
``perm_e[g mod N]`` of epoch ``e = g // N`` (grain's per-epoch index
shuffle). Global batch ``b`` is positions ``[b G, (b + 1) G)``; process ``p``
of ``P`` decodes rows ``[p L, (p + 1) L)`` of it (``L = G / P``), so the
global batch, its row order and every crop are the same for any process
count (``jax.make_array_from_process_local_data`` puts process p's rows at
those offsets). Each example's crop and flip draw from
``default_rng([seed, g])``: reproducible, and new every epoch.

Decoding runs in ``workers`` processes (grain's ``mp_prefetch``); with 0 it
runs in this process. The pipeline's position is the number of batches
handed out (``get_state``/``set_state``); it is saved with every checkpoint,
per process, and a restored pipeline is rebuilt at that position, so the
batches after a resume are exactly those of an uninterrupted run, whatever
the worker count.
"""

from __future__ import annotations

import sys
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from mesp_jax.data import image_ops
from mesp_jax.data.loader import convert_record
from mesp_jax.data.records import decode_error


class _GlobalRow:
  """Local position ``k`` -> (stream position ``g``, record) of a process."""

  def __init__(self, stream, global_batch: int, local_batch: int,
               process_index: int):
    self.stream = stream
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index

  def __call__(self, k: int):
    b, j = divmod(int(k), self.local_batch)
    g = b * self.global_batch + self.process_index * self.local_batch + j
    return g, self.stream[g]


class _Decode:
  """(g, record) -> {'image': uint8 [S, S, C], 'label'}: crop, flip, decode."""

  def __init__(self, size: int, channels: int, augment: str, seed: int,
               min_scale: float, flip: bool):
    self.size, self.channels, self.augment = size, channels, augment
    self.seed, self.min_scale, self.flip = seed, min_scale, flip

  def __call__(self, item) -> dict[str, np.ndarray]:
    g, record = item
    data = record["image"]
    try:
      if self.augment == "inception":
        rng = np.random.default_rng([self.seed, g])
        image = image_ops.train_crop(data, self.size, rng,
                                     min_scale=self.min_scale, flip=self.flip,
                                     channels=self.channels)
      elif isinstance(data, np.ndarray) and data.shape == (
          self.size, self.size, self.channels):
        image = data  # the small in-memory sets: already at size
      else:
        image = image_ops.eval_crop(data, self.size, channels=self.channels)
    except ValueError as e:
      raise decode_error(record, g, e) from e
    return {"image": image, "label": np.int32(record["label"])}


class GrainLoader:
  """Infinite iterator of process-local training batches through grain.

  The same interface as :class:`mesp_jax.data.loader.Loader`: ``next()``
  gives ``{'image': float32 [L, S, S, C] in [-1, 1], 'label': int32 [L]}``;
  ``get_state``/``set_state`` are the position for checkpoints.

  Args:
    records: a record source (:mod:`mesp_jax.data.records`).
    image_size, channels: output images.
    global_batch_size: rows summed over processes.
    seed: shuffling and augmentation seed.
    augment: 'inception' (random-resized crop + flip) or 'none' (resize-small
      + centre crop; images already at size pass through).
    workers: decode processes (0: this process).
    shuffle: permute each epoch.
  """

  def __init__(self, records, *, image_size: int, channels: int,
               global_batch_size: int, seed: int, augment: str = "none",
               min_scale: float = 0.08, flip: bool = True, workers: int = 0,
               shuffle: bool = True, process_index: int | None = None,
               process_count: int | None = None):
    self.records = records
    self.process_index = (jax.process_index() if process_index is None
                          else process_index)
    self.process_count = (jax.process_count() if process_count is None
                          else process_count)
    if global_batch_size % self.process_count:
      raise ValueError(
          f"batch size {global_batch_size} must be divisible by the process "
          f"count {self.process_count}")
    if global_batch_size > len(records):
      raise ValueError(f"batch size {global_batch_size} exceeds the data set "
                       f"size {len(records)}")
    if augment not in ("none", "inception"):
      raise ValueError(f"config.data.augment={augment!r}; choose 'none' or "
                       f"'inception'")
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // self.process_count
    self.seed, self.shuffle, self.workers = seed, shuffle, workers
    self.decode = _Decode(image_size, channels, augment, seed, min_scale, flip)
    self.step = 0
    self._iter = None

  def _build(self, start_step: int):
    stream = grain.MapDataset.source(self.records)
    if self.shuffle:
      stream = stream.shuffle(seed=self.seed)
    stream = stream.repeat()
    local = self.local_batch_size
    row = _GlobalRow(stream, self.global_batch_size, local,
                     self.process_index)
    ds = (grain.MapDataset.range(start_step * local, sys.maxsize)
          .map(row).map(self.decode).batch(local, drop_remainder=True))
    it = ds.to_iter_dataset()
    if self.workers:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers))
    return iter(it)

  def get_state(self) -> dict[str, Any]:
    return {"step": int(self.step), "seed": int(self.seed),
            "global_batch_size": int(self.global_batch_size),
            "num_examples": len(self.records), "pipeline": "grain",
            "process_index": self.process_index,
            "process_count": self.process_count}

  def set_state(self, state: dict[str, Any]) -> None:
    for key in ("seed", "global_batch_size", "num_examples"):
      mine = self.get_state()[key]
      if key in state and int(state[key]) != mine:
        raise ValueError(
            f"the checkpointed data pipeline had {key}={state[key]} but this "
            f"run has {mine}; resume with the same data and batch size or "
            f"use a new workdir")
    self.close()
    self.step = int(state["step"])

  def close(self) -> None:
    """Stops the worker processes (they restart on the next batch)."""
    it, self._iter = self._iter, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iter is None:
      self._iter = self._build(self.step)
    batch = next(self._iter)
    self.step += 1
    return convert_record(batch)
