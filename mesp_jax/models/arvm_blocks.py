"""The gamma-ARVM's transformer block: a query stream attending to context slots.

See :mod:`mesp_jax.models.arvm` for the two streams; keys and values come
from the context embeddings only, which keeps the cache of
:meth:`ARVM.decode_slots` exact.

Sharding. Every parameter carries logical axis names
(``nn.with_logical_partitioning``): ``embed`` (the model width), ``heads``
and ``kv`` (attention heads and their width), ``mlp`` (the MLP's hidden
units). The mesh rules (:data:`mesp_jax.base.sharding.DEFAULT_RULES`) put
``embed`` on ``fsdp`` and ``heads``/``mlp`` on ``model``, which is
Megatron-style tensor parallelism: the query/key/value projections and
``mlp_in`` are split by output unit, ``out`` and ``mlp_out`` by input unit,
so each block needs one reduction over ``model`` after attention and one
after the MLP. Activations are constrained by the same names (``batch``,
``length``, ``heads``, ``mlp``); outside
:func:`mesp_jax.base.sharding.activation_rules` those constraints do
nothing.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mesp_jax.base import sharding
from mesp_jax.models import local_attention

# Activation layouts (logical names; the embedding width of activations is
# never split, so it gets a name of its own that no rule maps).
_X = ("batch", "length", "act_embed")  # [B, S, D]
_HEADS = ("batch", "length", "heads", "kv")  # [B, S, h, hd]
_CACHE = ("batch", "heads", "length", "kv")  # [B, h, L, hd]
_MLP = ("batch", "length", "mlp")  # [B, S, F]


def partitioned(init, *names):
  """``init`` whose parameter carries the logical axis ``names``."""
  return nn.with_logical_partitioning(init, names)


constrain = sharding.constrain


def layer_norm(dtype, name: str | None = None) -> nn.LayerNorm:
  """Pre-LN with float32 parameters named ``('embed',)``."""
  return nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32,
                      scale_init=partitioned(nn.initializers.ones, "embed"),
                      bias_init=partitioned(nn.initializers.zeros, "embed"),
                      name=name)


class Attention(nn.Module):
  """Multi-head attention of a query stream over context slots.

  Keys and values are projections of the (layer-normalised) context
  embeddings only; with ``kv`` they are first written into the cache at the
  entries ``write_index`` and the query attends to the whole cache under
  ``mask``.
  """

  num_heads: int
  dtype: Any = jnp.float32
  window: local_attention.LocalWindow | None = None

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, mask: jax.Array | None,
               kv: dict[str, jax.Array] | None = None,
               write_index: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Attends the queries ``x`` to the context ``ctx`` (or to the cache).

    Args:
      x: [B, S, D] normalised query-stream inputs.
      ctx: [B, S, D] normalised context embeddings of the same slots.
      mask: [S, L] boolean, True = may attend (L = S without a cache, else the
        cache length); or None: block-local attention under the gamma mask
        of ``window`` (no cache, S = T).
      kv: optional cache ``{'k', 'v'}`` each [B, heads, L, head_dim] (or
        ``{'kt', 'v'}`` with the keys [B, heads, head_dim, L]); the keys and
        values of ``ctx`` slot ``j`` are written at entry
        ``write_index[j]``.
      write_index: [S] int32 cache entries of the slots of ``ctx``.

    Returns:
      ([B, S, D] output, updated cache or None).
    """
    d = x.shape[-1]
    head_dim = d // self.num_heads
    init = nn.initializers.lecun_normal()
    zeros = nn.initializers.zeros

    def dense(features, names, name, axis=-1):
      return nn.DenseGeneral(
          features, axis=axis, dtype=self.dtype, param_dtype=jnp.float32,
          kernel_init=partitioned(init, *names),
          bias_init=partitioned(zeros, *names[-len(features):]
                                if isinstance(features, tuple) else names[-1:]),
          name=name)

    q = dense((self.num_heads, head_dim), ("embed", "heads", "kv"),
              "query")(x)  # [B, S, h, hd]
    q = constrain(q, _HEADS)
    kv_new = dense((2, self.num_heads, head_dim),
                   ("embed", None, "heads", "kv"), "key_value")(ctx)
    # Keys/values head-major, [B, h, S, hd]: the cache layout, so decoding
    # reads it without a transpose.
    k = constrain(jnp.swapaxes(kv_new[:, :, 0], 1, 2), _CACHE)
    v = constrain(jnp.swapaxes(kv_new[:, :, 1], 1, 2), _CACHE)
    new_cache, kt = None, None
    if kv is not None:
      v = kv["v"].at[:, :, write_index].set(v.astype(kv["v"].dtype))
      if "kt" in kv:
        kt = kv["kt"].at[:, :, :, write_index].set(
            jnp.swapaxes(k, 2, 3).astype(kv["kt"].dtype))  # [B, h, hd, L]
        new_cache = {"kt": kt, "v": v}
      else:
        k = kv["k"].at[:, :, write_index].set(k.astype(kv["k"].dtype))
        new_cache = {"k": k, "v": v}  # [B, h, L, hd]
    out_proj = dense(d, ("heads", "kv", "embed"), "out", axis=(-2, -1))
    if mask is None:
      if kv is not None or self.window is None:
        raise ValueError("block-local attention needs a window and no cache")
      w = self.window
      out = local_attention.block_local_attention(
          q, k.astype(self.dtype), v.astype(self.dtype), height=w.height,
          width=w.width, tokens_per_pos=w.tokens_per_pos,
          gamma=w.gamma)  # [B, S, h, hd]
      return out_proj(constrain(out, _HEADS)), None  # [B, S, D]
    if kt is None:
      logits = jnp.einsum("bshd,bhld->bhsl", q, k.astype(self.dtype))
    else:
      logits = jnp.matmul(jnp.swapaxes(q, 1, 2), kt.astype(self.dtype))
    logits = logits.astype(jnp.float32) / math.sqrt(head_dim)  # [B, h, S, L]
    logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    # [B, h, S, hd], then [B, S, h, hd]: with several queries, a product
    # straight into "bshd" runs as a slow strided loop on XLA's CPU backend
    # (9x slower at 6 queries, measured; the same for one).
    out = jnp.swapaxes(jnp.matmul(weights, v.astype(self.dtype)), 1, 2)
    return out_proj(constrain(out, _HEADS)), new_cache  # [B, S, D]


class Block(nn.Module):
  """Pre-LN block: ``x + attn(LN(x), LN(ctx)); x + mlp(LN(x))``.

  The call is ``(x, ctx, mask, kv, write_index) -> (x, kv)``: ``x`` is the
  carry and ``kv`` the per-layer slice when the layers are scanned
  (:class:`mesp_jax.models.arvm.ARVM`, ``scan_layers``).
  """

  num_heads: int
  mlp_ratio: float
  dtype: Any = jnp.float32
  window: local_attention.LocalWindow | None = None

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, mask: jax.Array | None,
               kv: dict[str, jax.Array] | None = None,
               write_index: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    d = x.shape[-1]
    x = constrain(x, _X)
    h, kv = Attention(self.num_heads, dtype=self.dtype, window=self.window,
                      name="attn")(
        layer_norm(self.dtype, "ln_query")(x),
        layer_norm(self.dtype, "ln_context")(ctx), mask, kv, write_index)
    x = x + h
    h = layer_norm(self.dtype, "ln_mlp")(x)
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              param_dtype=jnp.float32)
    lecun = nn.initializers.lecun_normal()
    h = dense(int(self.mlp_ratio * d),
              kernel_init=partitioned(lecun, "embed", "mlp"),
              bias_init=partitioned(nn.initializers.zeros, "mlp"),
              name="mlp_in")(h)
    h = nn.gelu(constrain(h, _MLP))
    h = dense(d, kernel_init=partitioned(lecun, "mlp", "embed"),
              bias_init=partitioned(nn.initializers.zeros, "embed"),
              name="mlp_out")(h)
    return constrain(x + h, _X), kv  # [B, S, D]
