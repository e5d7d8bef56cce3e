"""Jitted sampler for the neural gamma-ARVM (prefill + KV-cached decode loop).

Sequence and mask conventions are those of :mod:`mesp_jax.models.arvm`: token
``i = (row * W + col) * Tp + k``; input slot 0 is the start slot, slot ``s``
holds token ``s - 1``; the output of slot ``i`` is the histogram of token
``i``.

Decoding runs slot 0 (prefill, the start slot) and then one slot per step in a
``lax.fori_loop``. The cache is an explicit pytree (:func:`arvm.init_cache`):
entry 0 keeps the start slot and a ring of ``R`` entries keeps token slots,
each entry tagged with the slot it holds so the attention mask is rebuilt from
the stored grid positions every step.

* ``cache='ring'``: ``R = (gamma * W + gamma + 1) * Tp`` (capped at ``T - 1``)
  for finite gamma, so memory does not grow with image height; for global
  gamma this is the full cache.
* ``cache='full'``: ``R = T - 1``; nothing is ever overwritten.
* ``cache='none'``: every step reruns the full forward pass (the baseline).

``order='wavefront'`` hands decoding to :mod:`mesp_jax.sample.wavefront`
(every position of a front per step, its own row cache, the same tokens).

Randomness: sample ``b`` uses ``fold_in(rng, b)`` and the draw for token ``i``
uses ``fold_in(fold_in(rng, b), i)``, so a seed gives the same samples for any
device count or batch split. With ``mesh`` the batch is split over the mesh
data axes (``('data', 'fsdp')``) and parameters are replicated.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mesp_jax.base import sharding as sharding_lib
from mesp_jax.models import arvm as arvm_lib
from mesp_jax.sample import wavefront
from mesp_jax.sample.logits import (
  constrain,
  constrain_cache,
  guidance_labels,
  guidance_rows,
  guide,
  labels_or_null,
  process_logits,  # noqa: F401 (re-exported)
  sample_keys,
)
from mesp_jax.sample.logits import draw as draw_token

CACHE_KINDS = ("ring", "full", "none")
ORDERS = ("raster", "wavefront")


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


def _check_args(model: arvm_lib.ARVM, num_samples: int, labels: Any,
                cache: str, cfg_scale: float, top_k: int, top_p: float,
                mesh: Mesh | None, order: str = "raster") -> None:
  if cache not in CACHE_KINDS:
    raise ValueError(f"cache={cache!r} must be one of {list(CACHE_KINDS)}")
  if order not in ORDERS:
    raise ValueError(f"order={order!r} must be one of {list(ORDERS)}")
  if order == "wavefront" and cache == "none":
    raise ValueError("order='wavefront' decodes with its own row cache; "
                     "cache='none' (full recomputation) is raster only")
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1")
  if top_k < 0:
    raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  if labels is not None:
    if model.num_classes == 0:
      raise ValueError("labels given but the model is unconditional "
                       "(num_classes=0)")
    if np.shape(labels) != (num_samples,):
      raise ValueError(f"labels must have shape ({num_samples},), got "
                       f"{np.shape(labels)}")
  if cfg_scale > 0 and model.num_classes == 0:
    raise ValueError("cfg_scale > 0 needs a class-conditional model "
                     "(num_classes > 0)")
  if cfg_scale > 0 and labels is None:
    raise ValueError("cfg_scale > 0 needs labels")
  if mesh is not None:
    dp = sharding_lib.data_parallel_size(mesh)
    if num_samples % dp:
      raise ValueError(
          f"num_samples={num_samples} must be divisible by the mesh's "
          f"data-parallel size {dp} (mesh axes {dict(mesh.shape)})")


# ----------------------------------------------------------------------------
# Cache sizes.
# ----------------------------------------------------------------------------


def cache_entries(model: arvm_lib.ARVM, cache: str = "ring") -> int:
  """Token-slot entries ``R`` of a cache kind (the start slot adds one)."""
  if cache == "ring":
    return arvm_lib.window_slots(model.width, model.tokens_per_pos,
                                 model.gamma, model.seq_len)
  if cache == "full":
    return max(model.seq_len - 1, 1)
  if cache == "none":
    return 0
  raise ValueError(f"cache={cache!r} must be one of {list(CACHE_KINDS)}")


def cache_bytes(model: arvm_lib.ARVM, num_samples: int, cache: str = "ring",
                cfg_scale: float = 0.0) -> int:
  """Bytes of the decode cache (keys, values and slot tags) for a batch.

  With ``cfg_scale > 0`` the cache holds two rows per sample.
  """
  if cache == "none":
    return 0
  rows = num_samples * (2 if cfg_scale > 0 else 1)
  return arvm_lib.cache_nbytes(model, rows, cache_entries(model, cache))


# ----------------------------------------------------------------------------
# Teacher-forced logits through the cache (tests, scoring).
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "cache"))
def teacher_forced_logits(model: arvm_lib.ARVM, params: Any,
                          tokens: jax.Array, labels: jax.Array | None = None,
                          *, cache: str = "ring") -> jax.Array:
  """Logits of every token computed slot by slot through the KV cache.

  Must equal ``model.apply(params, tokens, labels)`` (the full forward pass).

  Args:
    model: the ARVM.
    params: its variables (``{'params': ...}``).
    tokens: [B, T] or [B, H, W, Tp] int32 tokens.
    labels: [B] labels or None.
    cache: ``'ring'`` or ``'full'``.

  Returns:
    [B, T, 2**g] float32 logits.
  """
  if cache not in ("ring", "full"):
    raise ValueError(f"cache={cache!r} must be 'ring' or 'full'")
  batch = tokens.shape[0]
  tokens = tokens.reshape(batch, -1).astype(jnp.int32)  # [B, T]
  state = arvm_lib.init_cache(model, batch, cache_entries(model, cache))
  prev = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), tokens[:, :-1]],
                         axis=1)  # [B, T]: token slot-1 (unused at slot 0)

  def step(state, inputs):
    slot, prev_tokens = inputs
    logits, state = model.apply(params, prev_tokens, slot, state, labels,
                                method=arvm_lib.ARVM.decode)
    return state, logits

  slots = jnp.arange(model.seq_len, dtype=jnp.int32)
  _, logits = jax.lax.scan(step, state, (slots, prev.T))  # [T, B, V]
  return jnp.swapaxes(logits, 0, 1)  # [B, T, V]


# ----------------------------------------------------------------------------
# Samplers.
# ----------------------------------------------------------------------------


def _cached_sampler(model: arvm_lib.ARVM, params: Any, rng: jax.Array,
                    labels: jax.Array | None, *, num_samples: int,
                    temperature: float, top_k: int, top_p: float,
                    cfg_scale: float, cache: str,
                    mesh: Mesh | None) -> jax.Array:
  """Prefill + fori_loop over slots 1..T-1 with the KV cache: [B, T]."""
  t = model.seq_len
  keys = constrain(sample_keys(rng, num_samples), mesh)  # [B]
  row_labels = constrain(guidance_labels(model, labels, cfg_scale), mesh)
  rows = num_samples * (2 if cfg_scale > 0 else 1)
  state = arvm_lib.init_cache(model, rows, cache_entries(model, cache))
  state = {"slots": state["slots"],
           "layers": constrain_cache(state["layers"], mesh)}
  draw = functools.partial(draw_token, temperature=temperature, top_k=top_k,
                           top_p=top_p)

  def run(prev, slot, state):
    logits, state = model.apply(params, prev, slot, state, row_labels,
                                method=arvm_lib.ARVM.decode)
    state = {"slots": state["slots"],
             "layers": constrain_cache(state["layers"], mesh)}
    return guide(logits, cfg_scale), state  # [B, V]

  # Prefill: the start slot gives the distribution of token 0.
  logits, state = run(jnp.zeros((rows,), jnp.int32), jnp.int32(0), state)
  tokens = jnp.zeros((num_samples, t), jnp.int32)
  tokens = tokens.at[:, 0].set(draw(keys, 0, logits))
  tokens = constrain(tokens, mesh)  # [B, T]

  def body(slot, carry):
    tokens, state = carry
    prev = jax.lax.dynamic_index_in_dim(tokens, slot - 1, 1, keepdims=False)
    logits, state = run(guidance_rows(prev, cfg_scale), slot, state)
    new = draw(keys, slot, logits)  # [B]
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, new, slot, 1)
    return constrain(tokens, mesh), state

  tokens, _ = jax.lax.fori_loop(1, t, body, (tokens, state))
  return tokens


def _recompute_loop(model: arvm_lib.ARVM, params: Any, keys: jax.Array,
                    tokens: jax.Array, labels: jax.Array | None,
                    first: jax.Array, num_steps: jax.Array, *,
                    temperature: float, top_k: int, top_p: float,
                    cfg_scale: float, mesh: Mesh | None) -> jax.Array:
  """Tokens ``first .. first+num_steps-1`` by full forward passes: [B, T]."""
  row_labels = guidance_labels(model, labels, cfg_scale)
  draw = functools.partial(draw_token, temperature=temperature, top_k=top_k,
                           top_p=top_p)

  def body(i, tokens):
    rows = constrain(guidance_rows(tokens, cfg_scale), mesh)  # [B or 2B, T]
    logits = model.apply(params, rows, row_labels)  # [rows, T, V]
    logits = jax.lax.dynamic_index_in_dim(logits, i, 1, keepdims=False)
    new = draw(keys, i, guide(logits, cfg_scale))  # [B]
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, new, i, 1)
    return constrain(tokens, mesh)

  return jax.lax.fori_loop(first, first + num_steps, body,
                           constrain(tokens, mesh))


@functools.lru_cache(maxsize=64)
def make_sampler(model: arvm_lib.ARVM, num_samples: int, *,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 cfg_scale: float = 0.0, cache: str = "ring",
                 mesh: Mesh | None = None, order: str = "raster"):
  """The jitted sampler behind :func:`sample_tokens` (memoised per args).

  Returns ``fn(params, rng, labels) -> [B, T] int32 tokens``; ``labels`` is
  None for an unconditional model and a [B] int32 array (null label
  ``num_classes`` for unconditional rows) otherwise. With ``mesh`` the caller
  places params/rng replicated and labels batch-sharded (as
  :func:`sample_tokens` does). Useful for ahead-of-time compilation:
  ``make_sampler(...).lower(params, rng, labels).compile()``. Arguments are
  not validated here; :func:`sample_tokens` does that.
  """
  settings = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                  cfg_scale=cfg_scale, mesh=mesh)

  def fn(params, rng, labels):
    if order == "wavefront":
      return wavefront.wavefront_tokens(model, params, rng, labels,
                                        num_samples=num_samples, **settings)
    if cache == "none":
      keys = constrain(sample_keys(rng, num_samples), mesh)
      tokens = jnp.zeros((num_samples, model.seq_len), jnp.int32)
      return _recompute_loop(model, params, keys, tokens, labels,
                             jnp.int32(0), jnp.int32(model.seq_len),
                             **settings)
    return _cached_sampler(model, params, rng, labels,
                           num_samples=num_samples, cache=cache, **settings)

  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=sharding_lib.batch_sharding(mesh))


def _place(params: Any, rng: jax.Array, labels: jax.Array | None,
           mesh: Mesh | None) -> tuple[Any, jax.Array, jax.Array | None]:
  """Replicates params/rng and batch-shards labels on ``mesh``."""
  if mesh is None:
    return params, rng, labels
  rep = sharding_lib.replicated(mesh)
  params = jax.device_put(params, rep)
  rng = jax.device_put(rng, rep)
  if labels is not None:
    labels = jax.device_put(labels, sharding_lib.batch_sharding(mesh))
  return params, rng, labels


def sample_tokens(model: arvm_lib.ARVM, params: Any, rng: jax.Array,
                  num_samples: int, labels: Any = None, *,
                  temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, cfg_scale: float = 0.0,
                  cache: str = "ring", mesh: Mesh | None = None,
                  order: str = "raster") -> jax.Array:
  """Samples token grids from the ARVM.

  Args:
    model: the ARVM module.
    params: its variables (``{'params': ...}``).
    rng: a PRNG key; sample ``b`` token ``i`` uses
      ``fold_in(fold_in(rng, b), i)``.
    num_samples: batch size B (divisible by the data-parallel size of
      ``mesh``).
    labels: [B] int class ids for a conditional model (None = null label).
    temperature: softmax temperature; ``<= 0`` is greedy (argmax).
    top_k: keep the k most likely values (0 = off).
    top_p: nucleus mass (1.0 = off).
    cfg_scale: classifier-free guidance scale; > 0 runs (label, null) rows
      and samples from ``uncond + cfg_scale * (cond - uncond)``.
    cache: ``'ring'`` | ``'full'`` | ``'none'`` (see the module docstring);
      raster order only.
    mesh: optional mesh; the batch is split over its data axes.
    order: ``'raster'`` (one token per step) or ``'wavefront'`` (every
      position of a front per step, :mod:`mesp_jax.sample.wavefront`; the
      same tokens for a seed).

  Returns:
    [B, H, W, Tp] int32 tokens.
  """
  _check_args(model, num_samples, labels, cache, cfg_scale, top_k, top_p, mesh,
              order)
  fn = make_sampler(model, int(num_samples), temperature=float(temperature),
                    top_k=int(top_k), top_p=float(top_p),
                    cfg_scale=float(cfg_scale), cache=cache, mesh=mesh,
                    order=order)
  labels = labels_or_null(model, labels, num_samples)
  params, rng, labels = _place(params, rng, labels, mesh)
  tokens = fn(params, rng, labels)  # [B, T]
  return tokens.reshape(num_samples, model.height, model.width,
                        model.tokens_per_pos)


@functools.partial(
    jax.jit,
    static_argnames=("model", "temperature", "top_k", "top_p", "cfg_scale"))
def recompute_steps(model: arvm_lib.ARVM, params: Any, rng: jax.Array,
                    tokens: jax.Array, labels: jax.Array | None,
                    first: jax.Array, num_steps: jax.Array, *,
                    temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, cfg_scale: float = 0.0) -> jax.Array:
  """Runs uncached decode steps ``first .. first+num_steps-1`` on a prefix.

  The ``cache='none'`` sampler is this loop from 0 over all T tokens; the
  benchmark times a slice of its last steps. ``first`` and ``num_steps`` are
  traced, so one compilation serves every slice.

  Args:
    tokens: [B, T] tokens whose entries before ``first`` are the prefix.
    labels: [B] labels (conditional model) or None.

  Returns:
    [B, T] tokens with entries ``first .. first+num_steps-1`` sampled.
  """
  batch = tokens.shape[0]
  labels = labels_or_null(model, labels, batch)
  keys = sample_keys(rng, batch)
  return _recompute_loop(model, params, keys, tokens.reshape(batch, -1),
                         labels, jnp.asarray(first, jnp.int32),
                         jnp.asarray(num_steps, jnp.int32),
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         cfg_scale=cfg_scale, mesh=None)
