"""Stage ``train_feature_net``: the classifier behind the offline Frechet distance.

No FID Inception weights can be fetched offline, so the project trains its
own classifier (:class:`mesp_jax.models.feature_net.FeatureNet`) on the data
set's labels and compares generated and real images in its penultimate
feature space. The distance is reported as ``fd_{dataset}_classifier`` (see
:func:`mesp_jax.models.feature_net.feature_net_name`), never as "FID".

Data path: config -> Loader (labelled images in [-1, 1]) -> loop.train
(softmax cross-entropy; eval accuracy on the test split) -> checkpoint ->
reference statistics of the train and test splits, cached in the workdir as
``refstats_{dataset}_{split}_{feature_net}.npz``
(:class:`mesp_jax.eval.fid.ReferenceStats`) and listed with the checkpoint
step they came from in ``reference_stats.json`` (a retrained net never reuses
stale statistics).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mesp_jax import io
from mesp_jax.config_utils import check_positive
from mesp_jax.data import source_from_config
from mesp_jax.data.loader import Loader, eval_batches, to_float_images
from mesp_jax.eval.fid import ReferenceStats
from mesp_jax.models.feature_net import (
    FeatureNet,
    classifier_features,
    classifier_loss,
    feature_net_name,
)
from mesp_jax.train import loop, sharding
from mesp_jax.train.blae import load_config_json, sources

STAGE = "feature_net"  # task name: metrics, config json, checkpoint meta
ARCHITECTURE_FIELDS = ("num_classes", "widths", "feature_dim", "num_groups")
REFERENCE_RECORD = "reference_stats.json"


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad field."""
  for field in ("feature_net.num_classes", "feature_net.feature_dim",
                "feature_net.num_groups", "train.batch_size",
                "train.num_steps", "train.learning_rate", "data.image_size",
                "feature_net.feature_batch_size"):
    check_positive(config, field)
  check_positive(config, "feature_net.dropout_rate", allow_zero=True)
  check_positive(config, "feature_net.reference_examples", allow_zero=True)
  for w in config.feature_net.widths:
    if w % config.feature_net.num_groups:
      raise ValueError(
          f"config.feature_net.widths={tuple(config.feature_net.widths)}: "
          f"every width must be divisible by config.feature_net.num_groups="
          f"{config.feature_net.num_groups}")


def build_feature_net(cfg: ml_collections.ConfigDict) -> FeatureNet:
  return FeatureNet(num_classes=cfg.num_classes, widths=tuple(cfg.widths),
                    feature_dim=cfg.feature_dim,
                    dropout_rate=cfg.dropout_rate, num_groups=cfg.num_groups)


def model_meta(config: ml_collections.ConfigDict, image_shape) -> dict:
  """What a checkpoint must match to be restored."""
  model = {k: config.feature_net[k] for k in ARCHITECTURE_FIELDS}
  return {"stage": STAGE, "model": model, "data": config.data.name,
          "image_shape": list(image_shape)}


def make_task(config: ml_collections.ConfigDict) -> loop.Task:
  """The :class:`loop.Task` training the classifier on the data labels."""
  validate(config)
  train_src, eval_src = sources(config)
  model = build_feature_net(config.feature_net)

  def init_params(rng, batch):
    return model.init(rng, batch["image"])["params"]

  def loss_fn(params, batch, rng, step):
    del step
    logits = model.apply({"params": params}, batch["image"], train=True,
                         rngs={"dropout": rng})  # [B, K]
    loss, metrics = classifier_loss(logits, batch["label"])
    return loss, {"accuracy": metrics["accuracy"]}

  def eval_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"])  # [B, K]
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_p, batch["label"][:, None], axis=-1)[:, 0]
    return {"accuracy": (jnp.argmax(logits, -1) == batch["label"]
                         ).astype(jnp.float32),  # [B]
            "loss": nll}  # [B]

  tcfg = config.train
  return loop.Task(
      name=STAGE, init_params=init_params, loss_fn=loss_fn, eval_fn=eval_fn,
      meta=model_meta(config, train_src.image_shape),
      train_batches=Loader(train_src, tcfg.batch_size, config.seed),
      eval_batches=lambda: eval_batches(
          eval_src, tcfg.get("eval_batch_size", tcfg.batch_size),
          config.data.get("eval_examples", None) or None))


def host_params(params):
  """A sharded parameter tree as host numpy arrays (all processes)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, ReferenceStats]:
  """Stage ``train_feature_net``: trains (or resumes) the classifier, then
  caches the reference statistics. Returns {split: ReferenceStats}."""
  state = loop.train(config, workdir, make_task(config))
  step = int(jax.device_get(state.step))
  params = host_params(state.params)
  model = build_feature_net(config.feature_net)
  stats = reference_stats(config, workdir, model, params, step)
  if io.is_writer():
    for split, s in stats.items():
      print(f"[{STAGE}] reference statistics {s.feature_net} {split}: "
            f"{s.num_samples} images", flush=True)
  return stats


def load_feature_net(workdir: str, mesh=None):
  """Restores a trained classifier: (model, host params, config, step).

  ``params`` is the ``'params'`` collection as numpy arrays, ready for
  :func:`mesp_jax.models.feature_net.classifier_features`.
  """
  config = load_config_json(workdir, STAGE)
  mesh = mesh or sharding.make_mesh()
  source = source_from_config(config.data, config.data.get("eval_split", "test"))
  image_shape = source.image_shape
  model = build_feature_net(config.feature_net)
  params, step = loop.restore_params(
      workdir, config,
      lambda r: model.init(r, jnp.zeros((1,) + tuple(image_shape)))["params"],
      model_meta(config, image_shape), mesh)
  return model, host_params(params), config, step
