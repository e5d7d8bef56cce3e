"""Benchmarks: ``python -m mesp_jax.bench {sampler,kernel,train,data} [args]``.

Each benchmark warms up, times with ``block_until_ready`` and prints a table.
Use ``python -m mesp_jax.bench NAME --help`` for a benchmark's arguments.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "sampler": "mesp_jax.benchmarks.sampler",  # neural ARVM decoding
    "kernel": "mesp_jax.benchmarks.kernel",    # kernel ARVM sampling
    "train": "mesp_jax.benchmarks.train",      # BL-AE / ARVM train step
    "data": "mesp_jax.benchmarks.data",        # grain input pipeline
}


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in BENCHMARKS:
    names = ", ".join(BENCHMARKS)
    sys.exit(f"usage: python -m mesp_jax.bench {{{names}}} [--help]")
  module = importlib.import_module(BENCHMARKS[argv[0]])
  module.main(argv[1:])


if __name__ == "__main__":
  main()
