"""Logits to tokens: filtering, per-token keys, classifier-free guidance rows.

Shared by the raster (:mod:`mesp_jax.sample.decode`) and the wavefront
(:mod:`mesp_jax.sample.wavefront`) decoders. Sample ``b`` uses
``fold_in(rng, b)`` and the draw of its token ``i`` uses
``fold_in(fold_in(rng, b), i)``, whatever the step that draws it, so the two
orders give the same samples for a seed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mesp_jax.base import sharding as sharding_lib
from mesp_jax.models import arvm as arvm_lib


def process_logits(logits: jax.Array, *, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Temperature, then top-k, then top-p (nucleus) filtering.

  Args:
    logits: [B, V] float logits.
    temperature: > 0 divides the logits (``<= 0`` is handled by the caller as
      greedy decoding).
    top_k: keep the ``top_k`` largest logits (0 = all).
    top_p: keep the smallest set of values whose probability reaches
      ``top_p`` (1.0 = all; the most likely value is always kept).

  Returns:
    [B, V] float32 logits with removed values at -inf.
  """
  logits = logits.astype(jnp.float32)
  if temperature > 0:
    logits = logits / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above
    keep = before < top_p
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1,
                        keepdims=True)  # [B, 1]
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_keys(rng: jax.Array, num_samples: int) -> jax.Array:
  """Per-sample keys ``fold_in(rng, b)`` for ``b = 0..num_samples-1``."""
  return jax.vmap(lambda b: jax.random.fold_in(rng, b))(
      jnp.arange(num_samples, dtype=jnp.uint32))


def draw(keys: jax.Array, step: jax.Array, logits: jax.Array,
          temperature: float, top_k: int, top_p: float) -> jax.Array:
  """One token per sample with key ``fold_in(keys[b], step)``: [B] int32."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = process_logits(logits, temperature=temperature, top_k=top_k,
                          top_p=top_p)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
  return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


def guide(logits: jax.Array, cfg_scale: float) -> jax.Array:
  """[2B, V] interleaved (cond, uncond) rows -> [B, V] guided logits."""
  if cfg_scale <= 0:
    return logits
  pair = logits.reshape(-1, 2, logits.shape[-1])  # [B, 2, V]
  cond, uncond = pair[:, 0], pair[:, 1]
  return uncond + cfg_scale * (cond - uncond)


def guidance_labels(model: arvm_lib.ARVM, labels: jax.Array | None,
                    cfg_scale: float) -> jax.Array | None:
  """[2B] interleaved (label, null) rows when guiding, else ``labels``."""
  if labels is None or cfg_scale <= 0:
    return labels
  return jnp.stack([labels, jnp.full_like(labels, model.null_label)],
                   axis=1).reshape(-1)


def guidance_rows(x: jax.Array, cfg_scale: float) -> jax.Array:
  """Duplicates each sample into (cond, uncond) rows when guiding: [2B, ...]."""
  return jnp.repeat(x, 2, axis=0) if cfg_scale > 0 else x


def labels_or_null(model: arvm_lib.ARVM, labels: Any,
                    num_samples: int) -> jax.Array | None:
  """[B] int32 labels for a conditional model (None -> null label), else None."""
  if model.num_classes == 0:
    return None
  if labels is None:
    return jnp.full((num_samples,), model.null_label, jnp.int32)
  return jnp.asarray(labels, jnp.int32)


def cache_sharding(ndim: int, mesh: Mesh) -> NamedSharding:
  """Sharding of one K/V cache array (:func:`arvm.init_cache` ``'layers'``):
  [..., B, heads, L, hd] with the batch on axis -4 (after a leading layer
  axis when the ARVM scans its layers) split over the data axes."""
  spec = [None] * ndim
  spec[ndim - 4] = sharding_lib.DATA_AXES
  return NamedSharding(mesh, P(*spec))


def constrain_cache(layers: Any, mesh: Mesh | None) -> Any:
  """Batch-shards the K/V cache arrays (:func:`cache_sharding`)."""
  if mesh is None:
    return layers
  return jax.tree.map(
      lambda a: jax.lax.with_sharding_constraint(a, cache_sharding(a.ndim,
                                                                   mesh)),
      layers)


def constrain(x: Any, mesh: Mesh | None) -> Any:
  """Batch-shards every array of ``x`` on its leading axis (no-op off mesh)."""
  if mesh is None:
    return x
  sharding = sharding_lib.batch_sharding(mesh)
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding),
                      x)
