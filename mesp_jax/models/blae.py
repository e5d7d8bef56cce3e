"""Binary latent autoencoder (BL-AE).

Training forward (docs/method.md, section 'BL-AE'): ``z = tanh(enc(x))``,
the decoder sees ``z + sigma * eps`` and the loss is ``mse(dec(z + sigma
eps), x) + beta * mean(z^2)``. Because ``|z| <= 1`` the noise can only be
beaten by pushing codes to +-1, so at inference ``bits = sign(z)`` loses
little. No straight-through estimator is involved.

Two encoder/decoder families:

* ``full_res`` (the authors' design): a k x k conv stem, residual blocks of
  1x1 convolutions, a 1x1 conv to C bits; one latent position per pixel.
* ``downsample``: a 3x3 stem, ``log2(f)`` stages of [residual 3x3 block,
  stride-2 conv], residual blocks at the bottom, 1x1 conv to C bits; the
  decoder mirrors it with nearest-neighbour upsampling.

Every convolution is :class:`mesp_jax.models.conv.Conv` with the model's
``conv`` implementation ('xla', 'im2col' or 'auto'); all share nn.Conv's
parameters, so the choice is not part of a checkpoint's architecture.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mesp_jax.base import bits as bits_lib
from mesp_jax.models.conv import CONV_CHOICES, Conv

FAMILIES = ("full_res", "downsample")


class ResBlock(nn.Module):
  """x + conv(act(conv(act(x)))) with a configurable kernel size."""
  width: int
  kernel: int = 1
  conv: str = "xla"

  @nn.compact
  def __call__(self, x):
    k = (self.kernel, self.kernel)
    h = Conv(self.width, k, name="conv1", impl=self.conv)(nn.silu(x))
    h = Conv(self.width, k, name="conv2", kernel_init=nn.initializers.zeros,
             impl=self.conv)(nn.silu(h))
    return x + h


def _stage_widths(width: int, num_down: int, mult: Sequence[int]) -> list[int]:
  mult = list(mult) if mult else [1]
  return [width * mult[min(i, len(mult) - 1)] for i in range(num_down + 1)]


class Encoder(nn.Module):
  """[B, H, W, C_img] in [-1, 1] -> pre-tanh code [B, H/f, W/f, bits]."""
  family: str
  width: int
  bits: int
  num_res_blocks: int
  stem_kernel: int = 7
  downsample_factor: int = 1
  channel_mult: Sequence[int] = (1,)
  conv: str = "xla"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(Conv, impl=self.conv)
    res = functools.partial(ResBlock, conv=self.conv)
    if self.family == "full_res":
      k = (self.stem_kernel, self.stem_kernel)
      h = conv(self.width, k, name="stem")(x)
      for i in range(self.num_res_blocks):
        h = res(self.width, 1, name=f"res{i}")(h)
    else:
      num_down = int(math.log2(self.downsample_factor))
      widths = _stage_widths(self.width, num_down, self.channel_mult)
      h = conv(widths[0], (3, 3), name="stem")(x)
      for s in range(num_down):
        h = res(widths[s], 3, name=f"down{s}_res")(h)
        h = conv(widths[s + 1], (4, 4), strides=(2, 2),
                 name=f"down{s}_conv")(nn.silu(h))
      for i in range(self.num_res_blocks):
        h = res(widths[-1], 3, name=f"mid_res{i}")(h)
    return conv(self.bits, (1, 1), name="to_bits")(nn.silu(h))


class Decoder(nn.Module):
  """Code [B, h, w, bits] -> image [B, h*f, w*f, C_img] (unbounded)."""
  family: str
  width: int
  image_channels: int
  num_res_blocks: int
  stem_kernel: int = 7
  downsample_factor: int = 1
  channel_mult: Sequence[int] = (1,)
  conv: str = "xla"

  @nn.compact
  def __call__(self, z):
    conv = functools.partial(Conv, impl=self.conv)
    res = functools.partial(ResBlock, conv=self.conv)
    if self.family == "full_res":
      h = conv(self.width, (1, 1), name="from_bits")(z)
      for i in range(self.num_res_blocks):
        h = res(self.width, 1, name=f"res{i}")(h)
      k = (self.stem_kernel, self.stem_kernel)
      return conv(self.image_channels, k, name="out")(nn.silu(h))
    num_down = int(math.log2(self.downsample_factor))
    widths = _stage_widths(self.width, num_down, self.channel_mult)
    h = conv(widths[-1], (3, 3), name="from_bits")(z)
    for i in range(self.num_res_blocks):
      h = res(widths[-1], 3, name=f"mid_res{i}")(h)
    for s in reversed(range(num_down)):
      b, hh, ww, c = h.shape
      h = jax.image.resize(h, (b, hh * 2, ww * 2, c), "nearest")
      h = conv(widths[s], (3, 3), name=f"up{s}_conv")(nn.silu(h))
      h = res(widths[s], 3, name=f"up{s}_res")(h)
    return conv(self.image_channels, (3, 3), name="out")(nn.silu(h))


def encoder_decoder(module, code_channels: int) -> tuple[Encoder, Decoder]:
  """The encoder (to ``code_channels``) and decoder of a BLAE-like module.

  ``module`` carries the BLAE architecture fields (family, width, bits, ...);
  the Gaussian VAE reuses this with ``code_channels = 2 * bits``.
  """
  common = dict(family=module.family, width=module.width,
                num_res_blocks=module.num_res_blocks,
                stem_kernel=module.stem_kernel,
                downsample_factor=module.downsample_factor,
                channel_mult=tuple(module.channel_mult), conv=module.conv)
  return (Encoder(bits=code_channels, **common),
          Decoder(image_channels=module.image_channels, **common))


# The fields that define an autoencoder's parameters (a checkpoint's "model").
# ``conv`` is not one of them: every implementation has the same parameters.
ARCHITECTURE_FIELDS = ("family", "width", "bits", "num_res_blocks",
                       "stem_kernel", "downsample_factor", "channel_mult")


class Autoencoder(nn.Module):
  """Architecture fields and latent shape of BLAE and the Gaussian VAE.

  Attributes:
    family: 'full_res' or 'downsample'.
    width: channel width (base width for 'downsample').
    bits: latent channels C per position (bits for the BL-AE).
    num_res_blocks: residual blocks in encoder and decoder.
    stem_kernel: k of the k x k stem of the 'full_res' family.
    downsample_factor: f in {1, 2, 4, 8, 16} ('downsample' family).
    channel_mult: width multipliers per resolution ('downsample' family).
    image_channels: 1 (grey) or 3 (RGB).
    conv: convolution implementation of every conv, 'xla' (nn.Conv's),
      'im2col' or 'auto' (:mod:`mesp_jax.models.conv`); the same parameters
      and, up to float summation order, the same outputs.
  """
  family: str = "downsample"
  width: int = 64
  bits: int = 16
  num_res_blocks: int = 2
  stem_kernel: int = 7
  downsample_factor: int = 4
  channel_mult: Sequence[int] = (1,)
  image_channels: int = 1
  conv: str = "xla"

  def latent_shape(self, image_shape: tuple[int, int, int]
                   ) -> tuple[int, int, int]:
    """(h, w, bits) of the code of an [H, W, C] image."""
    f = 1 if self.family == "full_res" else self.downsample_factor
    h, w, _ = image_shape
    return (h // f, w // f, self.bits)


def architecture_kwargs(cfg, section: str) -> dict:
  """Checked :class:`Autoencoder` fields from ``config.{section}``.

  Returns the keyword arguments for :data:`ARCHITECTURE_FIELDS` (without
  ``image_channels``) plus ``conv`` (``cfg.get("conv", "xla")``: configs
  saved before the field existed lack it); a bad family, factor or conv
  raises naming the field.
  """
  if cfg.family not in FAMILIES:
    raise ValueError(f"config.{section}.family={cfg.family!r}; choose one of "
                     f"{list(FAMILIES)}")
  if cfg.family == "downsample" and cfg.downsample_factor not in (1, 2, 4, 8,
                                                                  16):
    raise ValueError(f"config.{section}.downsample_factor="
                     f"{cfg.downsample_factor}; choose one of "
                     f"[1, 2, 4, 8, 16]")
  conv = cfg.get("conv", "xla")
  if conv not in CONV_CHOICES:
    raise ValueError(f"config.{section}.conv={conv!r}; choose one of "
                     f"{list(CONV_CHOICES)}")
  kwargs = {k: cfg[k] for k in ARCHITECTURE_FIELDS}
  kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
  kwargs["conv"] = conv
  return kwargs


class BLAE(Autoencoder):
  """The binary latent autoencoder (fields: :class:`Autoencoder`)."""

  def setup(self):
    self.encoder, self.decoder = encoder_decoder(self, self.bits)

  def encode_continuous(self, x):
    """[B, H, W, C] in [-1, 1] -> z = tanh(enc(x)) [B, h, w, bits]."""
    return jnp.tanh(self.encoder(x))

  def decode(self, z):
    """[B, h, w, bits] (+-1 or continuous) -> image [B, H, W, C]."""
    return self.decoder(z)

  def __call__(self, x, noise):
    """Training forward. ``noise`` is sigma * eps, shaped like the code.

    Returns (reconstruction from z + noise, z).
    """
    z = self.encode_continuous(x)
    return self.decode(z + noise), z


def blae_loss(recon, z, x, beta: float):
  """``mse(recon, x) + beta * mean(z^2)``; returns (loss, mse, kl)."""
  mse = jnp.mean(jnp.square(recon - x))
  kl = jnp.mean(jnp.square(z))
  return mse + beta * kl, mse, kl


def bin_rate(z, tol: float = 0.1):
  """Share of code entries within ``tol`` of +-1 (|z| >= 1 - tol)."""
  return jnp.mean((jnp.abs(z) >= 1.0 - tol).astype(jnp.float32))


def encode_tokens(model: BLAE, params, x, group: int):
  """Images [B, H, W, C] -> tokens [B, h, w, bits // group] int32."""
  z = model.apply(params, x, method=BLAE.encode_continuous)
  return bits_lib.pack(z, group)


def decode_tokens(model: BLAE, params, tokens, group: int):
  """Tokens [B, h, w, T] -> images [B, H, W, C] in [-1, 1] (clipped)."""
  code = bits_lib.unpack(tokens, group)
  return jnp.clip(model.apply(params, code, method=BLAE.decode), -1.0, 1.0)


def build_blae(cfg, image_channels: int) -> BLAE:
  """BLAE from a ``config.blae`` ConfigDict, checking values."""
  kwargs = architecture_kwargs(cfg, "blae")
  if cfg.bits < 1 or cfg.bits > 24:
    raise ValueError(f"config.blae.bits={cfg.bits} must be in 1..24")
  return BLAE(**kwargs, image_channels=image_channels)
