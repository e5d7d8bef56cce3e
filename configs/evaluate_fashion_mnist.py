"""Evaluate a samples npz on Fashion-MNIST (stage ``evaluate``).

  python -m mesp_jax.main --config=configs/evaluate_fashion_mnist.py \\
      --config.inputs.samples=RUN/samples.npz \\
      --config.inputs.feature_net_workdir=runs/feature_net_fm \\
      --workdir=RUN/eval

Writes ``eval.json``: ``fd_fashion_mnist_classifier`` (offline Frechet
distance on the project's classifier, not FID), KID, precision/recall, the
same for the real test split against the train split, the copy rate, and FID
/ KID / IS only when ``--config.evaluate.inception_weights=FILE`` gives the
standard FID Inception weights.

Variants: (none) the full evaluation; ``smoke`` (tests) keeps KID and the
copy-rate search small.
"""

import ml_collections

from mesp_jax.base import config as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "evaluate"
  config.seed = 0
  config.mesh = cu.section("mesh")
  config.inputs = cu.section("inputs")
  config.evaluate = cu.section("evaluate")
  if variant == "smoke":
    config.evaluate.update(batch_size=64, kid_subsets=10, kid_subset_size=100,
                           copy_rate_train_examples=512)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
