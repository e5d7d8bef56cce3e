"""The neural gamma-ARVM task for the training loop, and restoring one.

The task trains on the token grids written by stage ``blae_encode``
(``config.inputs.tokens_dir``/tokens_{split}.json) with the cross-entropy of
the histogram head (docs/method.md, section 'Neural gamma-ARVM'); eval reports
bits per token and per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mesp_jax.data import Loader, eval_batches
from mesp_jax.data.tokens import TokenSource, tokens_path
from mesp_jax.models import arvm as arvm_lib
from mesp_jax.models import arvm_loss
from mesp_jax.train import loop

ARCHITECTURE_FIELDS = ("group", "gamma", "num_layers", "d_model",
                       "num_heads", "mlp_ratio", "num_classes", "embed")


def token_sources(config) -> tuple[TokenSource, TokenSource]:
  """The train and eval token sources of ``config.inputs.tokens_dir``.

  Each split's manifest ``tokens_{split}.json`` (memory-mapped shards: the
  loader reads only this process's rows) or else its legacy
  ``tokens_{split}.npz``.
  """
  directory = config.inputs.tokens_dir
  group = config.arvm.group
  train_split = config.tokens.get("train_split", "train")
  eval_split = config.tokens.get("eval_split", "test")
  train = TokenSource(tokens_path(directory, train_split), group)
  evals = TokenSource(tokens_path(directory, eval_split), group)
  return train, evals


def model_meta(config, grid, bits) -> dict:
  arch = {k: config.arvm[k] for k in ARCHITECTURE_FIELDS}
  if config.arvm.get("scan_layers", False):  # a different parameter tree
    arch["scan_layers"] = True
  return {"stage": "arvm", "model": arch, "grid": list(grid), "bits": bits}


def blae_workdir_for(config, source: TokenSource) -> str:
  """The BL-AE of the tokens: ``config.inputs.blae_workdir`` or the tokens'."""
  return config.inputs.get("blae_workdir") or source.blae_workdir


def functions(config: ml_collections.ConfigDict, grid: tuple[int, int],
              bits: int):
  """The ARVM of ``config.arvm`` on a ``grid`` of ``bits``-bit positions and
  its pure functions: ``(model, init_params, loss_fn, eval_fn)`` as
  :class:`loop.Task` takes them (no data needed; the ahead-of-time check
  uses them with abstract batches).

  ``init_params`` returns the parameters boxed with their logical axis names
  (the loop turns those into shardings and unboxes them).
  """
  model = arvm_lib.build_arvm(config.arvm, grid, bits)
  cfg = config.arvm
  p_flip = float(arvm_loss.p_flip(cfg.sigma_s))
  conditional = cfg.num_classes > 0

  def labels_of(batch, rng=None):
    if not conditional:
      return None
    labels = batch["label"]
    if rng is not None and cfg.get("label_drop", 0.0) > 0:
      labels = arvm_loss.drop_labels(rng, labels, cfg.num_classes,
                                    cfg.label_drop)
    return labels

  def init_params(rng, batch):
    return model.init(rng, batch["tokens"], labels_of(batch))

  def loss_fn(params, batch, rng, step):
    del step
    tokens = batch["tokens"]  # [B, h, w, Tp] int32
    logits = model.apply(params, tokens, labels_of(batch, rng))  # [B, T, V]
    return arvm_loss.arvm_loss(logits, tokens, cfg.target, cfg.group, p_flip)

  def eval_fn(params, batch):
    tokens = batch["tokens"]
    b = tokens.shape[0]
    logits = model.apply(params, tokens, labels_of(batch))
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens.reshape(b, -1, 1), axis=-1)[..., 0]
    bpt = jnp.mean(nll, axis=1) / jnp.log(2.0)  # [B]
    return {"bits_per_token": bpt, "bits_per_image": bpt * model.seq_len}

  return model, init_params, loss_fn, eval_fn


def make_task(config: ml_collections.ConfigDict, workdir: str,
              visualize=None) -> loop.Task:
  """The :class:`loop.Task` of the neural ARVM on ``config.inputs.tokens_dir``.

  ``visualize``: optional ``(model, params, step, workdir)`` hook (the stage
  passes one that draws and decodes a sample grid).
  """
  del workdir
  train_src, eval_src = token_sources(config)
  model, init_params, loss_fn, eval_fn = functions(config, train_src.grid,
                                                   train_src.bits)
  hook = None
  if visualize is not None:
    def hook(params, step, workdir_):
      visualize(model, params, step, workdir_)

  return loop.Task(
      name="arvm", init_params=init_params, loss_fn=loss_fn, eval_fn=eval_fn,
      meta=model_meta(config, train_src.grid, train_src.bits),
      train_batches=Loader(train_src, config.train.batch_size, config.seed),
      eval_batches=lambda: eval_batches(
          eval_src, config.train.get("eval_batch_size",
                                     config.train.batch_size),
          config.tokens.get("eval_examples", 0) or None),
      visualize=hook)


def upgrade_config(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """A saved ARVM config in today's names (``arvm.width`` -> ``d_model``,
  ``tokens.dir`` / ``tokens.blae_workdir`` -> ``inputs.*``)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if "width" in config.arvm and "d_model" not in config.arvm:
    arvm = config.arvm.to_dict()
    arvm["d_model"] = arvm.pop("width")
    config.arvm = ml_collections.ConfigDict(arvm)
  if "inputs" not in config:
    config.inputs = ml_collections.ConfigDict(dict(
        tokens_dir=config.tokens.get("dir", ""),
        blae_workdir=config.tokens.get("blae_workdir", "")))
  return config


def load_arvm(workdir: str, mesh=None):
  """Restores a trained ARVM: (model, params, config, step, blae_workdir)."""
  config = upgrade_config(loop.load_run_config(workdir, "arvm"))
  train_src, _ = token_sources(config)
  model = arvm_lib.build_arvm(config.arvm, train_src.grid, train_src.bits)
  example = jnp.asarray(train_src.read(np.arange(1))["tokens"])
  labels = (jnp.zeros((1,), jnp.int32) if config.arvm.num_classes > 0
            else None)
  params, step = loop.restore_params(
      workdir, config, lambda r: model.init(r, example, labels),
      model_meta(config, train_src.grid, train_src.bits), mesh)
  return model, params, config, step, blae_workdir_for(config, train_src)
