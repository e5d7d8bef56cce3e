"""BL-AE on CIFAR-10: the authors' full-resolution 32x32x7 design.

7x7 conv stem, width 512, 4 residual blocks of 1x1 convolutions, 1x1 conv to
7 bits, mirrored decoder; sigma 0.1 in training, beta 0.1, Adam 1e-4, batch
128 (the authors' reference numbers). Needs a tfds array_record build of
cifar10 (``python -m mesp_jax.data.prepare --dataset=cifar10``).

Variants: (none) full; ``smoke`` a tiny model for tests and benchmarks.
"""

import ml_collections

from mesp_jax import config_utils as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "blae"
  config.seed = 0
  config.data = cu.data_config("cifar10", 32)
  config.mesh = cu.mesh_config()
  config.blae = cu.blae_config(
      family="full_res", width=512, bits=7, num_res_blocks=4, stem_kernel=7,
      downsample_factor=1, sigma=0.1, sigma_start=0.1, beta=0.1)
  config.train = cu.train_config(batch_size=128, num_steps=200_000,
                                 learning_rate=1e-4, eval_every=5000,
                                 checkpoint_every=5000)
  config.encode = cu.encode_config()
  if variant == "smoke":
    config.blae.update(width=16, num_res_blocks=1)
    config.train.update(batch_size=16, num_steps=4, eval_every=4,
                        checkpoint_every=4, log_every=2,
                        async_checkpoint=False, tensorboard=False)
    config.data.eval_examples = 64
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
