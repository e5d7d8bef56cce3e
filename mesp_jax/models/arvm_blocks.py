"""The gamma-ARVM's transformer block: a query stream attending to context slots.

See :mod:`mesp_jax.models.arvm` for the two streams; keys and values come
from the context embeddings only, which keeps the cache of
:meth:`ARVM.decode_slots` exact.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mesp_jax.models import local_attention


class Attention(nn.Module):
  """Multi-head attention of a query stream over context slots.

  Keys and values are projections of the (layer-normalised) context
  embeddings only; with ``kv`` they are first written into the cache at the
  entries ``write_index`` and the query attends to the whole cache under
  ``mask``.
  """

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, mask: jax.Array,
               kv: dict[str, jax.Array] | None = None,
               write_index: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Attends the queries ``x`` to the context ``ctx`` (or to the cache).

    Args:
      x: [B, S, D] normalised query-stream inputs.
      ctx: [B, S, D] normalised context embeddings of the same slots.
      mask: [S, L] boolean, True = may attend (L = S without a cache, else the
        cache length); or a :class:`local_attention.LocalWindow` (no cache,
        S = T): block-local attention under the gamma mask.
      kv: optional cache ``{'k', 'v'}`` each [B, heads, L, head_dim]; the keys
        and values of ``ctx`` slot ``j`` are written at entry
        ``write_index[j]``.
      write_index: [S] int32 cache entries of the slots of ``ctx``.

    Returns:
      ([B, S, D] output, updated cache or None).
    """
    d = x.shape[-1]
    head_dim = d // self.num_heads
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype,
                              param_dtype=jnp.float32)
    q = dense((self.num_heads, head_dim), name="query")(x)  # [B, S, h, hd]
    kv_new = dense((2, self.num_heads, head_dim), name="key_value")(ctx)
    # Keys/values head-major, [B, h, S, hd]: the cache layout, so decoding
    # reads it without a transpose.
    k = jnp.swapaxes(kv_new[:, :, 0], 1, 2)
    v = jnp.swapaxes(kv_new[:, :, 1], 1, 2)
    new_cache = None
    if kv is not None:
      k = kv["k"].at[:, :, write_index].set(k.astype(kv["k"].dtype))
      v = kv["v"].at[:, :, write_index].set(v.astype(kv["v"].dtype))
      new_cache = {"k": k, "v": v}  # [B, h, L, hd]
    if isinstance(mask, local_attention.LocalWindow):
      if kv is not None:
        raise ValueError("block-local attention has no cache path")
      out = local_attention.block_local_attention(
          q, k.astype(self.dtype), v.astype(self.dtype), height=mask.height,
          width=mask.width, tokens_per_pos=mask.tokens_per_pos,
          gamma=mask.gamma)  # [B, S, h, hd]
      return dense(d, axis=(-2, -1), name="out")(out), None  # [B, S, D]
    logits = jnp.einsum("bshd,bhld->bhsl", q, k.astype(self.dtype))
    logits = logits.astype(jnp.float32) / math.sqrt(head_dim)  # [B, h, S, L]
    logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhsl,bhld->bshd", weights, v.astype(self.dtype))
    out = dense(d, axis=(-2, -1), name="out")(out)
    return out, new_cache  # [B, S, D]


class Block(nn.Module):
  """Pre-LN block: ``x + attn(LN(x), LN(ctx)); x + mlp(LN(x))``."""

  num_heads: int
  mlp_ratio: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, mask: jax.Array,
               kv: dict[str, jax.Array] | None = None,
               write_index: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    d = x.shape[-1]
    norm = functools.partial(nn.LayerNorm, dtype=self.dtype,
                             param_dtype=jnp.float32)
    h, kv = Attention(self.num_heads, dtype=self.dtype, name="attn")(
        norm(name="ln_query")(x), norm(name="ln_context")(ctx), mask, kv,
        write_index)
    x = x + h
    h = norm(name="ln_mlp")(x)
    h = nn.Dense(int(self.mlp_ratio * d), dtype=self.dtype,
                 param_dtype=jnp.float32, name="mlp_in")(h)
    h = nn.gelu(h)
    h = nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32,
                 name="mlp_out")(h)
    return x + h, kv  # [B, S, D]
