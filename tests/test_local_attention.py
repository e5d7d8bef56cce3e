"""Block-local attention equals dense masked attention under the gamma mask.

Tolerances: float32 throughout; values and gradients agree to atol = rtol =
1e-5 (the two paths differ only in summation order).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesp_jax.models import arvm, arvm_loss
from mesp_jax.models import local_attention as la

ATOL = RTOL = 1e-5


def _dense_attention(q, k, v, mask):
  """The dense path of ``arvm.Attention``: q [B,T,h,hd], k/v [B,h,T,hd]."""
  logits = jnp.einsum("bshd,bhld->bhsl", q, k)
  logits = logits.astype(jnp.float32) / math.sqrt(q.shape[-1])
  logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhsl,bhld->bshd", weights, v)  # [B, T, h, hd]


def _blocked_to_dense(h, w, tp, gamma) -> np.ndarray:
  """Scatters the in-block and row-validity masks back to a [T, T] mask."""
  r_len = w * tp
  t = h * r_len
  rows = la.window_rows(h, gamma)
  block = (la.in_block_mask(w, tp, gamma, rows)[None]
           & la.row_valid_mask(h, w, tp, rows)[:, None])  # [H, R, 1 + nR]
  dense = np.zeros((t, t), bool)
  for r in range(h):
    for a in range(r_len):
      i = r * r_len + a
      dense[i, 0] |= block[r, a, 0]
      for g in range(rows):
        for c in range(r_len):
          if not block[r, a, 1 + g * r_len + c]:
            continue
          token = (r - rows + 1 + g) * r_len + c
          assert 0 <= token < t - 1, (r, a, g, c)
          dense[i, token + 1] = True
  return dense


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 5), w=st.integers(1, 5), tp=st.integers(1, 3),
       gamma=st.integers(0, 4))
def test_block_masks_reassemble_gamma_mask(h, w, tp, gamma):
  np.testing.assert_array_equal(_blocked_to_dense(h, w, tp, gamma),
                                arvm.gamma_mask(h, w, tp, gamma))


# (H, W, Tp, gamma): gamma 0..3; H < gamma + 1; W = 1; H = 1; Tp 1, 2, 3.
CASES = [
    (4, 5, 1, 0), (5, 3, 2, 1), (4, 4, 3, 2), (6, 5, 1, 3), (2, 4, 2, 3),
    (1, 6, 2, 1), (5, 1, 3, 1), (1, 1, 2, 0), (3, 2, 1, 2),
]


@pytest.mark.parametrize("h,w,tp,gamma", CASES)
def test_block_local_matches_dense(h, w, tp, gamma):
  batch, heads, hd = 2, 2, 4
  t = h * w * tp
  rng = np.random.default_rng(h * 1000 + w * 100 + tp * 10 + gamma)
  q = jnp.asarray(rng.normal(size=(batch, t, heads, hd)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(batch, heads, t, hd)), jnp.float32)
          for _ in range(2))
  cot = jnp.asarray(rng.normal(size=(batch, t, heads, hd)), jnp.float32)
  mask = jnp.asarray(arvm.gamma_mask(h, w, tp, gamma))

  def local(q, k, v):
    return la.block_local_attention(q, k, v, height=h, width=w,
                                    tokens_per_pos=tp, gamma=gamma)

  @jax.jit
  def both(q, k, v):
    out = []
    for f in (local, lambda q, k, v: _dense_attention(q, k, v, mask)):
      y, vjp = jax.vjp(f, q, k, v)
      out.append((y, vjp(cot)))
    return out

  (y_loc, g_loc), (y_den, g_den) = both(q, k, v)
  assert y_loc.shape == (batch, t, heads, hd)
  np.testing.assert_allclose(y_loc, y_den, atol=ATOL, rtol=RTOL)
  for name, a, b in zip("qkv", g_loc, g_den, strict=True):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL, err_msg=name)


def test_resolve_attention():
  # 8x8 grid, Tp 2 (T = 128): (3 + 1) * 16 + 1 = 65 < 128.
  assert la.resolve_attention("auto", 8, 8, 2, 3) == "block_local"
  assert la.resolve_attention("auto", 4, 8, 2, 3) == "dense"  # 65 > 64
  assert la.resolve_attention("auto", 8, 8, 2, None) == "dense"
  assert la.resolve_attention("block_local", 8, 8, 2, None) == "dense"
  assert la.resolve_attention("block_local", 2, 2, 1, 5) == "block_local"
  assert la.resolve_attention("dense", 64, 64, 1, 3) == "dense"
  with pytest.raises(ValueError, match="attention="):
    la.resolve_attention("sparse", 8, 8, 2, 3)
  with pytest.raises(ValueError, match="attention="):
    arvm.ARVM(height=2, width=2, bits=2, group=1, gamma=1, num_layers=1,
              d_model=16, num_heads=2, attention="sparse")


def _random_params(model, *args, seed=0):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(seed), *args)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), shapes)


@pytest.mark.parametrize("h,w,bits,group,gamma,num_classes", [
    (5, 4, 4, 2, 1, 3),  # Tp 2, conditional
    (3, 5, 3, 1, 2, 0),  # Tp 3, H < gamma + 1
    (4, 4, 2, 2, None, 0),  # global gamma: block_local falls back to dense
])
def test_arvm_block_local_matches_dense(h, w, bits, group, gamma,
                                        num_classes):
  kw = dict(height=h, width=w, bits=bits, group=group, gamma=gamma,
            num_layers=2, d_model=16, num_heads=2, mlp_ratio=2.0,
            num_classes=num_classes, embed="linear+table")
  dense = arvm.ARVM(**kw, attention="dense")
  local = arvm.ARVM(**kw, attention="block_local")
  batch = 2
  rng = np.random.default_rng(7)
  tokens = jnp.asarray(rng.integers(0, 2**group, (batch, dense.seq_len)),
                       jnp.int32)
  labels = (jnp.asarray([0, num_classes], jnp.int32) if num_classes else None)
  shapes = [jax.eval_shape(m.init, jax.random.key(0), tokens, labels)
            for m in (dense, local)]
  assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
  assert jax.tree.map(lambda s: s.shape, shapes[0]) == jax.tree.map(
      lambda s: s.shape, shapes[1])
  params = _random_params(dense, tokens, labels)

  @jax.jit
  def both(params):
    out = []
    for m in (local, dense):
      def loss(p, m=m):
        logits = m.apply(p, tokens, labels)
        return arvm_loss.arvm_loss(logits, tokens)[0], logits
      (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
      out.append((logits, grads))
    return out

  (lg_loc, gr_loc), (lg_den, gr_den) = both(params)
  np.testing.assert_allclose(lg_loc, lg_den, atol=ATOL, rtol=RTOL)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL),
      gr_loc, gr_den)
