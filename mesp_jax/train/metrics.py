"""Metric output: JSON lines, TensorBoard events and a progress line.

Only process 0 writes. TensorBoard events come from ``tensorboardX`` because
``clu.metric_writers`` imports tensorflow at import time.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from absl import logging

from mesp_jax.base import io


def _to_python(value: Any) -> Any:
  arr = np.asarray(value)
  if arr.ndim == 0:
    v = arr.item()
    return float(v) if isinstance(v, (float, np.floating)) else v
  return arr.tolist()


class MetricWriter:
  """Appends ``{"step": s, "split": ..., **metrics}`` to ``metrics.jsonl``.

  Scalars also go to TensorBoard under ``workdir/tb``. On resume call
  :meth:`truncate_after` so steps logged after the restored checkpoint (and
  about to be recomputed) are not duplicated.
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if io.is_writer():
      io.makedirs(workdir)
      if tensorboard and io.is_uri(workdir):
        logging.warning("no TensorBoard events in %s: they are written to "
                        "local folders only (metrics.jsonl has every value)",
                        workdir)
      elif tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def truncate_after(self, step: int) -> None:
    if not io.is_writer() or not io.exists(self.path):
      return
    kept = []
    for line in io.read_text(self.path).splitlines(keepends=True):
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError):
        continue  # a torn last line from a crash
    io.atomic_write_bytes(self.path, "".join(kept).encode())

  def write(self, step: int, metrics: dict[str, Any], split: str = "train"
            ) -> None:
    if not io.is_writer():
      return
    record = {"step": int(step), "split": split}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    io.append_text(self.path, json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """Reads ``metrics.jsonl`` (optionally one split) as a list of dicts."""
  path = os.path.join(workdir, "metrics.jsonl")
  out = []
  for line in io.read_text(path).splitlines():
    rec = json.loads(line)
    if split is None or rec.get("split") == split:
      out.append(rec)
  return out


def _fmt_seconds(s: float) -> str:
  s = int(max(s, 0))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class Progress:
  """A progress line with steps/s and ETA, printed by process 0."""

  def __init__(self, total_steps: int, start_step: int, name: str = "train"):
    self.total = total_steps
    self.name = name
    self._last_step = start_step
    self._last_time = time.time()
    self.rate = 0.0

  def update(self, step: int, metrics: dict[str, Any]) -> str:
    now = time.time()
    if step > self._last_step:
      self.rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total - step) / self.rate if self.rate else float("nan")
    shown = " | ".join(
        f"{k} {float(v):.4g}" for k, v in metrics.items()
        if np.asarray(v).ndim == 0)
    line = (f"[{self.name}] step {step}/{self.total} | {shown} | "
            f"{self.rate:.2f} steps/s | ETA "
            f"{_fmt_seconds(eta) if self.rate else '?'}")
    if io.is_writer():
      logging.info(line)
      print(line, flush=True)
    return line
