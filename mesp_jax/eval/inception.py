"""The FID Inception-v3 in Flax, and loading its standard weights.

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
precision/recall) and the 1008-way logits (Inception score).

Weights (``load_inception_params``), one of:

* an ``.npz`` holding a flat mapping name -> array in either naming:

  - **Flax naming**: ``"params/<module path>/<leaf>"`` and
    ``"batch_stats/<module path>/<leaf>"`` with Flax layouts, e.g.
    ``params/Mixed_5b/branch1x1/conv/kernel`` [kh, kw, in, out],
    ``params/Mixed_5b/branch1x1/bn/{scale,bias}``,
    ``batch_stats/Mixed_5b/branch1x1/bn/{mean,var}``,
    ``params/fc/kernel`` [2048, 1008], ``params/fc/bias`` [1008]
    (what :func:`save_inception_npz` writes);
  - **PyTorch naming**: the pytorch-fid state-dict names and layouts, e.g.
    ``Mixed_5b.branch1x1.conv.weight`` [out, in, kh, kw],
    ``...bn.weight/bias/running_mean/running_var`` (``num_batches_tracked``
    ignored), ``fc.weight`` [1008, 2048], ``fc.bias``; this is what
    ``np.savez(f, **{k: v.numpy() for k, v in state_dict.items()})`` gives;

* the pytorch-fid file ``pt_inception-2015-12-05-6726825d.pth`` itself, if
  torch can be imported;
* a download of that file (short timeout) into a cache directory, checked
  against its sha256 (prefix ``6726825d``, the torch-hub convention).

Loaded arrays are checked, name by name and shape by shape, against the
model's own variables; any mismatch raises :class:`InceptionWeightsError`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import urllib.request
import zipfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mesp_jax import io as mio
from mesp_jax.train import sharding as shd

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_NPZ = "pt_inception-2015-12-05.npz"  # converted, either naming
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
DEFAULT_CACHE_DIR = os.environ.get(
    "MESP_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                   "mesp_jax"))

Padding = tuple[int, int]


class InceptionWeightsError(RuntimeError):
  """The FID Inception weights are missing, corrupt or of the wrong shape."""


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
  [B, 1008])`` for images [B, H, W, 1 or 3] in [-1, 1].

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
    logits = nn.Dense(NUM_CLASSES, precision=p, name="fc")(pool)  # [B, 1008]
    return pool, logits


# ----------------------------------------------------------------------------
# Parameters: random init, names, checks, loading.
# ----------------------------------------------------------------------------

# The variables do not depend on the input size; shapes are traced at a
# small one (preprocess resizes it to 299 during tracing only).
_MIN_SIZE = 75


def _abstract_variables(model: InceptionV3FID | None = None) -> dict:
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
  flat = traverse_util.flatten_dict(_abstract_variables(), sep="/")
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


def flatten_variables(variables: dict) -> dict[str, np.ndarray]:
  """Nested variables -> flat ``{"params/a/b/kernel": array}`` (Flax naming)."""
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def save_inception_npz(variables: dict, path: str) -> None:
  """Writes variables as an npz in Flax naming (atomic, process 0)."""
  mio.save_npz(path, **flatten_variables(variables))


_TORCH_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"),
             "running_var": ("batch_stats", "var")}


def torch_to_flax_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid state dict (numpy values) -> flat Flax-named arrays.

  ``X.conv.weight`` [O, I, kh, kw] -> ``params/X/conv/kernel`` [kh, kw, I, O];
  ``X.bn.{weight, bias, running_mean, running_var}`` ->
  ``params/X/bn/{scale, bias}``, ``batch_stats/X/bn/{mean, var}``;
  ``fc.weight`` [1008, 2048] -> ``params/fc/kernel`` (transposed);
  ``*.num_batches_tracked`` is dropped. Module paths keep their names with
  ``.`` -> ``/`` (``Mixed_5b.branch1x1`` -> ``Mixed_5b/branch1x1``).
  Unknown names raise :class:`InceptionWeightsError`.
  """
  out = {}
  unknown = []
  for name, value in state.items():
    value = np.asarray(value)
    parts = name.split(".")
    if parts[-1] == "num_batches_tracked":
      continue
    if parts[0] == "fc" and len(parts) == 2:
      if parts[1] == "weight":
        out["params/fc/kernel"] = value.T if value.ndim == 2 else value
      elif parts[1] == "bias":
        out["params/fc/bias"] = value
      else:
        unknown.append(name)
      continue
    if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
      out["params/" + "/".join(parts[:-1]) + "/kernel"] = (
          value.transpose(2, 3, 1, 0) if value.ndim == 4 else value)
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _TORCH_BN:
      collection, leaf = _TORCH_BN[parts[-1]]
      out[f"{collection}/" + "/".join(parts[:-1]) + f"/{leaf}"] = value
    else:
      unknown.append(name)
  if unknown:
    raise InceptionWeightsError(
        f"{len(unknown)} unexpected PyTorch names, e.g. {unknown[:5]}; "
        "expected the pytorch-fid FID Inception state dict")
  return out


def _check_and_unflatten(flat: dict[str, np.ndarray], source: str) -> dict:
  """Checks names and shapes against the model's; returns nested variables."""
  expected = traverse_util.flatten_dict(_abstract_variables(), sep="/")
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = [f"{k}: file {tuple(flat[k].shape)} vs model "
           f"{tuple(expected[k].shape)}"
           for k in sorted(set(flat) & set(expected))
           if tuple(flat[k].shape) != tuple(expected[k].shape)]
  if missing or extra or wrong:
    lines = [f"Inception weights in {source} do not match the FID "
             "Inception-v3:"]
    if missing:
      lines.append(f"  {len(missing)} missing, e.g. {missing[:5]}")
    if extra:
      lines.append(f"  {len(extra)} unexpected, e.g. {extra[:5]}")
    if wrong:
      lines.append(f"  {len(wrong)} with wrong shapes, e.g. {wrong[:5]}")
    lines.append("  (Flax names and layouts; a PyTorch state dict is "
                 "converted first, see torch_to_flax_names)")
    raise InceptionWeightsError("\n".join(lines))
  nested = traverse_util.unflatten_dict(
      {tuple(k.split("/")): jnp.asarray(v, jnp.float32)
       for k, v in flat.items()})
  return nested


def sha256_of_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _expected_hash(path: str, sha256: str | None) -> str | None:
  """The given hash, else the torch-hub style prefix in the file name
  (``name-<8+ hex>.pth``), else None (no check)."""
  if sha256:
    return sha256.lower()
  m = re.search(r"-([0-9a-f]{8,64})\.pth$", os.path.basename(path))
  return m.group(1) if m else None


def _verify_hash(path: str, sha256: str | None) -> None:
  want = _expected_hash(path, sha256)
  if want is None:
    return
  got = sha256_of_file(path)
  if not got.startswith(want):
    raise InceptionWeightsError(
        f"checksum mismatch for {path}: sha256 {got} does not start with "
        f"the expected {want}. The file is corrupt or not the FID Inception "
        "weights; delete it and fetch it again.")


def _how_to_get(cache_dir: str, url: str) -> str:
  return (
      "The FID Inception-v3 weights are needed (they cannot be derived here). "
      "Any one of:\n"
      f"  1. download {url} on a machine with network access and pass "
      f"path=..., or put it in {cache_dir} (reading .pth needs torch);\n"
      "  2. convert it where torch is installed and use the .npz here:\n"
      "     python -c \"import torch, numpy as np; "
      f"sd = torch.load('{FID_WEIGHTS_FILE}', map_location='cpu'); "
      f"np.savez('{FID_WEIGHTS_NPZ}', **{{k: v.numpy() for k, v in "
      "sd.items()}})\"\n"
      f"     then pass path='{FID_WEIGHTS_NPZ}' or put it in {cache_dir};\n"
      "  3. allow network access so the download can run.\n"
      "Without these weights compute the offline Frechet distance on the "
      "project's own classifier (mesp_jax.models.feature_net) instead; do "
      "not call it FID.")


def _read_flat(path: str) -> dict[str, np.ndarray]:
  """Reads an npz or pth file into a flat Flax-named dict."""
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as z:
        raw = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise InceptionWeightsError(
          f"could not read {path} as an npz ({type(e).__name__}: {e})") from e
  elif path.endswith((".pth", ".pt")):
    try:
      import torch  # optional dependency
    except ImportError as e:
      raise InceptionWeightsError(
          f"{path} is a PyTorch file and torch is not installed.\n"
          + _how_to_get(os.path.dirname(path) or ".", FID_WEIGHTS_URL)
      ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    raw = {k: v.detach().cpu().numpy() for k, v in state.items()}
  else:
    raise InceptionWeightsError(
        f"unknown weights format {path!r}: expected .npz or .pth")
  if all(k.startswith(("params/", "batch_stats/")) for k in raw):
    return raw
  return torch_to_flax_names(raw)


def _download(url: str, dest: str, timeout: float) -> None:
  """Downloads to ``dest`` atomically (process 0 writes; short timeout)."""
  with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310
    data = r.read()
  mio.atomic_write_bytes(dest, data)


def _fetch(url: str, cache_dir: str, sha256: str | None,
           timeout: float) -> str:
  """Downloads ``url`` into ``cache_dir`` and checks it; returns the path."""
  path = os.path.join(cache_dir, os.path.basename(url))
  if path.endswith((".pth", ".pt")):
    try:
      import torch  # noqa: F401
    except ImportError as e:
      raise InceptionWeightsError(
          f"no weights in {cache_dir}, and the download ({url}) is a "
          "PyTorch file that needs torch to read.\n"
          + _how_to_get(cache_dir, url)) from e
  try:
    _download(url, path, timeout)
  except (OSError, ValueError) as e:  # URLError is an OSError
    raise InceptionWeightsError(
        f"download of {url} failed ({type(e).__name__}: {e}).\n"
        + _how_to_get(cache_dir, url)) from e
  try:
    _verify_hash(path, sha256)
  except InceptionWeightsError:
    os.remove(path)  # never leave a bad download in the cache
    raise
  return path


def load_inception_params(path: str | None = None, url: str | None = None,
                          cache_dir: str | None = None,
                          sha256: str | None = None,
                          timeout: float = 10.0,
                          download: bool = True) -> dict:
  """Loads the FID Inception-v3 variables ``{'params', 'batch_stats'}``.

  Order: ``path`` if given; else a file already in ``cache_dir``
  (:data:`FID_WEIGHTS_NPZ`, then :data:`FID_WEIGHTS_FILE`); else a download
  of ``url`` (default :data:`FID_WEIGHTS_URL`) into ``cache_dir`` with a
  ``timeout``-second limit. A ``.pth`` needs torch; without torch no
  download of one is attempted.

  Args:
    path: a weights file (.npz in Flax or PyTorch naming, or .pth).
    url: download source (default: the pytorch-fid release).
    cache_dir: cache directory (default ``$MESP_JAX_CACHE`` or
      ``~/.cache/mesp_jax``).
    sha256: expected sha256 of the file that is loaded (full, or a prefix
      of >= 8 hex digits). If None, a torch-hub hash prefix in a ``.pth``
      file name (``-6726825d.pth``) is checked. A download that fails the
      check is deleted.
    timeout: network timeout in seconds.
    download: whether a download may be attempted.

  Returns:
    Nested variables, float32, checked against the model's shapes.

  Raises:
    InceptionWeightsError: missing file, no torch for a .pth, failed
      download, checksum mismatch, or names/shapes that do not match; the
      message says how to obtain the weights.
  """
  cache_dir = cache_dir or DEFAULT_CACHE_DIR
  url = url or FID_WEIGHTS_URL
  if path is not None:
    if not os.path.exists(path):
      raise InceptionWeightsError(f"no file at {path}.\n"
                                  + _how_to_get(cache_dir, url))
  else:
    for name in (FID_WEIGHTS_NPZ, FID_WEIGHTS_FILE,
                 os.path.basename(url)):
      candidate = os.path.join(cache_dir, name)
      if os.path.exists(candidate):
        path = candidate
        break
  if path is None:
    if not download:
      raise InceptionWeightsError(
          f"no weights in {cache_dir} and download=False.\n"
          + _how_to_get(cache_dir, url))
    path = _fetch(url, cache_dir, sha256, timeout)
  else:
    _verify_hash(path, sha256)
  flat = _read_flat(path)
  return _check_and_unflatten(flat, path)


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
    variables: from :func:`load_inception_params` or
      :func:`init_random_params`.
    images: [N, H, W, 1 or 3] host array in [-1, 1].
    batch_size: images per step (a multiple of the mesh's data size).
    return_logits: also return the 1008-way logits (Inception score).
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
