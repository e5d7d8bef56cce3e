"""The FID Inception-v3 weights: files, download, names, checks.

The network is :mod:`mesp_jax.eval.inception`. :func:`load_inception_params`
reads, one of:

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

import os
import re
import urllib.request
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mesp_jax.base import io as mio
from mesp_jax.eval.inception import abstract_variables

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_NPZ = "pt_inception-2015-12-05.npz"  # converted, either naming
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
DEFAULT_CACHE_DIR = os.environ.get(
    "MESP_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                   "mesp_jax"))


class InceptionWeightsError(RuntimeError):
  """The FID Inception weights are missing, corrupt or of the wrong shape."""


# ----------------------------------------------------------------------------
# Names, checks, files, download.
# ----------------------------------------------------------------------------


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
  expected = traverse_util.flatten_dict(abstract_variables(), sep="/")
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


sha256_of_file = mio.sha256_of_file  # the name this module has exported


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
