"""Stage ``train_feature_net``: the classifier of the offline Frechet distance.

Trains (or resumes) the classifier on the data set's labels (softmax
cross-entropy; eval accuracy on the test split), then caches the reference
feature statistics of ``feature_net.reference_splits`` in the workdir
(:mod:`mesp_jax.eval.reference`); stage ``evaluate`` reads them through
``config.inputs.feature_net_workdir``.
"""

from __future__ import annotations

import jax
import ml_collections

from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.eval import reference
from mesp_jax.train import feature_net, loop, provenance


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Returns {split: ReferenceStats}."""
  config_lib.validate(config, "train_feature_net")
  provenance.check_and_record(
      workdir, feature_net.STAGE, config,
      {"data": provenance.data_identity(config.data)},
      resuming=provenance.has_checkpoints(workdir))
  state = loop.train(config, workdir, feature_net.make_task(config))
  step = int(jax.device_get(state.step))
  model = feature_net.build_feature_net(config.feature_net)
  stats = reference.reference_stats(config, workdir, model,
                                    sharding.to_host(state.params), step)
  if io.is_writer():
    for split, s in stats.items():
      print(f"[{feature_net.STAGE}] reference statistics {s.feature_net} "
            f"{split}: {s.num_samples} images", flush=True)
  return stats
