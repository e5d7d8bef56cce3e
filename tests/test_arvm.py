"""Tests of the neural gamma-ARVM: mask, locality, kernel target, loss."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesp_jax.base.gamma import parse_gamma
from mesp_jax.models import arvm, arvm_loss


def _cfg(**overrides) -> ml_collections.ConfigDict:
  base = dict(group=2, gamma=1, num_layers=2, d_model=32, num_heads=4,
              mlp_ratio=2.0, num_classes=0, embed="linear+table",
              dtype="float32")
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def _random_params(model: arvm.ARVM, *args, seed: int = 0):
  """Normal(0, 0.3) parameters of the right shapes (no init compilation)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(seed), *args)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), shapes)


def _brute_force_mask(h: int, w: int, tp: int, gamma) -> np.ndarray:
  """Double loop straight from the definition (slot s holds token s-1)."""
  t = h * w * tp
  mask = np.zeros((t, t), bool)
  for i in range(t):
    qr, qc = divmod(i // tp, w)
    for s in range(t):
      if s == 0:
        mask[i, s] = True
        continue
      j = s - 1
      if j >= i:
        continue
      kr, kc = divmod(j // tp, w)
      if gamma is None or max(abs(qr - kr), abs(qc - kc)) <= gamma:
        mask[i, s] = True
  return mask


@pytest.mark.parametrize("h,w,tp,gamma", [
    (3, 4, 1, None), (4, 3, 2, "global"), (4, 5, 1, 0), (5, 4, 3, 1),
    (6, 6, 1, 2), (3, 3, 2, 10),
])
def test_gamma_mask_matches_brute_force(h, w, tp, gamma):
  got = arvm.gamma_mask(h, w, tp, gamma)
  want = _brute_force_mask(h, w, tp, parse_gamma(gamma))
  assert got.shape == (h * w * tp, h * w * tp)
  np.testing.assert_array_equal(got, want)


def test_window_slots_cover_the_mask():
  """The ring length covers the furthest visible slot of every query."""
  for h, w, tp, gamma in [(6, 5, 2, 1), (6, 6, 1, 2), (5, 4, 3, 0)]:
    mask = _brute_force_mask(h, w, tp, gamma)
    r = arvm.window_slots(w, tp, gamma, h * w * tp)
    for i in range(h * w * tp):
      visible = np.nonzero(mask[i, 1:])[0] + 1
      if visible.size:
        assert i - visible.min() < r


def test_locality_perturbation():
  """Tokens outside the window (or later) leave logits unchanged; inside not."""
  h = w = 5
  model = arvm.build_arvm(_cfg(gamma=1), (h, w), bits=4)  # Tp = 2
  tp = model.tokens_per_pos
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model.vocab_size, (1, model.seq_len))
  params = _random_params(model, jnp.asarray(tokens))
  apply = jax.jit(model.apply)
  base = apply(params, jnp.asarray(tokens))  # [1, T, V]

  def index(r, c, k):
    return (r * w + c) * tp + k

  def moved(query, j):
    other = tokens.copy()
    other[0, j] = (other[0, j] + 1) % model.vocab_size
    out = apply(params, jnp.asarray(other))
    return float(jnp.max(jnp.abs(out[0, query] - base[0, query])))

  # Outside the window (two rows up, two columns left), the token itself,
  # and later tokens: no effect, however many layers.
  query = index(3, 2, 1)
  for j in [index(1, 2, 0), index(2, 0, 1), index(3, 0, 0),
            index(3, 2, 1), index(3, 3, 0), index(4, 2, 0)]:
    assert moved(query, j) == 0.0, j
  for j in [index(2, 1, 0), index(2, 3, 1), index(3, 1, 1), index(3, 2, 0)]:
    assert moved(query, j) > 1e-6, j
  # Raster order: the token just before a row start is far away.
  query = index(3, 0, 0)
  assert moved(query, query - 1) == 0.0  # (2, 4, 1): distance 4 > gamma
  assert moved(query, index(2, 1, 1)) > 1e-6


@settings(max_examples=40, deadline=None)
@given(group=st.integers(1, 8), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_kernel_target_matches_numpy(group, p, seed):
  tokens = np.random.default_rng(seed).integers(0, 2**group, (3,))
  got = np.asarray(arvm_loss.kernel_target(jnp.asarray(tokens), group, p))
  want = np.zeros((3, 2**group))
  for n, z in enumerate(tokens):
    for v in range(2**group):
      d = bin(int(v) ^ int(z)).count("1")
      want[n, v] = p**d * (1 - p)**(group - d)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_p_flip_closed_form():
  for sigma in (0.1, 0.5, 1.0, 3.0):
    want = 0.5 * math.erfc(1.0 / (sigma * math.sqrt(2.0)))
    np.testing.assert_allclose(float(arvm_loss.p_flip(sigma)), want, rtol=1e-5,
                               atol=1e-30)


def test_arvm_loss_metrics_match_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 8)).astype(np.float32)
  tokens = rng.integers(0, 8, (2, 6))
  loss, m = arvm_loss.arvm_loss(jnp.asarray(logits), jnp.asarray(tokens))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.mean(np.take_along_axis(logp, tokens[..., None], -1))
  np.testing.assert_allclose(float(loss), nll, rtol=1e-5)
  np.testing.assert_allclose(float(m["nll"]), nll, rtol=1e-5)
  np.testing.assert_allclose(float(m["bits_per_token"]), nll / np.log(2),
                             rtol=1e-5)
  np.testing.assert_allclose(float(m["bits_per_image"]),
                             6 * nll / np.log(2), rtol=1e-5)
  acc = np.mean(logits.argmax(-1) == tokens)
  np.testing.assert_allclose(float(m["accuracy"]), acc)
  # Kernel target: soft cross-entropy; p_flip = 0 is the one-hot loss.
  p = 0.2
  soft, _ = arvm_loss.arvm_loss(jnp.asarray(logits), jnp.asarray(tokens),
                           "kernel", group=3, p_flip=p)
  target = np.asarray(arvm_loss.kernel_target(jnp.asarray(tokens), 3, p))
  np.testing.assert_allclose(float(soft), -np.mean((target * logp).sum(-1)),
                             rtol=1e-5)
  zero, _ = arvm_loss.arvm_loss(jnp.asarray(logits), jnp.asarray(tokens),
                           "kernel", group=3, p_flip=0.0)
  np.testing.assert_allclose(float(zero), nll, rtol=1e-5)


@pytest.mark.parametrize("field,value,bits", [
    ("group", 3, 4), ("d_model", 30, 4), ("gamma", "local", 4),
    ("gamma", -1, 4), ("embed", "table", 4), ("dtype", "float16", 4),
    ("num_layers", 0, 4),
])
def test_build_arvm_rejects_bad_values(field, value, bits):
  with pytest.raises(ValueError, match=field):
    arvm.build_arvm(_cfg(**{field: value}), (4, 4), bits)


def test_conditional_bfloat16_forward():
  model = arvm.build_arvm(_cfg(num_classes=3, gamma="global", group=4,
                               dtype="bfloat16", embed="linear"), (3, 3), 4)
  assert model.gamma is None and model.tokens_per_pos == 1
  tokens = jnp.zeros((2, 3, 3, 1), jnp.int32)
  labels = jnp.array([0, 3])
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, labels)
  dtypes = {x.dtype for x in jax.tree.leaves(shapes)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  params = _random_params(model, tokens, labels)
  logits = jax.jit(model.apply)(params, tokens, labels)
  assert logits.shape == (2, 9, 16) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  # The label drives the start slot: different labels, different logits.
  assert float(jnp.max(jnp.abs(logits[0] - logits[1]))) > 0


def test_loss_falls_with_adam():
  model = arvm.build_arvm(_cfg(gamma=1, num_classes=2, num_layers=1), (4, 4),
                         bits=4)
  # A learnable pattern: the token is a function of its index.
  pattern = (3 * np.arange(model.seq_len)) % model.vocab_size
  tokens = jnp.asarray(np.tile(pattern, (4, 1)))
  labels = jnp.array([0, 1, 0, 1])
  params = _random_params(model, tokens, labels)
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      return arvm_loss.arvm_loss(model.apply(p, tokens, labels), tokens, "kernel",
                            group=2, p_flip=0.05)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(15):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.6 * losses[0], losses
