"""A small conv classifier whose penultimate layer is a feature space.

Used for the offline Frechet distance where the FID Inception weights are
not available: train this classifier on the data set, then compare feature
statistics of real and generated images. The result is reported under an
honest name built by :func:`feature_net_name`, e.g.
``fd_fashion_mnist_classifier``, never as "FID" (its numbers are not
comparable with published FIDs).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURE_DIM = 256
# He-normal for layers followed by ReLU, LeCun-normal for the logits.
_HE = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_LECUN = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def feature_net_name(dataset: str) -> str:
  """Metric / cache name of the classifier feature space for ``dataset``."""
  return f"fd_{dataset}_classifier"


class FeatureNet(nn.Module):
  """Conv classifier for small images (e.g. 32x32, 1 or 3 channels).

  Per stage: two 3x3 convs (He-normal init, GroupNorm, ReLU), then 2x2
  average pooling between stages; global average pooling, Dense
  ``feature_dim`` + ReLU (the feature layer), optional dropout, Dense
  ``num_classes``. GroupNorm keeps the model free of mutable batch
  statistics.

  Attributes:
    num_classes: classes of the head.
    widths: channels of each conv stage.
    feature_dim: width of the penultimate (feature) layer.
    dropout_rate: dropout before the head when ``train=True`` (needs a
      ``'dropout'`` rng when > 0).
    num_groups: GroupNorm groups (must divide every width).
  """
  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  feature_dim: int = FEATURE_DIM
  dropout_rate: float = 0.0
  num_groups: int = 8

  def setup(self):
    convs, norms = [], []
    for i, w in enumerate(self.widths):
      if w % self.num_groups:
        raise ValueError(
            f"width {w} is not divisible by num_groups={self.num_groups}")
      for j in range(2):
        convs.append(nn.Conv(w, (3, 3), padding="SAME", kernel_init=_HE,
                             name=f"conv{i}_{j}"))
        norms.append(nn.GroupNorm(num_groups=self.num_groups,
                                  name=f"norm{i}_{j}"))
    self.convs = convs
    self.norms = norms
    self.penultimate = nn.Dense(self.feature_dim, kernel_init=_HE,
                                name="penultimate")
    self.dropout = nn.Dropout(self.dropout_rate)
    self.head = nn.Dense(self.num_classes, kernel_init=_LECUN,
                         name="head")

  def features(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] in [-1, 1] -> [B, feature_dim] penultimate features."""
    x = jnp.asarray(x, jnp.float32)
    for i in range(len(self.widths)):
      if i > 0:
        x = nn.avg_pool(x, (2, 2), (2, 2))  # [B, H/2^i, W/2^i, w]
      for j in range(2):
        k = 2 * i + j
        x = nn.relu(self.norms[k](self.convs[k](x)))
    x = jnp.mean(x, axis=(1, 2))  # [B, widths[-1]]
    return nn.relu(self.penultimate(x))  # [B, feature_dim]

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, C] in [-1, 1] -> logits [B, num_classes]."""
    h = self.features(x)
    h = self.dropout(h, deterministic=not train)
    return self.head(h)


def classifier_loss(logits: jax.Array,
                    labels: jax.Array) -> tuple[jax.Array, dict]:
  """Mean softmax cross-entropy and accuracy.

  Args:
    logits: [B, K].
    labels: [B] integer classes.

  Returns:
    (loss, {"loss", "accuracy"}) as scalars.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32),
                             axis=-1)[:, 0]  # [B]
  loss = jnp.mean(nll)
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(
      jnp.float32))
  return loss, {"loss": loss, "accuracy": accuracy}


def classifier_features(model: FeatureNet, params, images,
                        batch_size: int = 256) -> np.ndarray:
  """Penultimate features of host images [N, H, W, C] in [-1, 1].

  Runs in fixed-size jitted batches (the last one padded), so the function
  compiles once per input shape.

  Returns:
    [N, feature_dim] float32 numpy array.
  """
  images = np.asarray(images, np.float32)
  apply = _features_fn(model)
  out = []
  for start in range(0, images.shape[0], batch_size):
    batch = images[start:start + batch_size]
    real = batch.shape[0]
    if real < batch_size:
      batch = np.concatenate(
          [batch, np.zeros((batch_size - real,) + batch.shape[1:],
                           np.float32)])
    out.append(np.asarray(apply(params, batch))[:real])
  if not out:
    return np.zeros((0, model.feature_dim), np.float32)
  return np.concatenate(out)


_FEATURE_FNS: dict = {}


def _features_fn(model: FeatureNet):
  """One jitted features function per model config."""
  model = model.clone(widths=tuple(model.widths))  # lists are unhashable
  if model not in _FEATURE_FNS:
    _FEATURE_FNS[model] = jax.jit(
        lambda p, x: model.apply({"params": p}, x, method=FeatureNet.features))
  return _FEATURE_FNS[model]
