"""BL-AE on ImageNet 256x256 (tfds ``imagenet2012``, class labels kept).

Latent: 16x16 positions x 24 bits (downsampling factor 16, VQGAN-style
residual stages with GroupNorm, widths 128-128-256-256-512), so the ARVM
(``configs/arvm_imagenet.py``) sees 256 positions, grouped into two 12-bit
tokens each (4096-bin histograms). 36,734,619 parameters (checked by the
tests). bf16 compute with float32 parameters, EMA of the parameters (used
for encoding).

Hardware: the full variant is sized for a TPU v4-32 slice (16 chips, 32 GiB
HBM each): global batch 256 = 16 images per chip, data parallel with the
optimizer state sharded over ``fsdp``. It is a plan, not a measurement:
nothing here has run on a TPU; ``python -m mesp_jax.bench train`` measures
a step where one is available.

Data: prepare ImageNet once (TensorFlow is needed for that one step only)::

  python -m mesp_jax.data.prepare --dataset=imagenet2012 \\
      --manual_dir=DIR_WITH_ILSVRC2012_TARS --data_dir=~/tensorflow_datasets

Training reads the array_record build through grain without TensorFlow,
decoding JPEGs in ``data.workers`` processes with DCT-domain downscaling and
Inception-style random-resized crops (area >= 35 %: generation is judged on
centre crops, so crops stay large) and flips.

Variants: (none) full; ``smoke``: 64x64 crops of the miniature ImageNet
(``python -m mesp_jax.data.mini_imagenet --data_dir=runs/mini_imagenet``),
the same design (f = 16, 24 bits) with tiny widths, a few steps.
"""

import ml_collections

from mesp_jax.base import config as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "blae"
  config.seed = 0
  config.data = cu.section(
      "data", name="imagenet2012", image_size=256, train_split="train",
      eval_split="validation", eval_examples=10_000, augment="inception",
      crop_min_scale=0.35, workers=16)
  config.mesh = cu.section("mesh", fsdp=4)
  config.blae = cu.section(
      "blae", family="downsample", width=128, bits=24, num_res_blocks=2,
      downsample_factor=16, channel_mult=(1, 1, 2, 2, 4), norm="group",
      num_groups=32, dtype="bfloat16", sigma=2.0, sigma_start=0.5,
      sigma_ramp_steps=20_000, beta=0.0)
  config.train = cu.section(
      "train", batch_size=256, num_steps=300_000, learning_rate=2e-4,
      warmup_steps=5_000, schedule="cosine", grad_clip=1.0,
      weight_decay=1e-4, b2=0.99, ema_decay=0.999, log_every=100,
      eval_every=10_000, checkpoint_every=5_000, eval_batch_size=256)
  config.encode = cu.section("encode", splits=("train", "validation"),
                             batch_size=512)
  config.inputs = cu.section("inputs")

  if variant == "smoke":
    config.data.update(image_size=64, data_dir="runs/mini_imagenet",
                       workers=0)
    config.mesh.fsdp = 1
    config.blae.update(width=8, num_res_blocks=1, num_groups=4,
                       sigma_ramp_steps=0, sigma_start=1.0)
    cu.smoke(config, checkpoint_every=2, ema_decay=0.9)
    config.encode.update(batch_size=64)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
