"""Gradient accumulation, EMA and bf16 training against independent references."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from arvm_testing import random_setup, tiny_arvm

from mesp_jax.base import sharding
from mesp_jax.models import arvm_loss
from mesp_jax.train import loop


def _arvm_loss_fn(model):
  """The ARVM's training loss with no randomness (no label dropout)."""
  def loss_fn(params, batch, rng, step):
    del rng, step
    logits = model.apply(params, batch["tokens"], batch["label"])
    return arvm_loss.arvm_loss(logits, batch["tokens"], "onehot", model.group,
                               0.0)
  return loss_fn


def _setup(batch=32):
  model = tiny_arvm(num_classes=5)
  params, tokens, labels = random_setup(model, batch=batch, seed=1)
  return model, params, {"tokens": tokens, "label": labels}  # [B, T], [B]


def test_micro_batches_are_strided_rows():
  x = np.arange(24).reshape(12, 2)
  parts = np.asarray(loop.micro_batches({"x": jnp.asarray(x)}, 3)["x"])
  for i in range(3):
    np.testing.assert_array_equal(parts[i], x[i::3])


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_whole_batch(k):
  """k micro-batches on 8 devices == value_and_grad on the whole batch.

  Tolerance: 1e-5 relative (float32 summation order only)."""
  model, params, batch = _setup()
  loss_fn = _arvm_loss_fn(model)
  mesh = sharding.make_mesh()
  sharded = sharding.shard_batch(batch, mesh)
  rng = jax.random.key(0)
  (loss_ref, _), g_ref = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch, rng, 0)
  (loss, metrics), grads = jax.jit(
      lambda p, b: loop.accumulated_grads(loss_fn, p, b, rng, 0, k))(
          params, sharded)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["bits_per_token"],
                             metrics["nll"] / np.log(2), rtol=1e-6)


def test_train_step_with_accumulation_matches_whole_batch():
  """Four accumulated micro-batches update the parameters as the whole
  batch does. The update is plain SGD at rate 1 (new - old = -gradient), so
  the comparison sees the gradients themselves: Adam's first step divides
  each gradient by its own size, and turned float round-off on gradients
  near zero into update differences of 2e-5 (2 of 64 entries, an Intel
  AVX-512 CPU)."""
  model, params, batch = _setup()
  loss_fn = _arvm_loss_fn(model)
  tx = optax.sgd(1.0)
  state = loop.init_train_state(params, tx)
  rng = jax.random.key(0)
  one, m1 = jax.jit(loop.make_train_step(loss_fn, tx))(state, batch, rng)
  four, m4 = jax.jit(loop.make_train_step(loss_fn, tx, grad_accum_steps=4))(
      state, batch, rng)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  for a, b, p in zip(jax.tree.leaves(four.params), jax.tree.leaves(one.params),
                     jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(np.asarray(a) - p, np.asarray(b) - p,
                               rtol=1e-4, atol=1e-7)
    assert np.abs(np.asarray(b) - p).max() > 0  # a real update


def test_ema_follows_the_closed_form():
  """ema_t = d_t ema_{t-1} + (1 - d_t) p_t, d_t = min(decay, (1+t)/(10+t))."""
  model, params, batch = _setup(batch=8)
  loss_fn = _arvm_loss_fn(model)
  tx = optax.sgd(0.1)
  decay = 0.9
  state = loop.init_train_state(params, tx, ema_decay=decay)
  step = jax.jit(loop.make_train_step(loss_fn, tx, ema_decay=decay))
  ema = jax.tree.map(np.asarray, params)
  for t in range(4):
    state, _ = step(state, batch, jax.random.key(0))
    d = min(decay, (1 + t) / (10 + t))
    ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * np.asarray(p), ema,
                       state.params)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert state.inference_params is state.ema_params


def test_bf16_loss_close_to_float32():
  """The same parameters and batch: bf16 activations change the loss by
  under 2 % (relative)."""
  model32 = tiny_arvm(num_classes=5)
  model16 = tiny_arvm(num_classes=5, dtype="bfloat16")
  params, tokens, labels = random_setup(model32, batch=16, seed=2)
  batch = {"tokens": tokens, "label": labels}
  l32, _ = _arvm_loss_fn(model32)(params, batch, None, 0)
  l16, _ = _arvm_loss_fn(model16)(params, batch, None, 0)
  assert float(l16) != float(l32)
  np.testing.assert_allclose(float(l16), float(l32), rtol=0.02)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32


def test_batch_must_divide_by_accumulation(tmp_path):
  config = ml_collections.ConfigDict(dict(
      seed=0, train=dict(batch_size=12, num_steps=1, learning_rate=1e-3,
                         grad_accum_steps=5)))
  task = loop.Task(name="t", init_params=None, loss_fn=None, eval_fn=None,
                   meta={}, train_batches=iter([]))
  with pytest.raises(ValueError, match="grad_accum_steps=5"):
    loop.train(config, str(tmp_path), task)
