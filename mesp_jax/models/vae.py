"""Gaussian VAE with the BL-AE's encoder/decoder families (MESP baseline).

The encoder is :class:`mesp_jax.models.blae.Encoder` with ``2 * bits`` output
channels: the first ``bits`` are the posterior mean, the last ``bits`` the
log-variance of the diagonal Gaussian ``q(z|x) = N(mean, diag(exp(logvar)))``.
The decoder is :class:`mesp_jax.models.blae.Decoder`, so a VAE and a BL-AE of
the same config differ only in the posterior (learned variances and a
standard-normal KL versus a bounded mean with fixed noise ``sigma``).

Loss (:func:`vae_loss`), mean-normalised like
:func:`mesp_jax.models.blae.blae_loss`::

  loss = mean_pixels (dec(z) - x)^2 + kl_weight * mean_latent KL_d,
  KL_d = 0.5 * (mean_d^2 + var_d - 1 - log var_d),   z = mean + std * eps.

Both terms are averages, not sums: the reconstruction term over the
``H * W * C`` pixels, the KL over the ``D = h * w * bits`` latent entries
(nats per latent dimension). Two consequences:

* the BL-AE's ``beta * mean(z^2)`` is ``2 * beta * mean_d KL_d`` up to a
  constant (the KL of ``N(z, sigma^2)`` to ``N(0, 1)`` is
  ``0.5 * (z^2 + sigma^2 - 1 - log sigma^2)``), so ``kl_weight = 2 * beta``
  puts the same pressure on the means;
* with a Gaussian likelihood of variance ``s^2`` on the [-1, 1] pixel scale
  the negative ELBO per pixel is ``mse / (2 s^2) + (D / P) * mean KL`` plus
  a constant, so ``kl_weight = 2 s^2 D / P`` is the proper ELBO (e.g.
  ``s = 0.1`` and ``D = P / 2`` give ``kl_weight = 0.01``); smaller weights
  are a beta-VAE with beta < 1.

:func:`calibrated_elbo_loss` removes that free choice of ``s``: it is the
negative ELBO per pixel with ``s^2`` at its maximum-likelihood value, the
batch mean squared error (a calibrated Gaussian decoder), so the VAE has no
KL weight to pick.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mesp_jax.models.blae import Autoencoder, architecture_kwargs, encoder_decoder


class GaussianVAE(Autoencoder):
  """VAE with a diagonal Gaussian posterior and a N(0, I) prior.

  Fields: :class:`mesp_jax.models.blae.Autoencoder`; ``bits`` is the number
  of latent channels per position (the latent has ``h * w * bits``
  dimensions).
  """

  def setup(self):
    self.encoder, self.decoder = encoder_decoder(self, 2 * self.bits)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, H, W, C] in [-1, 1] -> (mean, logvar), each [B, h, w, bits]."""
    h = self.encoder(x)  # [B, h, w, 2 * bits]
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, logvar

  def decode(self, z: jax.Array) -> jax.Array:
    """[B, h, w, bits] -> image [B, H, W, C] (unbounded)."""
    return self.decoder(z)

  def __call__(self, x: jax.Array, eps: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training forward with standard-normal ``eps`` shaped like the code.

    Returns (reconstruction of ``mean + exp(logvar / 2) * eps``, mean,
    logvar).
    """
    mean, logvar = self.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * eps  # reparameterised sample
    return self.decode(z), mean, logvar


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """Elementwise ``KL(N(mean, exp(logvar)) || N(0, 1))`` in nats."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def vae_loss(recon: jax.Array, x: jax.Array, mean: jax.Array,
             logvar: jax.Array, kl_weight: float
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``mean (recon - x)^2 + kl_weight * mean KL``; returns (loss, mse, kl).

  ``mse`` averages over every pixel of the batch, ``kl`` over every latent
  entry of the batch (see the module docstring for the normalisation).
  """
  mse = jnp.mean(jnp.square(recon - x))
  kl = jnp.mean(gaussian_kl(mean, logvar))
  return mse + kl_weight * kl, mse, kl


def calibrated_elbo_loss(recon: jax.Array, x: jax.Array, mean: jax.Array,
                         logvar: jax.Array
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Negative ELBO per pixel with the maximum-likelihood pixel variance.

  With a Gaussian likelihood ``N(x | recon, s^2)`` per pixel, the negative
  ELBO of the batch divided by its ``P`` pixels is
  ``0.5 log(2 pi s^2) + mse / (2 s^2) + (D / P) mean_d KL_d``; it is
  smallest at ``s^2 = mse``, where it is
  ``0.5 log(2 pi e mse) + (D / P) mean_d KL_d`` (``D``: latent entries of
  the batch). Its gradient is ``1 / (2 mse)`` times that of
  :func:`vae_loss` with ``kl_weight = 2 mse D / P``, both recomputed at
  every step.

  Returns (loss, mse, kl) as :func:`vae_loss`.
  """
  mse = jnp.mean(jnp.square(recon - x))
  kl = jnp.mean(gaussian_kl(mean, logvar))
  latent_per_pixel = mean.size / x.size  # D / P
  nll = 0.5 * jnp.log(2.0 * jnp.pi * jnp.e * jnp.maximum(mse, 1e-12))
  return nll + latent_per_pixel * kl, mse, kl


def build_vae(cfg, image_channels: int) -> GaussianVAE:
  """GaussianVAE from a BL-AE-style ``config.model`` (family, width, ...)."""
  return GaussianVAE(**architecture_kwargs(cfg, "model"),
                     image_channels=image_channels)
