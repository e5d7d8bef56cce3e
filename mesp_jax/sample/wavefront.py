"""Exact wavefront decoding for the neural gamma-ARVM.

In raster order with finite gamma, the window of position ``(r, c)`` holds
only positions with a smaller wavefront index ``r * (gamma + 1) + c``
(:mod:`mesp_jax.models.arvm_geometry`), so every position on one front is
independent of the others given the earlier fronts. One decoding step draws
token ``k`` of every position on a front: ``Tp * (W + (H - 1) * (gamma + 1))``
sequential steps instead of ``Tp * H * W`` (32x32, gamma 5: 218 instead of
1024). Each token keeps its raster key ``fold_in(fold_in(rng, b), i)``
(:mod:`mesp_jax.sample.logits`), so both orders give the same samples for a
seed, up to float round-off deciding a near tie.

The KV cache keeps whole grid rows in a ring: token ``j`` sits at entry
``1 + j % (R * W * Tp)`` with ``R = min(H, rows of a front + gamma)``
(:func:`arvm_geometry.wavefront_cache_rows`; every row for global gamma),
entry 0 is the start slot and the last entry takes the writes of unused
lanes. For finite gamma ``R`` does not depend on the grid height, so neither
does the cache. The keys are stored transposed (:func:`init_cache`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mesp_jax.models import arvm as arvm_lib
from mesp_jax.models import arvm_geometry
from mesp_jax.sample import logits as logits_lib


def ring_entries(model: arvm_lib.ARVM) -> int:
  """Token entries of the wavefront cache: ``R * W * Tp`` with ``R`` rows
  (:func:`arvm_geometry.wavefront_cache_rows`)."""
  rows = arvm_geometry.wavefront_cache_rows(model.height, model.width,
                                            model.gamma)
  return rows * model.width * model.tokens_per_pos


def cache_entries(model: arvm_lib.ARVM) -> int:
  """Entries :func:`arvm.init_cache` needs (start slot added by it): the ring
  plus one entry for unused lanes."""
  return ring_entries(model) + 1


def cache_bytes(model: arvm_lib.ARVM, num_samples: int,
                cfg_scale: float = 0.0) -> int:
  """Bytes of the wavefront cache (keys, values, slot tags) for a batch;
  two rows per sample when guiding."""
  rows = num_samples * (2 if cfg_scale > 0 else 1)
  return arvm_lib.cache_nbytes(model, rows, cache_entries(model))


def init_cache(model: arvm_lib.ARVM, rows: int) -> dict[str, Any]:
  """The empty wavefront cache for ``rows`` batch rows: the row ring plus a
  spare entry, with the keys stored transposed (several queries a step,
  :func:`arvm.init_cache`)."""
  return arvm_lib.init_cache(model, rows, cache_entries(model),
                             keys_transposed=True)


def num_steps(model: arvm_lib.ARVM) -> int:
  """Sequential decoding steps: ``Tp * (W + (H - 1) * (gamma' + 1))``."""
  return int(plan(model)["query"].shape[0])


@functools.lru_cache(maxsize=32)
def plan(model: arvm_lib.ARVM) -> dict[str, np.ndarray]:
  """Per step: the tokens to predict and the input slots to write first.

  Returns ``{'query': [S, n], 'slot': [S, n], 'entry': [S, n]}`` int32.
  Step ``s`` writes the tokens drawn at step ``s - 1`` (as input slots
  ``token + 1``; step 0 writes the start slot) and predicts ``query[s]``;
  -1 marks an unused lane, written to the spare last entry.
  """
  query = arvm_geometry.wavefront_schedule(
      model.height, model.width, model.tokens_per_pos, model.gamma)
  ring = ring_entries(model)
  spare = ring + 1
  prev = np.concatenate([np.full((1, query.shape[1]), -1, np.int32),
                         query[:-1]])  # [S, n] tokens drawn one step earlier
  slot = np.where(prev >= 0, prev + 1, -1)
  entry = np.where(prev >= 0, 1 + prev % ring, spare)
  slot[0, 0], entry[0, 0] = 0, 0  # the start slot
  return {"query": query, "slot": slot.astype(np.int32),
          "entry": entry.astype(np.int32)}


def _run(model: arvm_lib.ARVM, params: Any, keys: jax.Array | None,
         labels: jax.Array | None, teacher: jax.Array | None, *,
         temperature: float, top_k: int, top_p: float, cfg_scale: float,
         mesh: Mesh | None) -> tuple[jax.Array, jax.Array | None]:
  """The front loop: ([B, T] tokens, [B, T, V] logits when teacher-forced).

  ``teacher`` [B, T]: take these tokens instead of drawing (and return the
  logits of every token; ``keys`` is None); else draw with ``keys`` [B].
  """
  t = model.seq_len
  steps = plan(model)
  query = jnp.asarray(steps["query"])  # [S, n]
  slot = jnp.asarray(steps["slot"])
  entry = jnp.asarray(steps["entry"])
  batch = keys.shape[0] if teacher is None else teacher.shape[0]
  row_labels = logits_lib.constrain(
      logits_lib.guidance_labels(model, labels, cfg_scale), mesh)
  rows = batch * (2 if cfg_scale > 0 else 1)
  state = init_cache(model, rows)
  state = {"slots": state["slots"],
           "layers": logits_lib.constrain_cache(state["layers"], mesh)}
  draw = functools.partial(logits_lib.draw, temperature=temperature,
                           top_k=top_k, top_p=top_p)
  # Token buffers get a spare last column for the writes of unused lanes.
  tokens = jnp.zeros((batch, t + 1), jnp.int32)
  out = None
  if teacher is not None:
    out = jnp.zeros((batch, t + 1, model.vocab_size), jnp.float32)

  def body(s, carry):
    tokens, out, state = carry
    q, written = query[s], slot[s]  # [n]
    ctx = tokens[:, jnp.maximum(written - 1, 0)]  # [B, n]
    logits, state = model.apply(
        params, logits_lib.guidance_rows(ctx, cfg_scale), written, entry[s],
        q, state, row_labels, method=arvm_lib.ARVM.decode_slots)
    state = {"slots": state["slots"],
             "layers": logits_lib.constrain_cache(state["layers"], mesh)}
    logits = jax.vmap(logits_lib.guide, in_axes=(1, None), out_axes=1)(
        logits, cfg_scale)  # [B, n, V]
    column = jnp.where(q >= 0, q, t)  # [n]
    if teacher is None:
      new = jax.vmap(lambda i, lg: draw(keys, i, lg), in_axes=(0, 1),
                     out_axes=1)(jnp.maximum(q, 0), logits)  # [B, n]
    else:
      new = teacher[:, jnp.maximum(q, 0)]
      out = out.at[:, column].set(logits)
    tokens = logits_lib.constrain(tokens.at[:, column].set(new), mesh)
    return tokens, out, state

  tokens, out, _ = jax.lax.fori_loop(0, query.shape[0], body,
                                     (tokens, out, state))
  return tokens[:, :t], None if out is None else out[:, :t]


def wavefront_tokens(model: arvm_lib.ARVM, params: Any, rng: jax.Array,
                     labels: jax.Array | None, *, num_samples: int,
                     temperature: float, top_k: int, top_p: float,
                     cfg_scale: float, mesh: Mesh | None) -> jax.Array:
  """[B, T] tokens by wavefront decoding (traced; see ``decode.make_sampler``)."""
  keys = logits_lib.constrain(logits_lib.sample_keys(rng, num_samples), mesh)
  tokens, _ = _run(model, params, keys, labels, None,
                   temperature=temperature, top_k=top_k, top_p=top_p,
                   cfg_scale=cfg_scale, mesh=mesh)
  return tokens


@functools.partial(jax.jit, static_argnames=("model",))
def wavefront_logits(model: arvm_lib.ARVM, params: Any, tokens: jax.Array,
                     labels: jax.Array | None = None) -> jax.Array:
  """Teacher-forced logits of every token through the wavefront cache.

  Must equal ``model.apply(params, tokens, labels)`` (the full forward pass).

  Args:
    tokens: [B, T] or [B, H, W, Tp] int32 tokens.
    labels: [B] labels or None.

  Returns:
    [B, T, 2**g] float32 logits.
  """
  batch = tokens.shape[0]
  _, out = _run(model, params, None, labels,
                tokens.reshape(batch, -1).astype(jnp.int32), temperature=1.0,
                top_k=0, top_p=1.0, cfg_scale=0.0, mesh=None)
  return out
