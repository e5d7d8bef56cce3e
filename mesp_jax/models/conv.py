"""2-D convolution with a choice of implementation, a drop-in for ``nn.Conv``.

:class:`Conv` has the parameters of ``flax.linen.Conv`` (``kernel``
``[kh, kw, Cin, Cout]`` with ``nn.Conv``'s default ``lecun_normal`` init,
``bias`` ``[Cout]`` zeros), created under the same names in the same order, so
a parameter tree (and a checkpoint) serves every implementation. ``impl``
picks how the convolution is computed:

* ``'xla'``: ``lax.conv_general_dilated`` with ``nn.Conv``'s dimension
  numbers, padding and precision, then ``+ bias``: literally ``nn.Conv``'s
  computation (bit-identical, tested).
* ``'im2col'``: pad as ``lax`` pads (``'SAME'``: ``lax.padtype_to_pads``),
  stack the ``kh * kw`` shifted (strided) slices of the padded input on the
  channel axis (order ``(di, dj, cin)``, the row-major order of the kernel)
  and contract them with the kernel reshaped to ``[kh * kw * Cin, Cout]`` in
  one matmul. A 1x1 convolution with stride 1 and no padding is that matmul
  alone. The same function as ``'xla'`` up to float summation order.
* ``'auto'``: :func:`resolve_conv` picks one of the two per convolution:
  XLA's on accelerators and for 1x1 kernels, on a CPU whichever a short
  probe measures faster there.

Why: XLA:CPU's convolution backward can be very slow on some CPUs (reported
for a 2-core AVX2 EPYC: about 2 GFLOP/s, while a 2048^2 matmul ran at
117 GFLOP/s, and a 3x3 conv as im2col was 3.2x faster fwd + bwd); im2col
turns every convolution and both its gradients into slices, pads and
matmuls. It is not faster everywhere: its patch copy moves ``kh * kw`` times
the input through memory, and on a 2-core AVX-512 Xeon with a fast XLA
convolution it was 2-5x slower per convolution and 1.7x slower for the
demo BL-AE train step (``python -m mesp_jax.bench train --compare=conv``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

CONV_CHOICES = ("xla", "im2col", "auto")

_DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()  # as nn.Conv


def _probe_seconds(impl: str, x: jax.Array, kernel: jax.Array) -> float:
  pads = [(1, 1), (1, 1)]

  def loss(x, k):
    if impl == "im2col":
      return jnp.sum(im2col_conv(x, k, (1, 1), pads, None))
    return jnp.sum(lax.conv_general_dilated(
        x, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")))

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(x, kernel))  # compile
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(step(x, kernel))
    best = min(best, time.perf_counter() - start)
  return best


@functools.cache
def measured_cpu_choice() -> str:
  """'xla' or 'im2col', whichever runs a 3x3 convolution's forward and
  backward faster on this process's CPU (measured once per process, about a
  second: batch 16, 32x32, 32 -> 32 channels, the demo BL-AE's commonest
  shape)."""
  with jax.ensure_compile_time_eval():
    x = jnp.ones((16, 32, 32, 32), jnp.float32)
    kernel = jnp.full((3, 3, 32, 32), 0.01, jnp.float32)
    times = {impl: _probe_seconds(impl, x, kernel)
             for impl in ("xla", "im2col")}
  return min(times, key=times.get)


def resolve_conv(impl: str, kernel_size: Sequence[int] = (3, 3),
                 backend: str | None = None,
                 measured: str | None = None) -> str:
  """'xla' or 'im2col' for the choice ``impl`` (one of :data:`CONV_CHOICES`).

  ``'auto'``:

  * a 1x1 kernel: ``'xla'`` (``lax`` runs it as a matmul already);
  * backend ``cpu`` (default ``jax.default_backend()``): the faster of the
    two on this CPU, by measurement (``measured``, default
    :func:`measured_cpu_choice`). XLA:CPU's convolution is fast on some CPUs
    and slow on others (module docstring);
  * otherwise ``'xla'``: accelerators have native convolutions.
  """
  if impl not in CONV_CHOICES:
    raise ValueError(f"conv={impl!r} must be one of {list(CONV_CHOICES)}")
  if impl != "auto":
    return impl
  if all(k == 1 for k in kernel_size):
    return "xla"
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return "xla"
  return measured_cpu_choice() if measured is None else measured


def _pads(padding, in_spatial: Sequence[int], kernel_size: Sequence[int],
          strides: Sequence[int]) -> list[tuple[int, int]]:
  """Explicit (lo, hi) pads for 'SAME' / 'VALID' / ints / pairs, as lax."""
  rank = len(kernel_size)
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"padding={padding!r}: Conv supports 'SAME', 'VALID', "
                       f"an int or (lo, hi) pairs")
    return [tuple(p) for p in lax.padtype_to_pads(
        tuple(in_spatial), tuple(kernel_size), tuple(strides),
        padding.upper())]
  if isinstance(padding, int):
    return [(padding, padding)] * rank
  pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  if len(pads) != rank or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding={padding!r} must give {rank} (lo, hi) pairs")
  return pads


def im2col_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                pads: Sequence[tuple[int, int]], precision=None) -> jax.Array:
  """``[B, H, W, Cin] * [kh, kw, Cin, Cout] -> [B, oh, ow, Cout]`` (no bias).

  The cross-correlation of ``lax.conv_general_dilated`` (NHWC, HWIO) as
  padding, ``kh * kw`` strided slices stacked on the channel axis and one
  matmul with the kernel as ``[kh * kw * Cin, Cout]``.
  """
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  (plo_h, phi_h), (plo_w, phi_w) = pads
  if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(
      (plo_h, phi_h, plo_w, phi_w)):
    return jnp.dot(x, kernel.reshape(cin, cout), precision=precision)
  xp = jnp.pad(x, ((0, 0), (plo_h, phi_h), (plo_w, phi_w), (0, 0)))
  b, hp, wp, _ = xp.shape
  oh = (hp - kh) // sh + 1
  ow = (wp - kw) // sw + 1
  if oh < 1 or ow < 1:
    raise ValueError(f"kernel {kh}x{kw} is larger than the padded input "
                     f"{hp}x{wp}")
  cols = [
      lax.slice(xp, (0, di, dj, 0),
                (b, di + (oh - 1) * sh + 1, dj + (ow - 1) * sw + 1, cin),
                (1, sh, sw, 1))
      for di in range(kh) for dj in range(kw)
  ]  # kh * kw of [B, oh, ow, Cin]
  patches = jnp.concatenate(cols, axis=-1)  # [B, oh, ow, kh * kw * Cin]
  return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout),
                 precision=precision)


class Conv(nn.Module):
  """2-D convolution, ``nn.Conv``'s parameters, ``impl`` as the module doc.

  Attributes (those of ``nn.Conv`` that the models use):
    features: output channels.
    kernel_size: (kh, kw) or an int.
    strides: (sh, sw) or an int.
    padding: 'SAME' (default, as nn.Conv), 'VALID', an int or (lo, hi) pairs.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as
      ``nn.Conv``.
    impl: 'xla', 'im2col' or 'auto' (:func:`resolve_conv`).
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = _DEFAULT_KERNEL_INIT
  bias_init: Any = nn.initializers.zeros_init()
  impl: str = "xla"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """``[B, H, W, Cin]`` -> ``[B, oh, ow, features]``."""
    ks = self.kernel_size
    kernel_size = (ks, ks) if isinstance(ks, int) else tuple(ks)
    st = self.strides
    strides = (st, st) if isinstance(st, int) else tuple(st)
    if len(kernel_size) != 2 or len(strides) != 2:
      raise ValueError(f"Conv is 2-D: kernel_size={self.kernel_size}, "
                       f"strides={self.strides}")
    if inputs.ndim != 4:
      raise ValueError(f"Conv takes [B, H, W, C] inputs, got shape "
                       f"{inputs.shape}")
    impl = resolve_conv(self.impl, kernel_size)
    in_features = inputs.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        kernel_size + (in_features, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias,
                                         dtype=self.dtype)
    if impl == "xla":
      # nn.Conv's call: NHWC x HWIO -> NHWC, its padding argument as given.
      padding = self.padding
      if isinstance(padding, int):
        padding = [(padding, padding)] * 2
      elif not isinstance(padding, str):
        padding = [(p, p) if isinstance(p, int) else tuple(p)
                   for p in padding]
      y = lax.conv_general_dilated(
          inputs, kernel, strides, padding, lhs_dilation=(1, 1),
          rhs_dilation=(1, 1),
          dimension_numbers=lax.ConvDimensionNumbers((0, 3, 1, 2),
                                                     (3, 2, 0, 1),
                                                     (0, 3, 1, 2)),
          feature_group_count=1, precision=self.precision)
    else:
      pads = _pads(self.padding, inputs.shape[1:3], kernel_size, strides)
      y = im2col_conv(inputs, kernel, strides, pads, self.precision)
    if bias is not None:
      y += bias.reshape((1, 1, 1, -1))
    return y
