"""This machine's own limits, measured in the benchmark's process.

A matmul probe gives the attainable FLOP/s and a copy probe the attainable
memory bandwidth of the default backend; a benchmark row's fraction of each
says whether it is bound by arithmetic, by memory or by neither (overheads:
dispatch, small ops, loop control). XLA's ``cost_analysis`` gives the FLOPs
and bytes of one compiled step.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp


def _best_seconds(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak(size: int = 2048, dtype=jnp.float32) -> float:
  """FLOP/s of a ``size x size`` matmul (best of 5)."""
  a = jnp.ones((size, size), dtype)
  b = jnp.ones((size, size), dtype)
  seconds = _best_seconds(jax.jit(jnp.matmul), a, b)
  return 2.0 * size**3 / seconds


def copy_peak(megabytes: int = 256) -> float:
  """Bytes/s read plus written by an elementwise copy of a large array."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  seconds = _best_seconds(jax.jit(lambda v: v * 1.0), x)
  return 2.0 * x.size * 4 / seconds


def measure_peaks() -> dict[str, float]:
  """``{'flops': FLOP/s, 'bytes': bytes/s}`` of this machine's probes."""
  return {"flops": matmul_peak(), "bytes": copy_peak()}


def step_cost(compiled: Any) -> dict[str, float]:
  """``{'flops', 'bytes'}`` of one call of a compiled function (XLA's cost
  analysis; 0 where the backend reports nothing)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {"flops": float(analysis.get("flops", 0.0)),
          "bytes": float(analysis.get("bytes accessed", 0.0))}


def describe_peaks(peaks: dict[str, float]) -> str:
  return (f"matmul probe {peaks['flops'] / 1e9:.1f} GFLOP/s, copy probe "
          f"{peaks['bytes'] / 1e9:.1f} GB/s")
