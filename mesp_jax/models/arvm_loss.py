"""Training targets and loss of the neural gamma-ARVM's histogram head.

docs/method.md, section 'Neural gamma-ARVM': cross-entropy against the
one-hot true token or against the kernel-smoothed histogram ``K(. | z)`` of
the random-variable view (``p_flip = Phi(-1 / sigma_s)``); label dropout
trains the unconditional (null-label) model for classifier-free guidance.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mesp_jax.base import bits as bits_lib

TARGETS = ("onehot", "kernel")


def drop_labels(rng: jax.Array, labels: jax.Array, num_classes: int,
                drop_rate: float) -> jax.Array:
  """Replaces labels by the null id ``num_classes`` with prob ``drop_rate``.

  Used in training so classifier-free guidance has an unconditional model.
  """
  drop = jax.random.bernoulli(rng, drop_rate, labels.shape)
  return jnp.where(drop, num_classes, labels).astype(jnp.int32)


def p_flip(sigma_s: float | jax.Array) -> jax.Array:
  """Bit flip probability of the random-variable view: ``Phi(-1 / sigma_s)``."""
  sigma_s = jnp.asarray(sigma_s, jnp.float32)
  return jax.scipy.stats.norm.cdf(-1.0 / sigma_s)


def kernel_target(tokens: jax.Array, group: int,
                  p_flip: float | jax.Array) -> jax.Array:
  """The kernel-smoothed histogram ``K(v | z)`` over all ``2**g`` values v.

  ``K(v | z) = p^d (1 - p)^(g - d)`` with ``d = popcount(v xor z)``; each row
  sums to one.

  Args:
    tokens: [...] int32 observed tokens z.
    group: bits per token g.
    p_flip: per-bit flip probability p in [0, 1] (scalar).

  Returns:
    [..., 2**g] float32 target distribution.
  """
  values = jnp.arange(2**group, dtype=jnp.int32)
  d = bits_lib.hamming(tokens[..., None], values).astype(jnp.float32)
  p = jnp.asarray(p_flip, jnp.float32)
  return jnp.power(p, d) * jnp.power(1.0 - p, group - d)  # [..., V]


def arvm_loss(logits: jax.Array, tokens: jax.Array, target: str = "onehot",
              group: int | None = None,
              p_flip: float | jax.Array | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of the histogram head.

  Args:
    logits: [B, T, 2**g] model output.
    tokens: [B, T] or [B, H, W, Tp] true tokens (same order).
    target: ``'onehot'`` (the true token) or ``'kernel'`` (``kernel_target``
      of the true token with ``p_flip``).
    group: bits per token (needed for ``'kernel'``; defaults to log2 of the
      vocabulary).
    p_flip: per-bit flip probability for ``'kernel'``.

  Returns:
    (scalar loss, metrics): ``nll`` (nats/token against the true token),
    ``bits_per_token``, ``bits_per_image`` (= bits_per_token * T),
    ``accuracy`` (argmax == true token).
  """
  if target not in TARGETS:
    raise ValueError(f"target={target!r} must be one of {list(TARGETS)}")
  batch, t, vocab = logits.shape
  if group is None:
    group = int(round(math.log2(vocab)))
  if 2**group != vocab:
    raise ValueError(f"group={group} does not match {vocab} logits")
  tokens = tokens.reshape(batch, t).astype(jnp.int32)  # [B, T]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  nll = jnp.mean(nll)
  if target == "onehot":
    loss = nll
  else:
    if p_flip is None:
      raise ValueError("target='kernel' needs p_flip")
    soft = kernel_target(tokens, group, p_flip)  # [B, T, V]
    loss = -jnp.mean(jnp.sum(soft * logp, axis=-1))
  bits_per_token = nll / math.log(2.0)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == tokens).astype(jnp.float32))
  metrics = {"nll": nll, "bits_per_token": bits_per_token,
             "bits_per_image": bits_per_token * t, "accuracy": accuracy}
  return loss, metrics
