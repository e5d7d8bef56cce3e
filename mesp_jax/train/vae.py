"""Training task of the Gaussian VAE (:mod:`mesp_jax.models.vae`).

:func:`vae_task` is the :class:`loop.Task` the MESP study
(:mod:`mesp_jax.experiments.mesp_overlap`) trains its VAEs with, at a fixed
KL weight or, for ``kl_weight == ELBO``, on the calibrated ELBO
(:func:`mesp_jax.models.vae.calibrated_elbo_loss`: no free KL weight).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mesp_jax.base.image import psnr
from mesp_jax.data import eval_batches, train_eval_sources
from mesp_jax.data.loader import Loader
from mesp_jax.models.blae import ARCHITECTURE_FIELDS
from mesp_jax.models.vae import (
  GaussianVAE,
  build_vae,
  calibrated_elbo_loss,
  gaussian_kl,
  vae_loss,
)
from mesp_jax.train import loop

ELBO = "elbo"  # the KL "weight" of the VAE trained on its calibrated ELBO


def format_weight(w: float | str) -> str:
  """1e-3 -> '1e-3', 3e-2 -> '3e-2', 0 -> '0', 'elbo' -> 'elbo'."""
  if w == ELBO:
    return ELBO
  if w == 0:
    return "0"
  mantissa, exponent = f"{w:.0e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def vae_task(config: ml_collections.ConfigDict, kl_weight: float | str
             ) -> loop.Task:
  """The :class:`loop.Task` of a Gaussian VAE.

  ``kl_weight``: a float for :func:`vae_loss`, or ``"elbo"`` for
  :func:`calibrated_elbo_loss`.
  """
  train_src, eval_src = train_eval_sources(config.data)
  image_shape = train_src.image_shape
  model = build_vae(config.model, image_channels=image_shape[-1])
  latent = model.latent_shape(image_shape)

  def init_params(rng, batch):
    x = batch["image"]
    return model.init(rng, x, jnp.zeros((x.shape[0],) + latent))

  def loss_fn(params, batch, rng, step):
    del step
    x = batch["image"]  # [B, H, W, C] in [-1, 1]
    eps = jax.random.normal(rng, (x.shape[0],) + latent)
    recon, mean, logvar = model.apply(params, x, eps)
    if kl_weight == ELBO:
      loss, mse, kl = calibrated_elbo_loss(recon, x, mean, logvar)
    else:
      loss, mse, kl = vae_loss(recon, x, mean, logvar, kl_weight)
    return loss, {"mse": mse, "kl": kl}

  def eval_fn(params, batch):
    x = batch["image"]
    mean, logvar = model.apply(params, x, method=GaussianVAE.encode)
    rec = model.apply(params, mean, method=GaussianVAE.decode)
    b = x.shape[0]
    return {"psnr": psnr(rec, x),  # [B], decoded from the posterior mean
            "kl": jnp.mean(gaussian_kl(mean, logvar).reshape(b, -1), 1),
            "mse": jnp.mean(jnp.square(rec - x), axis=(1, 2, 3))}

  meta = {"stage": "vae", "model": {k: config.model[k]
                                    for k in ARCHITECTURE_FIELDS},
          "kl_weight": kl_weight if kl_weight == ELBO else float(kl_weight),
          "data": config.data.name,
          "image_shape": list(image_shape)}
  tcfg = config.train
  return loop.Task(
      name="vae", init_params=init_params, loss_fn=loss_fn, eval_fn=eval_fn,
      meta=meta, train_batches=Loader(train_src, tcfg.batch_size, config.seed),
      eval_batches=lambda: eval_batches(
          eval_src, tcfg.get("eval_batch_size", tcfg.batch_size),
          config.data.get("eval_examples", None) or None))
