"""Evaluate a samples npz on Fashion-MNIST (stage ``evaluate``).

  python -m mesp_jax.main --config=configs/evaluate_fashion_mnist.py \\
      --config.evaluate.samples=RUN/samples.npz \\
      --config.evaluate.feature_net_workdir=runs/feature_net_fm \\
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

from mesp_jax import config_utils as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "evaluate"
  config.seed = 0
  config.mesh = cu.mesh_config()
  config.evaluate = ml_collections.ConfigDict(dict(
      samples="",  # .npz with images [N, H, W, C] in [-1, 1]
      feature_net_workdir="",  # a stage 'train_feature_net' workdir
      max_samples=0,  # 0: all
      batch_size=500,  # classifier feature batches
      kid_subsets=100, kid_subset_size=1000, pr_k=3, seed=0,
      copy_rate=True, copy_rate_train_examples=0,  # 0: whole train split
      copy_threshold_db=25.0,
      inception_weights="",  # FID Inception-v3 file; empty: no FID
      inception_cache_dir="",  # default: the feature-net workdir
      inception_reference_examples=10_000, inception_batch_size=50,
      output="eval.json"))
  if variant == "smoke":
    config.evaluate.update(batch_size=64, kid_subsets=10, kid_subset_size=100,
                           copy_rate_train_examples=512)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
