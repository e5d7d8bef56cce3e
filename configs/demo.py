"""The README's main command: BL-AE -> tokens -> gamma-ARVM -> samples -> report.

  python -m mesp_jax.main --config=configs/demo.py --workdir=runs/demo

Runs on the bundled default data (Fashion-MNIST from Debian's
dataset-fashion-mnist) on a laptop CPU (docs/benchmarks.md has measured times).
Sub-configs are the ``:demo`` variants of ``blae_fashion_mnist.py`` and
``arvm_fashion_mnist.py`` (``:smoke`` for the ``smoke`` variant), so any field
can be overridden, e.g. ``--config.arvm.train.num_steps=2000``.
"""

import os

import ml_collections

from mesp_jax.base.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = ""):
  if variant not in ("", "smoke"):
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  sub = variant or "demo"
  config = ml_collections.ConfigDict()
  config.stage = "pipeline"
  config.reencode = False
  config.blae = load_config(os.path.join(HERE, f"blae_fashion_mnist.py:{sub}"))
  config.arvm = load_config(os.path.join(HERE, f"arvm_fashion_mnist.py:{sub}"))
  return config
