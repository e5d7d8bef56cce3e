"""The scripted FID protocol on Fashion-MNIST (stage ``score``).

  # 2000 samples of a neural ARVM, seed 0, scored in one command
  python -m mesp_jax.main --config=configs/score_fashion_mnist.py \\
      --config.inputs.arvm_workdir=runs/demo/arvm \\
      --config.inputs.feature_net_workdir=runs/feature_net_fm \\
      --workdir=runs/demo/score
  # the kernel ARVM instead: its bank is a blae_encode run's training tokens
  python -m mesp_jax.main --config=configs/score_fashion_mnist.py \\
      --config.sampler.kind=kernel --config.inputs.tokens_dir=runs/demo/tokens \\
      --config.inputs.feature_net_workdir=runs/feature_net_fm \\
      --workdir=runs/demo/score_kernel

Add ``--config.evaluate.inception_weights=FILE`` (the standard FID
Inception-v3 weights) for FID, KID and IS on Inception; without it the score
is the offline Frechet distance in the project's own classifier
(``fd_fashion_mnist_classifier``, never called FID). ``eval.json`` records
N, the seed, the sampler, the checkpoints, the samples' and the reference
statistics' SHA-256 and the weights' SHA-256.

Variants: (none) 2000 samples; ``smoke`` (tests) 32 samples of the kernel
ARVM and a small evaluation.
"""

import ml_collections

from mesp_jax.base import config as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "score"
  config.seed = 0
  config.mesh = cu.section("mesh")
  config.inputs = cu.section("inputs")
  config.tokens = cu.section("tokens")
  config.sampler = cu.section("sampler", kind="neural", num_samples=2000,
                              batch_size=400, seed=0)
  config.kernel = cu.section("kernel", group=8, sigma_s=0.3, gamma=3)
  config.evaluate = cu.section("evaluate")
  if variant == "smoke":
    config.sampler.update(kind="kernel", num_samples=32, batch_size=16)
    config.kernel.update(chunk_size=64)
    config.evaluate.update(batch_size=64, kid_subsets=10, kid_subset_size=16,
                           copy_rate_train_examples=512)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
