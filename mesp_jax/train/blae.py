"""Stages ``blae`` (train the binary latent autoencoder) and ``blae_encode``.

``blae`` trains with the paper's loss, ``mse(dec(z + sigma eps), x) + beta
mean(z^2)`` with ``z = tanh(enc(x))``; sigma may ramp linearly from
``sigma_start`` to ``sigma`` over ``sigma_ramp_steps``. Eval decodes from the
sign bits (``psnr``) and from the noise-free code (``psnr_continuous``) and
reports ``bin_rate`` and per-bit usage.

``blae_encode`` turns whole splits into token grids for the ARVM:
``tokens_{split}.npz`` with ``tokens`` int32 [N, h, w, 1] (one token of C bits
per position, first channel most significant), ``labels``, ``bits``, ``grid``
and the checkpoint it came from.
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
from mesp_jax.config_utils import check_choice, check_positive
from mesp_jax.data import Loader, eval_batches, image_channels, source_from_config
from mesp_jax.data.loader import to_float_images
from mesp_jax.models import bits as bits_lib
from mesp_jax.models.blae import (
    ARCHITECTURE_FIELDS,
    BLAE,
    bin_rate,
    blae_loss,
    build_blae,
    psnr,
)
from mesp_jax.train import loop, sharding


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad field and the allowed values."""
  check_choice(config, "blae.family", ("full_res", "downsample"))
  if config.blae.family == "downsample":
    check_choice(config, "blae.downsample_factor", (1, 2, 4, 8, 16))
  for field in ("blae.width", "blae.bits", "train.batch_size",
                "train.num_steps", "train.learning_rate", "data.image_size"):
    check_positive(config, field)
  for field in ("blae.sigma", "blae.beta", "blae.num_res_blocks"):
    check_positive(config, field, allow_zero=True)
  if config.data.image_size % (config.blae.downsample_factor
                               if config.blae.family == "downsample" else 1):
    raise ValueError(
        f"config.data.image_size={config.data.image_size} must be divisible "
        f"by config.blae.downsample_factor={config.blae.downsample_factor}")


def sources(config):
  d = config.data
  return (source_from_config(d, d.get("train_split", "train")),
          source_from_config(d, d.get("eval_split", "test")))


def sigma_at(cfg, step):
  """Linear ramp from sigma_start to sigma over sigma_ramp_steps."""
  start = cfg.get("sigma_start", cfg.sigma)
  ramp = max(int(cfg.get("sigma_ramp_steps", 0)), 1)
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / ramp, 1.0)
  return start + (cfg.sigma - start) * frac


def _signed(z):
  return jnp.where(z > 0, 1.0, -1.0).astype(z.dtype)




def model_meta(config, image_shape) -> dict:
  """What a checkpoint must match to be restored (not sigma/beta)."""
  model = {k: config.blae[k] for k in ARCHITECTURE_FIELDS}
  return {"stage": "blae", "model": model,
          "data": config.data.name, "image_shape": list(image_shape)}


def make_loss_fn(model: BLAE, cfg: ml_collections.ConfigDict):
  """The BL-AE training loss ``(params, batch, rng, step) -> (loss, metrics)``."""

  def loss_fn(params, batch, rng, step):
    x = batch["image"]  # [B, H, W, C] in [-1, 1]
    z = model.apply(params, x, method=BLAE.encode_continuous)  # [B, h, w, C]
    sigma = sigma_at(cfg, step)
    recon = model.apply(params, z + sigma * jax.random.normal(rng, z.shape),
                        method=BLAE.decode)
    loss, mse, kl = blae_loss(recon, z, x, cfg.beta)
    return loss, {"mse": mse, "kl": kl, "bin_rate": bin_rate(z),
                  "sigma": sigma}

  return loss_fn


def make_task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
  validate(config)
  train_src, eval_src = sources(config)
  image_shape = train_src.image_shape
  model = build_blae(config.blae, image_channels=image_shape[-1])
  cfg = config.blae

  def init_params(rng, batch):
    x = batch["image"]
    code = jnp.zeros((x.shape[0],) + model.latent_shape(image_shape))
    return model.init(rng, x, code)

  loss_fn = make_loss_fn(model, cfg)

  def eval_fn(params, batch):
    x = batch["image"]
    z = model.apply(params, x, method=BLAE.encode_continuous)
    rec_sign = model.apply(params, _signed(z), method=BLAE.decode)
    rec_cont = model.apply(params, z, method=BLAE.decode)
    b = x.shape[0]
    return {
        "psnr": psnr(rec_sign, x),  # [B], decoded from the sign bits
        "psnr_continuous": psnr(rec_cont, x),  # [B], from tanh(enc(x))
        "mse": jnp.mean(jnp.square(jnp.clip(rec_sign, -1, 1) - x),
                        axis=(1, 2, 3)),
        "bin_rate": jnp.mean((jnp.abs(z) >= 0.9).reshape(b, -1), axis=1),
        "bit_usage": jnp.mean((z > 0).reshape(b, -1, z.shape[-1]), axis=1),
    }

  def summarize_eval(m):
    usage = np.asarray(m["bit_usage"])
    dead = (usage < 0.01) | (usage > 0.99)
    return {"dead_bits": int(dead.sum()), "bit_usage_min": float(usage.min()),
            "bit_usage_max": float(usage.max()),
            "psnr_gap": float(m["psnr_continuous"] - m["psnr"])}

  vis_images = to_float_images(
      eval_src.read(np.arange(min(16, len(eval_src))))["image"])

  @jax.jit
  def reconstruct(params, x):
    z = model.apply(params, x, method=BLAE.encode_continuous)
    return (jnp.clip(model.apply(params, _signed(z), method=BLAE.decode), -1,
                     1),
            jnp.clip(model.apply(params, z, method=BLAE.decode), -1, 1))

  def visualize(params, step, workdir_):
    rec_sign, rec_cont = sharding.to_host(reconstruct(params, vis_images))
    rows = np.concatenate([np.asarray(vis_images), rec_sign, rec_cont])
    io.save_grid(os.path.join(workdir_, "recon_latest.png"), rows, ncol=16)
    io.save_grid(os.path.join(workdir_, f"recon_{step:07d}.png"), rows,
                 ncol=16)

  dcfg = config.data
  return loop.Task(
      name="blae", init_params=init_params, loss_fn=loss_fn, eval_fn=eval_fn,
      meta=model_meta(config, image_shape),
      train_batches=Loader(train_src, config.train.batch_size, config.seed),
      eval_batches=lambda: eval_batches(
          eval_src, config.train.get("eval_batch_size",
                                     config.train.batch_size),
          dcfg.get("eval_examples", None) or None),
      summarize_eval=summarize_eval, visualize=visualize)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Stage ``blae``: trains (or resumes) the BL-AE in ``workdir``."""
  return loop.train(config, workdir, make_task(config, workdir))


# --------------------------------------------------------------------------
# Loading a trained BL-AE and encoding splits.
# --------------------------------------------------------------------------
def load_config_json(workdir: str, name: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, f"{name}_config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir!r} is not a trained {name} workdir. Train "
        f"it first (stage '{name}') or point the config at the right folder.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_blae(workdir: str, mesh=None):
  """Restores a trained BL-AE: returns (model, params, config, step)."""
  config = load_config_json(workdir, "blae")
  mesh = mesh or sharding.make_mesh()
  image_shape = (config.data.image_size, config.data.image_size,
                 image_channels(config.data.name))
  model = build_blae(config.blae, image_channels=image_shape[-1])

  def init_params(r):
    x = jnp.zeros((1,) + image_shape)
    return model.init(r, x, jnp.zeros((1,) + model.latent_shape(image_shape)))

  params, step = loop.restore_params(workdir, config, init_params,
                                     model_meta(config, image_shape), mesh)
  return model, params, config, step


def encode_split(model, params, source, batch_size: int, mesh
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Encodes a whole source: tokens int32 [N, h, w, 1] and labels [N]."""
  encode = jax.jit(lambda p, x: bits_lib.pack(
      model.apply(p, x, method=BLAE.encode_continuous), model.bits))
  tokens, labels = [], []
  for batch in eval_batches(source, batch_size):
    mask = batch.pop("mask")
    out = encode(params, sharding.shard_batch({"image": batch["image"]},
                                              mesh)["image"])
    out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
    mask = np.asarray(multihost_utils.process_allgather(mask, tiled=True))
    lab = np.asarray(multihost_utils.process_allgather(batch["label"],
                                                       tiled=True))
    tokens.append(out[mask])
    labels.append(lab[mask])
  return np.concatenate(tokens), np.concatenate(labels)


def encode_stage(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage ``blae_encode``: writes ``tokens_{split}.npz`` into ``workdir``."""
  blae_dir = config.encode.get("blae_workdir") or workdir
  mesh = loop.make_mesh_from_config(config)
  model, params, blae_config, step = load_blae(blae_dir, mesh)
  dp = sharding.data_parallel_size(mesh)
  batch_size = int(config.encode.get("batch_size", 256))
  batch_size = max(dp, batch_size // dp * dp)
  written = {}
  for split in config.encode.splits:
    source = source_from_config(blae_config.data, split)
    tokens, labels = encode_split(model, params, source, batch_size, mesh)
    path = os.path.join(workdir, f"tokens_{split}.npz")
    io.save_npz(path, tokens=tokens, labels=labels,
                bits=np.int32(model.bits), grid=np.asarray(tokens.shape[1:3]),
                checkpoint_step=np.int32(step),
                blae_workdir=np.asarray(os.path.abspath(blae_dir)),
                dataset=np.asarray(blae_config.data.name), split=split)
    print(f"[blae_encode] {split}: {tokens.shape[0]} images -> tokens "
          f"{tokens.shape[1:]} of {model.bits} bits -> {path}", flush=True)
    written[split] = path
  return written
