"""The FID Inception-v3 in Flax: the network and feature extraction.

The network is the 2015-12-05 TensorFlow Inception graph that FID is defined
with (Heusel et al. 2017), in the layout pytorch-fid ports it to: torchvision's
Inception3 with 1008 classes, no auxiliary head, and the ``FIDInceptionA/C/E``
patches:

* the 3x3 average pools inside the A, C and E blocks do not count padding
  (``count_include_pad=False``, as TensorFlow does);
* the last E block (``Mixed_7c``) pools with a 3x3 *max* pool;
* every conv is ``conv (no bias) -> batch norm (eps 1e-3) -> relu``; batch
  norm runs in inference mode (running statistics) only.

Input: images [B, H, W, C] in [-1, 1], C in {1, 3} (grey is repeated to 3
channels), resized to 299x299 bilinearly with half-pixel centres and no
antialiasing (``F.interpolate(..., mode="bilinear", align_corners=False)`` as
in pytorch-fid). Outputs: the 2048-d average-pool features (FID, KID,
precision/recall) and the 1008-way logits without the fc bias (Inception
score; see :class:`UnbiasedLogits`).

Weights: :mod:`mesp_jax.eval.inception_weights` (files, download, checks);
:func:`init_random_params` gives random ones for tests and plumbing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mesp_jax.base import sharding as shd

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008

Padding = tuple[int, int]


# ----------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------


class BasicConv2d(nn.Module):
  """conv (no bias) -> batch norm (inference, eps 1e-3) -> relu."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = (0, 0)  # symmetric (rows, cols), as in PyTorch
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=self.precision,
                kernel_init=nn.initializers.variance_scaling(
                    2.0, "fan_in", "truncated_normal"), name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool, padding 1, padded zeros not counted."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b/c/d): 64 + 64 + 96 + pool_features channels."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(
        _avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17, 384 + 96 + C_in channels."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b..e): 4 x 192 channels, factorised 7x7."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8, 320 + 192 + C_in channels."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (pool="avg", Mixed_7b) / _2 (pool="max", Mixed_7c).

  320 + 768 + 768 + 192 = 2048 channels.
  """
  pool: str = "avg"
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    if self.pool == "avg":
      p = _avg_pool_3x3(x)
    elif self.pool == "max":  # the FID graph's quirk in its last block
      p = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = conv(192, (1, 1), name="branch_pool")(p)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class UnbiasedLogits(nn.Module):
  """The 1008-way ``fc`` layer as the Inception score uses it: no bias.

  Holds ``kernel`` [D, features] and ``bias`` [features] under the names and
  layouts of ``nn.Dense`` (the weight files carry both) but returns
  ``x @ kernel`` without adding the bias. The reference Inception score
  (improved-GAN's ``inception_score/model.py``, TTUR, torch-fidelity's
  ``logits_unbiased``) rebuilds the softmax from the TF graph as
  ``softmax(pool_3 @ W)`` with ``W`` the input of ``softmax/logits/MatMul``,
  i.e. without the graph's bias; a bias shifts every image's logits by the
  same vector, which changes the softmax and so the score. The FID features
  (``pool``) do not pass through this layer.
  """
  features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features), jnp.float32)
    self.param("bias", nn.initializers.zeros_init(), (self.features,),
               jnp.float32)  # kept for the weight files; not applied
    return jnp.dot(x, kernel, precision=self.precision)


def preprocess(images: jax.Array) -> jax.Array:
  """[B, H, W, 1 or 3] in [-1, 1] -> [B, 299, 299, 3] float32 in [-1, 1].

  Grey images are repeated to 3 channels; other sizes are resized
  bilinearly (half-pixel centres, no antialiasing, like pytorch-fid).
  """
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [B, H, W, 1 or 3], got {x.shape}")
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3),
                         method="bilinear", antialias=False)
  return x


class InceptionV3FID(nn.Module):
  """FID Inception-v3. ``__call__(images) -> (pool [B, 2048], logits
  [B, 1008])`` for images [B, H, W, 1 or 3] in [-1, 1]; the logits are
  ``pool @ fc.kernel`` without the fc bias, as the Inception score is defined
  (:class:`UnbiasedLogits`).

  Attributes:
    precision: matmul/conv precision (None: the backend default; pass
      ``jax.lax.Precision.HIGHEST`` to avoid TF32 on recent GPUs).
  """
  precision: Any = None

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    p = self.precision
    x = preprocess(images)  # [B, 299, 299, 3] in [-1, 1]
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # 149
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)  # 147
    x = nn.max_pool(x, (3, 3), (2, 2))  # [B, 73, 73, 64]
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
    x = nn.max_pool(x, (3, 3), (2, 2))  # [B, 35, 35, 192]
    x = InceptionA(32, p, name="Mixed_5b")(x)  # 256
    x = InceptionA(64, p, name="Mixed_5c")(x)  # 288
    x = InceptionA(64, p, name="Mixed_5d")(x)  # 288
    x = InceptionB(p, name="Mixed_6a")(x)  # [B, 17, 17, 768]
    x = InceptionC(128, p, name="Mixed_6b")(x)
    x = InceptionC(160, p, name="Mixed_6c")(x)
    x = InceptionC(160, p, name="Mixed_6d")(x)
    x = InceptionC(192, p, name="Mixed_6e")(x)  # [B, 17, 17, 768]
    x = InceptionD(p, name="Mixed_7a")(x)  # [B, 8, 8, 1280]
    x = InceptionE("avg", p, name="Mixed_7b")(x)  # [B, 8, 8, 2048]
    x = InceptionE("max", p, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
    pool = jnp.mean(x, axis=(1, 2))  # [B, 2048]
    logits = UnbiasedLogits(NUM_CLASSES, p, name="fc")(pool)  # [B, 1008]
    return pool, logits


# ----------------------------------------------------------------------------
# Parameters: abstract shapes, random init, size.
# ----------------------------------------------------------------------------

# The variables do not depend on the input size; shapes are traced at a
# small one (preprocess resizes it to 299 during tracing only).
_MIN_SIZE = 75


def abstract_variables(model: InceptionV3FID | None = None) -> dict:
  """ShapeDtypeStructs of the variables (traced, nothing is computed)."""
  model = model or InceptionV3FID()
  dummy = jax.ShapeDtypeStruct((1, _MIN_SIZE, _MIN_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)


def init_random_params(rng: jax.Array | int) -> dict:
  """Random variables ``{'params', 'batch_stats'}`` (tests, plumbing only).

  Filled leaf by leaf from the model's abstract variables (no forward pass
  is compiled): conv kernels He-normal, ``fc`` LeCun-normal, biases 0, batch
  norm the identity (scale 1, mean 0, var 1), so activations stay O(1)
  through the 94 conv layers.

  Args:
    rng: a jax PRNG key or an int seed.
  """
  if not isinstance(rng, int):
    rng = int(jax.random.randint(rng, (), 0, 2**31 - 1))
  gen = np.random.default_rng(rng)
  flat = traverse_util.flatten_dict(abstract_variables(), sep="/")
  out = {}
  for name in sorted(flat):
    shape = tuple(flat[name].shape)
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      gain = 1.0 if name.startswith("params/fc/") else 2.0
      value = gen.standard_normal(shape) * np.sqrt(gain / fan_in)
    elif leaf in ("scale", "var"):
      value = np.ones(shape)
    else:  # bias, mean
      value = np.zeros(shape)
    out[tuple(name.split("/"))] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------
# Feature extraction.
# ----------------------------------------------------------------------------

_MODEL = InceptionV3FID()


@jax.jit
def _preprocess(images: jax.Array) -> jax.Array:
  return preprocess(images)  # [B, 299, 299, 3]


@jax.jit
def _apply(variables: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _MODEL.apply(variables, x)  # ([B, 2048], [B, 1008])


def fid_features(variables: dict, images, batch_size: int = 50,
                 return_logits: bool = False,
                 mesh: jax.sharding.Mesh | None = None
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Pool features (and logits) of images, in jitted fixed-size batches.

  The last batch is padded to ``batch_size`` so the network compiles once.

  Args:
    variables: from
      :func:`mesp_jax.eval.inception_weights.load_inception_params` or
      :func:`init_random_params`.
    images: [N, H, W, 1 or 3] host array in [-1, 1].
    batch_size: images per step (a multiple of the mesh's data size).
    return_logits: also return the 1008-way logits without the fc bias
      (Inception score).
    mesh: optional mesh of this process's devices (e.g.
      ``make_mesh(devices=jax.local_devices())``): each batch is split over
      its data axes and the variables replicated. In a multi-process job
      every process extracts features of its own images.

  Returns:
    features [N, 2048] float32 (and logits [N, 1008]) as numpy arrays.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 1 or 3], got {images.shape}")
  if mesh is not None:
    variables = jax.device_put(variables, shd.replicated(mesh))
    if batch_size % shd.data_parallel_size(mesh):
      raise ValueError(
          f"batch_size={batch_size} must be a multiple of the mesh's data "
          f"size {shd.data_parallel_size(mesh)}")
  n = images.shape[0]
  feats, logits = [], []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size].astype(np.float32)
    real = batch.shape[0]
    if real < batch_size:
      pad = np.zeros((batch_size - real,) + batch.shape[1:], np.float32)
      batch = np.concatenate([batch, pad])
    if mesh is not None:
      batch = jax.device_put(batch, shd.batch_sharding(mesh))
    pool, lg = _apply(variables, _preprocess(batch))
    feats.append(np.asarray(pool)[:real])
    if return_logits:
      logits.append(np.asarray(lg)[:real])
  features = np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM),
                                                          np.float32)
  if return_logits:
    return features, (np.concatenate(logits) if logits
                      else np.zeros((0, NUM_CLASSES), np.float32))
  return features


def parameter_count(variables: dict, collections: Sequence[str] = ("params",)
                    ) -> int:
  """Number of scalars in the given collections."""
  return sum(int(np.prod(x.shape)) for c in collections
             for x in jax.tree.leaves(variables[c]))
