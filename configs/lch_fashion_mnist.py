"""The local dependence test with both gamma-ARVMs (stage ``lch_study``).

  python -m mesp_jax.main --config=configs/lch_fashion_mnist.py \\
      --workdir=runs/lch --config.sweep.inputs.tokens_dir=runs/blae_full_tokens \\
      --config.sweep.inputs.feature_net_workdir=runs/feature_net_fm

The tokens are ``blae_encode`` of the full BL-AE
(``configs/blae_fashion_mnist.py``, bin rate >= 0.9): 8x8 positions x 16
bits, g = 8 (128 tokens of 256 values). For every gamma of ``gammas`` a
neural ARVM (``arvm``: unconditional, 3 layers x 128, the same steps, batch
and seed for every gamma; only ``arvm.gamma`` differs) is trained in
``workdir/arvm_gamma_{g}``; then the gamma sweep (``sweep``: the settings of
``configs/gamma_sweep_fashion_mnist.py``) runs once per kernel noise of
``sigmas``, the neural ARVMs in the first. 256 samples per model and gamma,
seed 0. ``sweep.inputs.feature_net_workdir`` (stage ``train_feature_net``)
replaces the pixel-space distance by the classifier one.

Any field is overridden as ``--config.arvm.train.num_steps=...`` or
``--config.sweep.sampler.num_samples=...``.

Variants: (none) the full study; ``smoke`` (tests: two gammas, a few steps).
"""

import os

import ml_collections

from mesp_jax.base.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = ""):
  if variant not in ("", "smoke"):
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  config = ml_collections.ConfigDict()
  config.stage = "lch_study"
  config.gammas = "0,1,2,3,5,global"
  config.sigmas = "0.3,0.5,0.7"
  arvm = load_config(os.path.join(HERE, "arvm_fashion_mnist.py"))
  arvm.arvm.update(num_layers=3, d_model=128, num_heads=4, num_classes=0,
                   label_drop=0.0, attention="auto")
  arvm.train.update(batch_size=64, num_steps=1000, learning_rate=1e-3,
                    warmup_steps=100, eval_every=500,
                    checkpoint_every=500)
  arvm.tokens.eval_examples = 2000
  config.arvm = arvm
  config.sweep = load_config(
      os.path.join(HERE, "gamma_sweep_fashion_mnist.py"))
  config.sweep.inputs.tokens_dir = ""
  # The kernel ARVM's held-out bits per token on the first 500 test latents
  # (2000 cost about 100 s per kernel and gamma on 2 CPU cores).
  config.sweep.sweep.bits_examples = 500
  if variant == "smoke":
    config.gammas = "1,global"
    config.sigmas = "0.3,0.5"
    config.arvm = load_config(os.path.join(HERE, "arvm_fashion_mnist.py:smoke"))
    config.arvm.arvm.num_classes = 0
    config.sweep = load_config(
        os.path.join(HERE, "gamma_sweep_fashion_mnist.py:smoke"))
    config.sweep.sweep.neural.batch_size = 8
    config.sweep.sweep.pr_examples = 64
  return config
