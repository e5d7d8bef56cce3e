"""Feature statistics of real data splits, cached per feature net checkpoint.

The reference side of the offline Frechet distance, KID and precision/recall:
the classifier's features of each ``feature_net.reference_splits`` split,
stored as ``refstats_{dataset}_{split}_{feature_net}.npz``
(:class:`mesp_jax.eval.fid.ReferenceStats`) and listed with the checkpoint
step they came from in ``reference_stats.json``, so a retrained net never
reuses stale statistics.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mesp_jax.base import io
from mesp_jax.base.image import to_float_images
from mesp_jax.data import source_from_config
from mesp_jax.eval.fid import ReferenceStats
from mesp_jax.models.feature_net import (
    FeatureNet,
    classifier_features,
    feature_net_name,
)

REFERENCE_RECORD = "reference_stats.json"


def source_features(model: FeatureNet, params, source,
                    num_examples: int | None = None,
                    batch_size: int = 500) -> np.ndarray:
  """Features [N, feature_dim] of the first ``num_examples`` of a source."""
  n = len(source) if not num_examples else min(num_examples, len(source))
  out = []
  for start in range(0, n, batch_size):
    record = source.read(np.arange(start, min(start + batch_size, n)))
    out.append(classifier_features(model, params,
                                   to_float_images(record["image"]),
                                   batch_size=batch_size))
  return np.concatenate(out)


def reference_stats(config: ml_collections.ConfigDict, workdir: str,
                    model: FeatureNet, params, step: int
                    ) -> dict[str, ReferenceStats]:
  """Loads or computes the cached feature statistics of each reference split.

  A cache written for another checkpoint step or example count is
  recomputed. Returns {split: ReferenceStats}.
  """
  fcfg = config.feature_net
  name = feature_net_name(config.data.name)
  record_path = os.path.join(workdir, REFERENCE_RECORD)
  previous = {}
  if os.path.exists(record_path):
    with open(record_path) as f:
      previous = json.load(f).get("splits", {})
  out, record = {}, {}
  for split in fcfg.reference_splits:
    source = source_from_config(config.data, split)
    limit = int(fcfg.reference_examples) or None
    n = len(source) if limit is None else min(limit, len(source))
    path = ReferenceStats.path(workdir, config.data.name, split, name)
    old = previous.get(split, {})
    stale = (old.get("checkpoint_step") != step
             or old.get("num_samples") != n)
    if stale and os.path.exists(path) and io.is_writer():
      os.remove(path)
    if stale:
      multihost_utils.sync_global_devices(f"refstats_{split}_{step}")
    stats = ReferenceStats.load_or_compute(
        workdir, config.data.name, split, name,
        lambda s=source, n=n: source_features(model, params, s, n,
                                              int(fcfg.feature_batch_size)),
        max_features=int(fcfg.reference_max_features) or None)
    out[split] = stats
    record[split] = {"path": os.path.basename(path), "checkpoint_step": step,
                     "num_samples": stats.num_samples,
                     "stored_features": (0 if stats.features is None
                                         else int(stats.features.shape[0]))}
  io.write_json(record_path, {"feature_net": name, "dataset": config.data.name,
                              "splits": record})
  return out
