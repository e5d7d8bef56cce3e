"""BL-AE on CIFAR-10: the authors' full-resolution 32x32x7 design.

7x7 conv stem, width 512, 4 residual blocks of 1x1 convolutions, 1x1 conv to
7 bits, mirrored decoder; sigma 0.1 in training, beta 0.1, Adam 1e-4, batch
128 (the authors' reference numbers). Needs a tfds array_record build of
cifar10 (``python -m mesp_jax.data.prepare --dataset=cifar10``).

Variants: (none) full; ``smoke`` a tiny model for tests and benchmarks.
"""

import ml_collections

from mesp_jax.base import config as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "blae"
  config.seed = 0
  config.data = cu.section("data", name="cifar10", image_size=32)
  config.mesh = cu.section("mesh")
  config.blae = cu.section(
      "blae", family="full_res", width=512, bits=7, num_res_blocks=4,
      stem_kernel=7, downsample_factor=1, sigma=0.1, sigma_start=0.1,
      beta=0.1)
  config.train = cu.section("train", batch_size=128, num_steps=200_000,
                            learning_rate=1e-4, eval_every=5000,
                            checkpoint_every=5000)
  config.encode = cu.section("encode")
  config.inputs = cu.section("inputs")
  if variant == "smoke":
    config.blae.update(width=16, num_res_blocks=1)
    cu.smoke(config, eval_batch_size=256)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
