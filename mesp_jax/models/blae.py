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

Two residual designs (``norm``, an architecture field):

* ``'none'`` (the default, every earlier checkpoint): ``x + conv(silu(conv(
  silu(x))))``, no normalisation, one block per ``downsample`` stage and
  ``num_res_blocks`` at the bottom; the stride-2 (and the upsampling) convs
  change the width.
* ``'group'`` (VQGAN-style): ``h = conv(silu(GN(x))); h = conv(silu(GN(h)));
  shortcut(x) + h`` with ``nn.GroupNorm(num_groups)``; the shortcut is a 1x1
  conv (VQGAN's ``nin_shortcut``) where the block changes the width, else
  the identity. ``downsample`` then has ``num_res_blocks`` blocks per stage:
  encoder stage ``s`` runs its blocks at width ``widths[s]`` and resolution
  ``H / 2^s``, then a width-keeping stride-2 4x4 conv; the bottom has
  ``num_res_blocks`` blocks at ``widths[-1]``; the decoder mirrors it
  (bottom blocks, then per stage nearest x2, a width-keeping 3x3 conv and
  ``num_res_blocks`` blocks to ``widths[s]``). A GroupNorm precedes the last
  silu (before ``to_bits`` and before ``out``). Every block's second conv
  starts at zero in both designs, so a block starts as its shortcut.

``widths[i] = width * channel_mult[min(i, len - 1)]`` for ``i = 0..log2 f``.

ImageNet 256x256 (``configs/blae_imagenet.py``). With ``norm='group'``,
``width=128``, ``num_res_blocks=2``:

* ``f = 16``, ``channel_mult=(1, 1, 2, 2, 4)`` (widths 128-128-256-256-512,
  VQGAN f16's), ``bits=24``: ``256x256x3 -> 16x16x24``, 6144 bits per
  image; 36.7 M parameters (encoder 16.7 M, decoder 20.1 M);
* ``f = 8``, ``channel_mult=(1, 1, 2, 4)`` (widths 128-128-256-512),
  ``bits=16``: ``256x256x3 -> 32x32x16``, 16384 bits; 30.3 M parameters
  (encoder 13.3 M, decoder 17.1 M).

(:func:`count_params` of ``jax.eval_shape`` of ``init``; neither has
VQGAN's attention blocks. A forward pass of either is about 0.3 TFLOP per
image, XLA's cost analysis.) ``dtype='bfloat16'`` computes every conv and
norm in bfloat16 with float32 parameters (GroupNorm statistics in float32);
the encoder's pre-tanh code and the decoder's image come back as float32,
so losses are float32. ``dtype`` is not an architecture field: both dtypes
have the same parameters.

Every convolution is :class:`mesp_jax.models.conv.Conv` with the model's
``conv`` implementation ('xla', 'im2col' or 'auto'); all share nn.Conv's
parameters, so the choice is not part of a checkpoint's architecture.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mesp_jax.base import bits as bits_lib
from mesp_jax.models.conv import CONV_CHOICES, Conv

FAMILIES = ("full_res", "downsample")
NORMS = ("none", "group")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """The jnp dtype of a ``dtype`` field ('float32' or 'bfloat16')."""
  if name not in DTYPES:
    raise ValueError(f"dtype={name!r} must be one of {list(DTYPES)}")
  return DTYPES[name]


class ResBlock(nn.Module):
  """A residual block with a configurable kernel size (module docstring).

  ``norm='none'``: ``x + conv(silu(conv(silu(x))))``, input width ==
  ``width``. ``norm='group'``: ``shortcut(x) + conv(silu(GN(conv(silu(
  GN(x))))))``, the shortcut a 1x1 conv where the input width differs.
  """
  width: int
  kernel: int = 1
  conv: str = "xla"
  norm: str = "none"
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """[B, H, W, Cin] -> [B, H, W, width] (in ``dtype``)."""
    k = (self.kernel, self.kernel)
    conv = functools.partial(Conv, impl=self.conv, dtype=self.dtype)
    zeros = nn.initializers.zeros
    if self.norm == "none":
      if x.shape[-1] != self.width:
        raise ValueError(f"ResBlock(norm='none') keeps the width: input "
                         f"{x.shape[-1]} channels, width {self.width}")
      h = conv(self.width, k, name="conv1")(nn.silu(x))
      h = conv(self.width, k, name="conv2", kernel_init=zeros)(nn.silu(h))
      return x + h
    norm = functools.partial(nn.GroupNorm, num_groups=self.num_groups,
                             dtype=self.dtype)
    h = conv(self.width, k, name="conv1")(nn.silu(norm(name="norm1")(x)))
    h = conv(self.width, k, name="conv2", kernel_init=zeros)(
        nn.silu(norm(name="norm2")(h)))
    if x.shape[-1] != self.width:
      x = conv(self.width, (1, 1), name="nin_shortcut")(x)
    return x + h


def _stage_widths(width: int, num_down: int, mult: Sequence[int]) -> list[int]:
  mult = list(mult) if mult else [1]
  return [width * mult[min(i, len(mult) - 1)] for i in range(num_down + 1)]


def stage_widths(family: str, width: int, downsample_factor: int,
                 channel_mult: Sequence[int]) -> list[int]:
  """Every width of the encoder/decoder: ``[width]`` for 'full_res', else
  ``widths[i]`` for ``i = 0..log2 f`` (resolution ``H / 2^i``)."""
  if family == "full_res":
    return [width]
  num_down = int(math.log2(downsample_factor))
  return _stage_widths(width, num_down, channel_mult)


def _check_norm(norm: str, num_groups: int, num_res_blocks: int,
                widths: Sequence[int]) -> None:
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r} must be one of {list(NORMS)}")
  if norm != "group":
    return
  bad = [w for w in widths if w % num_groups]
  if bad:
    raise ValueError(f"num_groups={num_groups} must divide every stage width "
                     f"{list(widths)} (not {bad})")
  if num_res_blocks < 1 and len(set(widths)) > 1:
    raise ValueError(f"norm='group' changes widths {list(widths)} in its "
                     f"residual blocks: num_res_blocks must be >= 1")


class Encoder(nn.Module):
  """[B, H, W, C_img] in [-1, 1] -> pre-tanh code [B, H/f, W/f, bits] f32."""
  family: str
  width: int
  bits: int
  num_res_blocks: int
  stem_kernel: int = 7
  downsample_factor: int = 1
  channel_mult: Sequence[int] = (1,)
  conv: str = "xla"
  norm: str = "none"
  num_groups: int = 32
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    dtype = compute_dtype(self.dtype)
    widths = stage_widths(self.family, self.width, self.downsample_factor,
                          self.channel_mult)
    _check_norm(self.norm, self.num_groups, self.num_res_blocks, widths)
    conv = functools.partial(Conv, impl=self.conv, dtype=dtype)
    res = functools.partial(ResBlock, conv=self.conv, norm=self.norm,
                            num_groups=self.num_groups, dtype=dtype)
    group = self.norm == "group"
    if self.family == "full_res":
      k = (self.stem_kernel, self.stem_kernel)
      h = conv(self.width, k, name="stem")(x)
      for i in range(self.num_res_blocks):
        h = res(self.width, 1, name=f"res{i}")(h)
    elif not group:
      num_down = len(widths) - 1
      h = conv(widths[0], (3, 3), name="stem")(x)
      for s in range(num_down):
        h = res(widths[s], 3, name=f"down{s}_res")(h)
        h = conv(widths[s + 1], (4, 4), strides=(2, 2),
                 name=f"down{s}_conv")(nn.silu(h))
      for i in range(self.num_res_blocks):
        h = res(widths[-1], 3, name=f"mid_res{i}")(h)
    else:
      num_down = len(widths) - 1
      h = conv(widths[0], (3, 3), name="stem")(x)  # [B, H, W, widths[0]]
      for s in range(num_down):
        for j in range(self.num_res_blocks):
          h = res(widths[s], 3, name=f"down{s}_res{j}")(h)
        # Width-keeping stride-2 conv on the residual stream (as VQGAN).
        h = conv(h.shape[-1], (4, 4), strides=(2, 2),
                 name=f"down{s}_conv")(h)  # [B, H/2^(s+1), ., widths[s]]
      for i in range(self.num_res_blocks):
        h = res(widths[-1], 3, name=f"mid_res{i}")(h)
    if group:
      h = nn.GroupNorm(num_groups=self.num_groups, dtype=dtype,
                       name="norm_out")(h)
    h = conv(self.bits, (1, 1), name="to_bits")(nn.silu(h))
    return h.astype(jnp.float32)  # [B, h, w, bits]


class Decoder(nn.Module):
  """Code [B, h, w, bits] -> image [B, h*f, w*f, C_img] f32 (unbounded)."""
  family: str
  width: int
  image_channels: int
  num_res_blocks: int
  stem_kernel: int = 7
  downsample_factor: int = 1
  channel_mult: Sequence[int] = (1,)
  conv: str = "xla"
  norm: str = "none"
  num_groups: int = 32
  dtype: str = "float32"

  @nn.compact
  def __call__(self, z):
    dtype = compute_dtype(self.dtype)
    widths = stage_widths(self.family, self.width, self.downsample_factor,
                          self.channel_mult)
    _check_norm(self.norm, self.num_groups, self.num_res_blocks, widths)
    conv = functools.partial(Conv, impl=self.conv, dtype=dtype)
    res = functools.partial(ResBlock, conv=self.conv, norm=self.norm,
                            num_groups=self.num_groups, dtype=dtype)
    group = self.norm == "group"
    if self.family == "full_res":
      h = conv(self.width, (1, 1), name="from_bits")(z)
      for i in range(self.num_res_blocks):
        h = res(self.width, 1, name=f"res{i}")(h)
      k = (self.stem_kernel, self.stem_kernel)
    else:
      num_down = len(widths) - 1
      h = conv(widths[-1], (3, 3), name="from_bits")(z)
      for i in range(self.num_res_blocks):
        h = res(widths[-1], 3, name=f"mid_res{i}")(h)
      for s in reversed(range(num_down)):
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, hh * 2, ww * 2, c), "nearest")
        if not group:
          h = conv(widths[s], (3, 3), name=f"up{s}_conv")(nn.silu(h))
          h = res(widths[s], 3, name=f"up{s}_res")(h)
        else:
          # Width-keeping 3x3 conv after the upsampling (as VQGAN).
          h = conv(c, (3, 3), name=f"up{s}_conv")(h)
          for j in range(self.num_res_blocks):
            h = res(widths[s], 3, name=f"up{s}_res{j}")(h)
        # h: [B, h * 2^(num_down - s), ., widths[s]]
      k = (3, 3)
    if group:
      h = nn.GroupNorm(num_groups=self.num_groups, dtype=dtype,
                       name="norm_out")(h)
    out = conv(self.image_channels, k, name="out")(nn.silu(h))
    return out.astype(jnp.float32)  # [B, H, W, C_img]


def encoder_decoder(module, code_channels: int) -> tuple[Encoder, Decoder]:
  """The encoder (to ``code_channels``) and decoder of a BLAE-like module.

  ``module`` carries the BLAE architecture fields (family, width, bits, ...);
  the Gaussian VAE reuses this with ``code_channels = 2 * bits``.
  """
  common = dict(family=module.family, width=module.width,
                num_res_blocks=module.num_res_blocks,
                stem_kernel=module.stem_kernel,
                downsample_factor=module.downsample_factor,
                channel_mult=tuple(module.channel_mult), conv=module.conv,
                norm=module.norm, num_groups=module.num_groups,
                dtype=module.dtype)
  return (Encoder(bits=code_channels, **common),
          Decoder(image_channels=module.image_channels, **common))


# The fields that define an autoencoder's parameters (a checkpoint's "model").
# ``conv`` and ``dtype`` are not among them: every convolution implementation
# and both compute dtypes have the same parameters.
ARCHITECTURE_FIELDS = ("family", "width", "bits", "num_res_blocks",
                       "stem_kernel", "downsample_factor", "channel_mult",
                       "norm", "num_groups")

# Architecture fields that configs (and checkpoint metas) saved before the
# field existed lack, with the value those models had.
ARCHITECTURE_DEFAULTS = {"norm": "none", "num_groups": 32}


def architecture_meta(cfg) -> dict:
  """``{field: cfg[field]}`` for :data:`ARCHITECTURE_FIELDS`, the fields in
  :data:`ARCHITECTURE_DEFAULTS` read with ``cfg.get(field, default)`` (a
  config saved before them gets the meta its checkpoints hold)."""
  return {k: (cfg.get(k, ARCHITECTURE_DEFAULTS[k])
              if k in ARCHITECTURE_DEFAULTS else cfg[k])
          for k in ARCHITECTURE_FIELDS}


def count_params(params) -> int:
  """Number of parameter entries in a pytree (arrays or
  ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape(model.init, ...)``)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


class Autoencoder(nn.Module):
  """Architecture fields and latent shape of BLAE and the Gaussian VAE.

  Attributes:
    family: 'full_res' or 'downsample'.
    width: channel width (base width for 'downsample').
    bits: latent channels C per position (bits for the BL-AE).
    num_res_blocks: residual blocks in encoder and decoder: at the bottom
      ('downsample', norm 'none'), per resolution stage and at the bottom
      ('downsample', norm 'group'), or in all ('full_res').
    stem_kernel: k of the k x k stem of the 'full_res' family.
    downsample_factor: f in {1, 2, 4, 8, 16} ('downsample' family).
    channel_mult: width multipliers per resolution ('downsample' family).
    image_channels: 1 (grey) or 3 (RGB).
    conv: convolution implementation of every conv, 'xla' (nn.Conv's),
      'im2col' or 'auto' (:mod:`mesp_jax.models.conv`); the same parameters
      and, up to float summation order, the same outputs.
    norm: residual design, 'none' or 'group' (VQGAN-style, module doc).
    num_groups: GroupNorm groups (norm 'group'); divides every width.
    dtype: compute dtype of every conv and norm, 'float32' or 'bfloat16';
      parameters and the encoder's and decoder's outputs stay float32.
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
  norm: str = "none"
  num_groups: int = 32
  dtype: str = "float32"

  def latent_shape(self, image_shape: tuple[int, int, int]
                   ) -> tuple[int, int, int]:
    """(h, w, bits) of the code of an [H, W, C] image."""
    f = 1 if self.family == "full_res" else self.downsample_factor
    h, w, _ = image_shape
    return (h // f, w // f, self.bits)


def architecture_kwargs(cfg, section: str) -> dict:
  """Checked :class:`Autoencoder` fields from ``config.{section}``.

  Returns the keyword arguments for :data:`ARCHITECTURE_FIELDS` (without
  ``image_channels``) plus ``conv`` and ``dtype``. ``conv``, ``dtype``,
  ``norm`` and ``num_groups`` are read with ``cfg.get(name, default)``:
  configs saved before a field existed lack it. A bad family, factor, conv,
  norm, num_groups (one that does not divide every width) or dtype raises
  naming the field.
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
  dtype = cfg.get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"config.{section}.dtype={dtype!r}; choose one of "
                     f"{list(DTYPES)}")
  kwargs = architecture_meta(cfg)
  kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
  if kwargs["norm"] not in NORMS:
    raise ValueError(f"config.{section}.norm={kwargs['norm']!r}; choose one "
                     f"of {list(NORMS)}")
  groups = kwargs["num_groups"]
  if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
    raise ValueError(f"config.{section}.num_groups={groups!r} must be an int "
                     f">= 1")
  if kwargs["norm"] == "group":
    widths = stage_widths(cfg.family, cfg.width, cfg.downsample_factor,
                          kwargs["channel_mult"])
    if any(w % groups for w in widths):
      raise ValueError(
          f"config.{section}.num_groups={groups} must divide every stage "
          f"width {widths} (config.{section}.width={cfg.width} times "
          f"channel_mult={kwargs['channel_mult']}) with norm='group'")
    if cfg.num_res_blocks < 1 and len(set(widths)) > 1:
      raise ValueError(
          f"config.{section}.num_res_blocks={cfg.num_res_blocks}: norm="
          f"'group' changes the widths {widths} in residual blocks, so it "
          f"needs at least one per stage")
  kwargs["conv"] = conv
  kwargs["dtype"] = dtype
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
