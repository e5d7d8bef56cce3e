"""Tiny ARVMs with random parameters, shared by the decoding tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mesp_jax.base import sharding
from mesp_jax.models import arvm


def tiny_arvm(grid=(4, 4), bits=4, **overrides) -> arvm.ARVM:
  base = dict(group=2, gamma=1, num_layers=2, d_model=32, num_heads=4,
              mlp_ratio=2.0, num_classes=0, embed="linear+table",
              dtype="float32")
  base.update(overrides)
  return arvm.build_arvm(ml_collections.ConfigDict(base), grid, bits)


def random_setup(model: arvm.ARVM, batch: int = 2, seed: int = 0):
  """(params, tokens [B, T], labels or None) drawn from ``seed``.

  Random normal parameters from the abstract shapes: as good as a real init
  for equivalence tests and without compiling one init per model.
  """
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, model.vocab_size,
                                    (batch, model.seq_len)), jnp.int32)
  labels = None
  if model.num_classes:
    labels = jnp.asarray(rng.integers(0, model.num_classes + 1, (batch,)),
                         jnp.int32)
  shapes = sharding.unbox(
      jax.eval_shape(model.init, jax.random.key(seed), tokens, labels))
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), shapes)
  return params, tokens, labels
