"""Tests of the jitted ARVM sampler against the full forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arvm_testing import random_setup, tiny_arvm

from mesp_jax.base import sharding
from mesp_jax.sample import decode

# Cached and full-forward logits differ only by float32 summation order.
ATOL = RTOL = 1e-4


_model = tiny_arvm
_setup = random_setup


@pytest.mark.parametrize("grid,bits,overrides", [
    ((3, 4), 3, dict(group=3, gamma="global")),                 # g = C
    ((5, 4), 4, dict(group=2, gamma=1, num_classes=3)),         # g < C, label
    ((4, 3), 6, dict(group=2, gamma=0, embed="linear")),        # Tp = 3
    ((6, 3), 2, dict(group=2, gamma=None, num_classes=2)),      # global, label
])
def test_cached_logits_equal_full_forward(grid, bits, overrides):
  model = _model(grid, bits, **overrides)
  params, tokens, labels = _setup(model)
  full = jax.jit(model.apply)(params, tokens, labels)  # [B, T, V]
  ring = decode.teacher_forced_logits(model, params, tokens, labels,
                                      cache="ring")
  np.testing.assert_allclose(ring, full, atol=ATOL, rtol=RTOL)
  if model.gamma is not None:
    # Finite gamma: the ring wraps, and the full cache agrees too.
    assert decode.cache_entries(model, "ring") < model.seq_len - 1
    cached = decode.teacher_forced_logits(model, params, tokens, labels,
                                          cache="full")
    np.testing.assert_allclose(cached, full, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(ring, cached, atol=ATOL, rtol=RTOL)


def test_ring_cache_size_independent_of_height():
  small = _model((4, 5), 4, gamma=1)
  tall = _model((6, 5), 4, gamma=1)
  assert decode.cache_entries(small, "ring") == (1 * 5 + 1 + 1) * 2
  assert (decode.cache_bytes(small, 8, "ring") ==
          decode.cache_bytes(tall, 8, "ring"))
  assert (decode.cache_bytes(small, 8, "full") <
          decode.cache_bytes(tall, 8, "full"))
  # Guidance doubles the rows; 'none' keeps no cache.
  keys_values = 2 * 2 * 8 * (1 + 14) * 32 * 4  # k,v x layers x B x L x D x 4B
  assert decode.cache_bytes(small, 8, "ring") == keys_values + (1 + 14) * 4
  assert (decode.cache_bytes(small, 8, "ring", cfg_scale=2.0) ==
          2 * keys_values + (1 + 14) * 4)
  assert decode.cache_bytes(small, 8, "none") == 0


def test_samplers_agree_ring_and_none():
  """Same seed: the ring cache and full recompute draw the same tokens."""
  model = _model((4, 4), 4, gamma=1, num_classes=3, num_layers=1)
  params, _, _ = _setup(model)
  labels = jnp.array([0, 1, 2, 1])
  kw = dict(temperature=0.9, top_k=3, top_p=0.95, cfg_scale=1.5)
  rng = jax.random.key(7)
  ring = decode.sample_tokens(model, params, rng, 4, labels, cache="ring",
                              **kw)
  none = decode.sample_tokens(model, params, rng, 4, labels, cache="none",
                              **kw)
  assert ring.shape == (4, 4, 4, 2) and ring.dtype == jnp.int32
  np.testing.assert_array_equal(ring, none)
  assert int(ring.min()) >= 0 and int(ring.max()) < model.vocab_size


def test_greedy_decoding_is_argmax_of_full_forward():
  model = _model((3, 3), 4, gamma=1, num_layers=1)
  params, _, _ = _setup(model)
  tokens = decode.sample_tokens(model, params, jax.random.key(0), 2,
                                temperature=0.0)
  flat = tokens.reshape(2, -1)
  logits = jax.jit(model.apply)(params, flat)
  np.testing.assert_array_equal(jnp.argmax(logits, -1), flat)


def test_process_logits_top_k_top_p_against_numpy():
  logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05],
                            [0.05, 0.1, 0.6, 0.2, 0.05]], np.float32))
  out = np.asarray(decode.process_logits(jnp.asarray(logits), top_k=2))
  assert (np.isfinite(out).sum(-1) == 2).all()
  np.testing.assert_array_equal(np.isfinite(out[0]),
                                [True, True, False, False, False])
  # Nucleus: smallest set reaching p. Row 0 needs 0.5+0.2 >= 0.7 -> 2 values
  # at p=0.7, 3 at p=0.71; row 1 needs 0.6+0.2 -> 2 values.
  out = np.asarray(decode.process_logits(jnp.asarray(logits), top_p=0.7))
  np.testing.assert_array_equal(np.isfinite(out).sum(-1), [2, 2])
  out = np.asarray(decode.process_logits(jnp.asarray(logits), top_p=0.71))
  np.testing.assert_array_equal(np.isfinite(out).sum(-1), [3, 2])
  out = np.asarray(decode.process_logits(jnp.asarray(logits),
                                         temperature=2.0))
  np.testing.assert_allclose(out, logits / 2.0, rtol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8,
                    reason="needs XLA_FLAGS=--xla_force_host_platform_"
                    "device_count=8")
def test_same_samples_on_one_and_eight_devices():
  model = _model((3, 4), 4, gamma=1, num_classes=2, num_layers=1)
  params, _, _ = _setup(model)
  labels = jnp.array([0, 1, 2, 0, 1, 1, 0, 2])
  kw = dict(temperature=1.0, top_k=3, cfg_scale=2.0)
  rng = jax.random.key(3)
  one = decode.sample_tokens(model, params, rng, 8, labels,
                             mesh=sharding.make_mesh(
                                 devices=jax.devices()[:1]), **kw)
  mesh = sharding.make_mesh()
  eight = decode.sample_tokens(model, params, rng, 8, labels, mesh=mesh, **kw)
  assert len(eight.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(one), np.asarray(eight))
  with pytest.raises(ValueError, match="data-parallel size 8"):
    decode.sample_tokens(model, params, rng, 4, labels[:4], mesh=mesh)


def test_bad_arguments():
  model = _model((3, 3), 4)
  params, _, _ = _setup(model)
  rng = jax.random.key(0)
  with pytest.raises(ValueError, match="cache"):
    decode.sample_tokens(model, params, rng, 2, cache="paged")
  with pytest.raises(ValueError, match="unconditional"):
    decode.sample_tokens(model, params, rng, 2, jnp.array([0, 1]))
  with pytest.raises(ValueError, match="cfg_scale"):
    decode.sample_tokens(model, params, rng, 2, cfg_scale=2.0)
