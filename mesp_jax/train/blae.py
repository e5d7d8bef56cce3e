"""The BL-AE task for the training loop, restoring a trained BL-AE, encoding.

The task trains with the paper's loss (docs/method.md, section 'BL-AE'),
``mse(dec(z + sigma eps), x) + beta mean(z^2)`` with ``z = tanh(enc(x))``;
sigma may ramp linearly from ``sigma_start`` to ``sigma`` over
``sigma_ramp_steps``. Eval decodes from the
sign bits (``psnr``) and from the noise-free code (``psnr_continuous``) and
reports ``bin_rate`` and per-bit usage.

:func:`encode_split` turns a whole split into token grids for the ARVM
(one token of C bits per position, first channel most significant).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mesp_jax.base import bits as bits_lib
from mesp_jax.base import io, sharding
from mesp_jax.base.image import psnr, to_float_images
from mesp_jax.data import (
  data_channels,
  eval_batches,
  train_eval_sources,
  train_loader,
)
from mesp_jax.models.blae import (
  BLAE,
  architecture_meta,
  bin_rate,
  blae_loss,
  build_blae,
)
from mesp_jax.train import loop


def sigma_at(cfg, step):
  """Linear ramp from sigma_start to sigma over sigma_ramp_steps."""
  start = cfg.get("sigma_start", cfg.sigma)
  ramp = max(int(cfg.get("sigma_ramp_steps", 0)), 1)
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / ramp, 1.0)
  return start + (cfg.sigma - start) * frac


def _signed(z):
  return jnp.where(z > 0, 1.0, -1.0).astype(z.dtype)




def model_meta(config, image_shape) -> dict:
  """What a checkpoint must match to be restored (not sigma/beta, conv or
  dtype). Architecture fields newer than a saved ``config.blae`` get their
  defaults (:func:`architecture_meta`), the meta its checkpoints hold after
  :func:`mesp_jax.train.checkpoint.upgrade_meta`."""
  model = architecture_meta(config.blae)
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


def functions(config: ml_collections.ConfigDict, image_shape):
  """The BL-AE of ``config.blae`` for images of ``image_shape`` (H, W, C) and
  its pure functions ``(model, init_params, loss_fn, eval_fn)`` as
  :class:`loop.Task` takes them (no data needed)."""
  model = build_blae(config.blae, image_channels=image_shape[-1])
  cfg = config.blae

  def init_params(rng, batch):
    x = batch["image"]
    code = jnp.zeros((x.shape[0],) + model.latent_shape(image_shape))
    return model.init(rng, x, code)

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

  return model, init_params, make_loss_fn(model, cfg), eval_fn


def make_task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
  train_src, eval_src = train_eval_sources(config.data)
  image_shape = train_src.image_shape
  model, init_params, loss_fn, eval_fn = functions(config, image_shape)

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
      train_batches=train_loader(dcfg, train_src, config.train.batch_size,
                                 config.seed),
      eval_batches=lambda: eval_batches(
          eval_src, config.train.get("eval_batch_size",
                                     config.train.batch_size),
          dcfg.get("eval_examples", None) or None),
      summarize_eval=summarize_eval, visualize=visualize)


# --------------------------------------------------------------------------
# Loading a trained BL-AE and encoding splits.
# --------------------------------------------------------------------------
def load_blae(workdir: str, mesh=None):
  """Restores a trained BL-AE: returns (model, params, config, step)."""
  config = loop.load_run_config(workdir, "blae")
  mesh = mesh or sharding.make_mesh()
  image_shape = (config.data.image_size, config.data.image_size,
                 data_channels(config.data))
  model = build_blae(config.blae, image_channels=image_shape[-1])

  def init_params(r):
    x = jnp.zeros((1,) + image_shape)
    return model.init(r, x, jnp.zeros((1,) + model.latent_shape(image_shape)))

  params, step = loop.restore_params(workdir, config, init_params,
                                     model_meta(config, image_shape), mesh)
  return model, params, config, step


def encode_split(model, params, source, batch_size: int, mesh
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Encodes a whole source: tokens int32 [N, h, w, 1] and labels [N].

  On a mesh of all processes' devices every process reads its rows of each
  global batch and gets all N rows back. On a mesh of this process's own
  devices (``sharding.local_mesh()``, ``params`` placed on it) the process
  encodes all of ``source`` by itself, with no cross-process collectives.
  """
  encode = jax.jit(lambda p, x: bits_lib.pack(
      model.apply(p, x, method=BLAE.encode_continuous), model.bits))
  local = all(d.process_index == jax.process_index()
              for d in mesh.devices.flat)
  batches = (eval_batches(source, batch_size, process_index=0,
                          process_count=1) if local
             else eval_batches(source, batch_size))
  tokens, labels = [], []
  for batch in batches:
    mask = batch.pop("mask")
    if local:
      x = jax.device_put(batch["image"], sharding.batch_sharding(mesh))
      out = np.asarray(jax.device_get(encode(params, x)))  # [B, h, w, 1]
      lab = batch["label"]
    else:
      out = sharding.to_host(encode(params, sharding.shard_batch(
          {"image": batch["image"]}, mesh)["image"]))  # [B, h, w, 1]
      mask = sharding.gather_local(mask)
      lab = sharding.gather_local(batch["label"])
    tokens.append(out[mask])
    labels.append(lab[mask])
  return np.concatenate(tokens), np.concatenate(labels)
