"""Classifier for the offline Frechet distance on Fashion-MNIST (32x32 grey).

Variants (``--config=configs/feature_net_fashion_mnist.py:VARIANT``):
  (none)  the full run: 1200 steps of batch 128 (2.6 epochs), 90.7% test
          accuracy, then reference statistics of all 60k train and 10k test
          images (docs/evaluation.md);
  smoke   tests: a tiny net, a few steps, 256 reference images per split.

The statistics land in the workdir as
``refstats_fashion_mnist_{split}_fd_fashion_mnist_classifier.npz``; stage
``evaluate`` reads them through ``config.inputs.feature_net_workdir``.
"""

import ml_collections

from mesp_jax.base import config as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "train_feature_net"
  config.seed = 0
  config.data = cu.section("data", name="fashion_mnist", image_size=32)
  config.mesh = cu.section("mesh")
  config.feature_net = cu.section(
      "feature_net", num_classes=10, widths=(16, 32, 64, 128),
      feature_dim=256, num_groups=8, dropout_rate=0.0,
      reference_splits=("train", "test"), reference_examples=0,
      reference_max_features=10_000, feature_batch_size=500)
  config.train = cu.section(
      "train", batch_size=128, num_steps=1200, learning_rate=3e-3,
      warmup_steps=50, schedule="cosine", weight_decay=1e-4, log_every=100,
      eval_every=400, checkpoint_every=400, eval_batch_size=500)

  if variant == "smoke":
    config.feature_net.update(widths=(8, 16), feature_dim=32,
                              reference_examples=256,
                              reference_max_features=256,
                              feature_batch_size=128)
    cu.smoke(config, batch_size=32)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
