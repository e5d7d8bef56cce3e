"""BL-AE on Fashion-MNIST (28x28 padded to 32x32, grey).

Variants (``--config=configs/blae_fashion_mnist.py:VARIANT``):
  (none)  the full run: binary codes (bin rate >= 0.9);
  demo    what the README's main command trains;
  smoke   a few tiny steps, for tests.

Latent: 8x8 positions x 16 bits (downsampling factor 4). Binarisation comes
from the paper's mechanism alone: a bounded code z = tanh(enc(x)) seen by the
decoder through Gaussian noise. With the loss a per-pixel *mean* squared
error, beta = 0.1 (the authors' value for their scaling) dominates the
reconstruction term and pins codes near 0, so beta = 0 here; the noise level
sets how binary the codes become (bin rate ~0.83 at sigma 1.5, higher as sigma
ramps on to 3), see docs/blae_binarisation.md.

Encode with ``--config.stage=blae_encode --config.inputs.blae_workdir=DIR``.
"""

import ml_collections

from mesp_jax.base import config as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "blae"
  config.seed = 0
  config.data = cu.section("data", name="fashion_mnist", image_size=32)
  config.mesh = cu.section("mesh")
  config.blae = cu.section(
      "blae", family="downsample", width=32, bits=16, num_res_blocks=2,
      downsample_factor=4, sigma=3.0, sigma_start=0.5, sigma_ramp_steps=1500,
      beta=0.0)
  config.train = cu.section(
      "train", batch_size=64, num_steps=3000, learning_rate=2e-3,
      warmup_steps=200, schedule="cosine", log_every=100, eval_every=500,
      checkpoint_every=1000)
  config.encode = cu.section("encode")
  config.inputs = cu.section("inputs")

  if variant == "demo":
    config.blae.update(width=32, num_res_blocks=1, sigma=1.5,
                       sigma_ramp_steps=300)
    config.train.update(num_steps=1500, eval_every=500, checkpoint_every=500,
                        log_every=100, warmup_steps=100)
    config.data.eval_examples = 2000
  elif variant == "smoke":
    config.blae.update(width=8, num_res_blocks=1, bits=8, sigma_ramp_steps=0,
                       sigma_start=1.0)
    cu.smoke(config, checkpoint_every=2)
    config.encode.update(splits=("test",), batch_size=64)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '', 'demo' or "
                     f"'smoke'")
  return config
