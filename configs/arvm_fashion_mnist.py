"""Neural gamma-ARVM on Fashion-MNIST BL-AE tokens.

The tokens come from ``blae_encode`` of ``configs/blae_fashion_mnist.py``:
8x8 positions x 16 bits, grouped into g = 8 bit tokens (2 per position, 128
tokens per image, 256-bin histograms). Class-conditional with 10 % null labels
for classifier-free guidance; observation range gamma = 3.

Set ``--config.inputs.tokens_dir`` to the ``blae_encode`` workdir. For
sampling run the same config with ``--config.stage=sample
--config.inputs.arvm_workdir=DIR``.

Variants: (none) full; ``demo`` (the README's main command); ``smoke`` (tests).
"""

import ml_collections

from mesp_jax.base import config as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "arvm"
  config.seed = 0
  config.mesh = cu.section("mesh")
  config.inputs = cu.section("inputs")
  config.tokens = cu.section("tokens")
  config.arvm = cu.section("arvm", group=8, gamma=3, num_layers=6,
                           d_model=256, num_heads=8, num_classes=10,
                           label_drop=0.1)
  config.train = cu.section(
      "train", batch_size=128, num_steps=20_000, learning_rate=5e-4,
      warmup_steps=500, schedule="cosine", grad_clip=1.0, weight_decay=0.01,
      log_every=100, eval_every=2000, checkpoint_every=2000)
  config.sampler = cu.section("sampler", kind="neural", num_samples=64)
  if variant == "demo":
    config.arvm.update(num_layers=3, d_model=128, num_heads=4)
    config.train.update(batch_size=64, num_steps=1000, learning_rate=1e-3,
                        warmup_steps=100, eval_every=500,
                        checkpoint_every=500, visualize_every=500)
    config.tokens.eval_examples = 2000
  elif variant == "smoke":
    config.arvm.update(num_layers=1, d_model=32, num_heads=2)
    cu.smoke(config)
    config.sampler.update(num_samples=16, batch_size=8)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '', 'demo' or "
                     f"'smoke'")
  return config
