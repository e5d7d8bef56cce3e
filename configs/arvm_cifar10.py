"""Neural gamma-ARVM on CIFAR-10 BL-AE tokens: the paper's setting.

32x32 positions of 7 bits (``configs/blae_cifar10.py``), g = 7: one token per
position, a 128-bin histogram, observation range gamma = 5. Set
``--config.inputs.tokens_dir`` to the ``blae_encode`` workdir.

Variants: (none) full; ``smoke`` (tiny, for benchmarks and tests).
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
  config.arvm = cu.section("arvm", group=7, gamma=5, num_layers=12,
                           d_model=512, num_heads=8, num_classes=10,
                           label_drop=0.1)
  config.train = cu.section(
      "train", batch_size=256, num_steps=200_000, learning_rate=3e-4,
      warmup_steps=2000, schedule="cosine", grad_clip=1.0,
      weight_decay=0.05, eval_every=5000, checkpoint_every=5000)
  config.sampler = cu.section("sampler", num_samples=1000, batch_size=250)
  if variant == "smoke":
    config.arvm.update(num_layers=1, d_model=32, num_heads=2)
    cu.smoke(config, eval_batch_size=256)
    config.tokens.eval_examples = 0
    config.sampler.update(num_samples=16, batch_size=8)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
