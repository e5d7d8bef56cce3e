"""Stages ``arvm`` (train the neural gamma-ARVM) and ``sample``.

``arvm`` trains on the token grids written by ``blae_encode``
(``config.tokens.dir``/tokens_{split}.npz); the BL-AE those tokens came from
decodes the periodic sample grids. ``sample`` restores a trained ARVM, draws
``config.sample.num_samples`` token grids with the jitted KV-cache sampler,
decodes them with the BL-AE and writes ``samples.png`` and ``samples.npz``
(``tokens``, ``images`` in [-1, 1], ``labels``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mesp_jax import io
from mesp_jax.config_utils import check_choice, check_positive
from mesp_jax.data import Loader, eval_batches
from mesp_jax.data.tokens import TokenSource
from mesp_jax.models import arvm as arvm_lib
from mesp_jax.models.blae import decode_tokens
from mesp_jax.sample import decode
from mesp_jax.train import blae as blae_stage
from mesp_jax.train import loop, sharding

ARCHITECTURE_FIELDS = ("group", "gamma", "num_layers", "width", "num_heads",
                       "mlp_ratio", "num_classes", "embed")


def validate(config: ml_collections.ConfigDict) -> None:
  check_choice(config, "arvm.target", arvm_lib.TARGETS)
  check_positive(config, "arvm.sigma_s")
  check_positive(config, "train.batch_size")
  check_positive(config, "train.num_steps")
  if not 0.0 <= config.arvm.get("label_drop", 0.0) < 1.0:
    raise ValueError("config.arvm.label_drop must be in [0, 1)")


def token_sources(config) -> tuple[TokenSource, TokenSource]:
  directory = config.tokens.dir
  group = config.arvm.group
  train_split = config.tokens.get("train_split", "train")
  eval_split = config.tokens.get("eval_split", "test")
  train = TokenSource(os.path.join(directory, f"tokens_{train_split}.npz"),
                      group)
  evals = TokenSource(os.path.join(directory, f"tokens_{eval_split}.npz"),
                      group)
  return train, evals


def model_meta(config, grid, bits) -> dict:
  arch = {k: config.arvm[k] for k in ARCHITECTURE_FIELDS}
  return {"stage": "arvm", "model": arch, "grid": list(grid), "bits": bits}


def blae_workdir_for(config, source: TokenSource) -> str:
  return config.tokens.get("blae_workdir") or source.blae_workdir


def make_task(config: ml_collections.ConfigDict, workdir: str,
              mesh=None) -> loop.Task:
  validate(config)
  train_src, eval_src = token_sources(config)
  model = arvm_lib.build_arvm(config.arvm, train_src.grid, train_src.bits)
  cfg = config.arvm
  p_flip = float(arvm_lib.p_flip(cfg.sigma_s))
  conditional = cfg.num_classes > 0

  def labels_of(batch, rng=None):
    if not conditional:
      return None
    labels = batch["label"]
    if rng is not None and cfg.get("label_drop", 0.0) > 0:
      labels = arvm_lib.drop_labels(rng, labels, cfg.num_classes,
                                    cfg.label_drop)
    return labels

  def init_params(rng, batch):
    return model.init(rng, batch["tokens"], labels_of(batch))

  def loss_fn(params, batch, rng, step):
    tokens = batch["tokens"]  # [B, h, w, Tp] int32
    logits = model.apply(params, tokens, labels_of(batch, rng))  # [B, T, V]
    return arvm_lib.arvm_loss(logits, tokens, cfg.target, cfg.group, p_flip)

  def eval_fn(params, batch):
    tokens = batch["tokens"]
    b = tokens.shape[0]
    logits = model.apply(params, tokens, labels_of(batch))
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens.reshape(b, -1, 1), axis=-1)[..., 0]
    bpt = jnp.mean(nll, axis=1) / jnp.log(2.0)  # [B]
    return {"bits_per_token": bpt, "bits_per_image": bpt * model.seq_len}

  blae_dir = blae_workdir_for(config, train_src)
  vis = config.get("sample", ml_collections.ConfigDict())
  blae = {}

  def visualize(params, step, workdir_):
    if not blae:
      model_b, params_b, _, _ = blae_stage.load_blae(blae_dir, mesh)
      blae.update(model=model_b, params=params_b)
    n = 16
    labels = (np.arange(n) % cfg.num_classes if conditional else None)
    tokens = decode.sample_tokens(
        model, params, jax.random.fold_in(jax.random.key(config.seed), step),
        n, labels, temperature=vis.get("temperature", 1.0),
        top_k=vis.get("top_k", 0), top_p=vis.get("top_p", 1.0),
        cfg_scale=vis.get("cfg_scale", 0.0), cache="ring")
    images = decode_tokens(blae["model"], blae["params"], tokens, cfg.group)
    io.save_grid(os.path.join(workdir_, "samples_latest.png"),
                 np.asarray(images), ncol=8)

  return loop.Task(
      name="arvm", init_params=init_params, loss_fn=loss_fn, eval_fn=eval_fn,
      meta=model_meta(config, train_src.grid, train_src.bits),
      train_batches=Loader(train_src, config.train.batch_size, config.seed),
      eval_batches=lambda: eval_batches(
          eval_src, config.train.get("eval_batch_size",
                                     config.train.batch_size),
          config.tokens.get("eval_examples", 0) or None),
      visualize=visualize if blae_dir else None)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Stage ``arvm``: trains (or resumes) the neural gamma-ARVM."""
  mesh = loop.make_mesh_from_config(config)
  return loop.train(config, workdir, make_task(config, workdir, mesh), mesh)


def load_arvm(workdir: str, mesh=None):
  """Restores a trained ARVM: (model, params, config, step, blae_workdir)."""
  config = blae_stage.load_config_json(workdir, "arvm")
  train_src, _ = token_sources(config)
  model = arvm_lib.build_arvm(config.arvm, train_src.grid, train_src.bits)
  example = jnp.asarray(train_src.read(np.arange(1))["tokens"])
  labels = (jnp.zeros((1,), jnp.int32) if config.arvm.num_classes > 0
            else None)
  params, step = loop.restore_params(
      workdir, config, lambda r: model.init(r, example, labels),
      model_meta(config, train_src.grid, train_src.bits), mesh)
  return model, params, config, step, blae_workdir_for(config, train_src)


def sample_stage(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage ``sample``: samples.png + samples.npz from a trained ARVM."""
  scfg = config.sample
  check_choice(config, "sample.cache", decode.CACHE_KINDS)
  mesh = loop.make_mesh_from_config(config)
  arvm_dir = scfg.get("arvm_workdir") or workdir
  model, params, arvm_config, step, blae_dir = load_arvm(arvm_dir, mesh)
  blae_dir = scfg.get("blae_workdir") or blae_dir
  model_b, params_b, _, _ = blae_stage.load_blae(blae_dir, mesh)
  dp = sharding.data_parallel_size(mesh)
  batch = int(scfg.get("batch_size", 64))
  if batch % dp:
    raise ValueError(f"config.sample.batch_size={batch} must be divisible by "
                     f"the data-parallel size {dp}")
  num = int(scfg.num_samples)
  rng = jax.random.key(int(scfg.get("seed", 0)))
  conditional = model.num_classes > 0
  all_tokens, all_images, all_labels = [], [], []
  for start in range(0, num, batch):
    labels = ((np.arange(start, start + batch) % model.num_classes)
              .astype(np.int32) if conditional else None)
    tokens = decode.sample_tokens(
        model, params, jax.random.fold_in(rng, start // batch), batch, labels,
        temperature=scfg.get("temperature", 1.0), top_k=scfg.get("top_k", 0),
        top_p=scfg.get("top_p", 1.0), cfg_scale=scfg.get("cfg_scale", 0.0),
        cache=scfg.get("cache", "ring"), mesh=mesh)
    images = decode_tokens(model_b, params_b, tokens, model.group)
    all_tokens.append(np.asarray(jax.device_get(tokens)))
    all_images.append(np.asarray(jax.device_get(images)))
    all_labels.append(labels if conditional else np.full(batch, -1, np.int32))
    print(f"[sample] {min(start + batch, num)}/{num} samples", flush=True)
  tokens = np.concatenate(all_tokens)[:num]
  images = np.concatenate(all_images)[:num]
  labels = np.concatenate(all_labels)[:num]
  os.makedirs(workdir, exist_ok=True)
  npz = os.path.join(workdir, "samples.npz")
  io.save_npz(npz, tokens=tokens, images=images, labels=labels,
              group=np.int32(model.group), arvm_step=np.int32(step),
              gamma=np.asarray(str(model.gamma)))
  png = os.path.join(workdir, "samples.png")
  io.save_grid(png, images[:64], ncol=8)
  print(f"[sample] wrote {png} and {npz}", flush=True)
  return {"png": png, "npz": npz, "num_samples": num}
