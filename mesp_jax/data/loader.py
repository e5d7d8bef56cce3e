"""A deterministic, process-sharded, checkpointable batch loader.

Every process holds the same permutation of the data set for each epoch
(seeded by ``(seed, epoch)``) and reads only its own contiguous slice of each
global batch; ``jax.make_array_from_process_local_data`` then assembles the
global batch on the mesh. The loader's whole state is the number of global
batches produced so far, saved with each checkpoint, so a resumed run reads
exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from mesp_jax.base.image import to_float_images


def convert_record(record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """uint8 ``image`` -> float32 in [-1, 1]; ``label`` -> int32; rest as is."""
  out = dict(record)
  if "image" in out and out["image"].dtype == np.uint8:
    out["image"] = to_float_images(out["image"])
  if "label" in out:
    out["label"] = out["label"].astype(np.int32)
  return out


class Loader:
  """Infinite iterator of process-local batches (``{'image', 'label'}`` etc.).

  Args:
    source: random-access source with ``len`` and ``read(indices)``.
    global_batch_size: batch size summed over all processes.
    seed: shuffling seed; the same seed gives the same batches.
    shuffle: permute each epoch (otherwise sequential order).
    process_index / process_count: default to jax's.
  """

  def __init__(self, source, global_batch_size: int, seed: int,
               shuffle: bool = True, process_index: int | None = None,
               process_count: int | None = None):
    self.source = source
    self.process_index = (jax.process_index() if process_index is None
                          else process_index)
    self.process_count = (jax.process_count() if process_count is None
                          else process_count)
    if global_batch_size % self.process_count:
      raise ValueError(
          f"batch size {global_batch_size} must be divisible by the process "
          f"count {self.process_count}")
    if global_batch_size > len(source):
      raise ValueError(f"batch size {global_batch_size} exceeds the data set "
                       f"size {len(source)}")
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // self.process_count
    self.seed = seed
    self.shuffle = shuffle
    self.batches_per_epoch = len(source) // global_batch_size
    self.step = 0
    self._order_epoch = -1
    self._order = None

  # -- state ---------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    return {"step": int(self.step), "seed": int(self.seed),
            "global_batch_size": int(self.global_batch_size),
            "num_examples": len(self.source)}

  def set_state(self, state: dict[str, Any]) -> None:
    for key in ("seed", "global_batch_size", "num_examples"):
      mine = self.get_state()[key]
      if key in state and int(state[key]) != mine:
        raise ValueError(
            f"the checkpointed data loader had {key}={state[key]} but this "
            f"run has {mine}; resume with the same data and batch size or "
            f"use a new workdir")
    self.step = int(state["step"])

  # -- iteration -----------------------------------------------------------
  def _epoch_order(self, epoch: int) -> np.ndarray:
    if epoch != self._order_epoch:
      n = len(self.source)
      if self.shuffle:
        rng = np.random.default_rng([self.seed, epoch])
        self._order = rng.permutation(n)
      else:
        self._order = np.arange(n)
      self._order_epoch = epoch
    return self._order

  def indices_for_step(self, step: int) -> np.ndarray:
    """Global-batch indices of batch ``step`` restricted to this process."""
    epoch, k = divmod(step, self.batches_per_epoch)
    order = self._epoch_order(epoch)
    start = k * self.global_batch_size + self.process_index * \
        self.local_batch_size
    return order[start:start + self.local_batch_size]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    record = self.source.read(self.indices_for_step(self.step))
    self.step += 1
    return convert_record(record)


def eval_batches(source, global_batch_size: int, num_examples: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over the first ``num_examples`` items (all by default).

  The last batch is padded by repeating the final example; ``mask`` marks the
  real rows so averages are exact.
  """
  p = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  n = len(source) if num_examples is None else min(num_examples, len(source))
  local = global_batch_size // pc
  for start in range(0, n, global_batch_size):
    idx = np.arange(start, start + global_batch_size)
    mask = idx < n
    idx = np.minimum(idx, n - 1)[p * local:(p + 1) * local]
    record = convert_record(source.read(idx))
    record["mask"] = mask[p * local:(p + 1) * local]
    yield record
