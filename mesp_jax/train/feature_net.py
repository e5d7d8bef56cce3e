"""The classifier behind the offline Frechet distance: its task and restore.

No FID Inception weights can be fetched offline, so the project trains its
own classifier (:class:`mesp_jax.models.feature_net.FeatureNet`) on the data
set's labels and compares generated and real images in its penultimate
feature space (:mod:`mesp_jax.eval.reference` caches the statistics of the
real splits). The distance is reported as ``fd_{dataset}_classifier`` (see
:func:`mesp_jax.models.feature_net.feature_net_name`), never as "FID".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mesp_jax.base import sharding
from mesp_jax.data import source_from_config, train_eval_sources
from mesp_jax.data.loader import Loader, eval_batches
from mesp_jax.models.feature_net import (
  FeatureNet,
  classifier_loss,
)
from mesp_jax.train import loop

STAGE = "feature_net"  # task name: metrics, config json, checkpoint meta
ARCHITECTURE_FIELDS = ("num_classes", "widths", "feature_dim", "num_groups")


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
  train_src, eval_src = train_eval_sources(config.data)
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


def load_feature_net(workdir: str, mesh=None):
  """Restores a trained classifier: (model, host params, config, step).

  ``params`` is the ``'params'`` collection as numpy arrays, ready for
  :func:`mesp_jax.models.feature_net.classifier_features`.
  """
  config = loop.load_run_config(workdir, STAGE)
  mesh = mesh or sharding.make_mesh()
  source = source_from_config(config.data, config.data.get("eval_split", "test"))
  image_shape = source.image_shape
  model = build_feature_net(config.feature_net)
  params, step = loop.restore_params(
      workdir, config,
      lambda r: model.init(r, jnp.zeros((1,) + tuple(image_shape)))["params"],
      model_meta(config, image_shape), mesh)
  return model, sharding.to_host(params), config, step
