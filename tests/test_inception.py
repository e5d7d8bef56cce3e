"""FID Inception-v3: forward shapes with random weights, weight loading.

The network is compiled once for this module (batch 2 at 299x299; the
resize to 299 is a separate small jit per input shape).
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from mesp_jax.eval import inception as inc
from mesp_jax.eval import inception_weights as incw

BATCH = 2


@pytest.fixture(scope="module")
def variables():
  return inc.init_random_params(0)


@pytest.fixture(scope="module")
def images299():
  rng = np.random.default_rng(0)
  return rng.uniform(-1, 1, (BATCH, 299, 299, 3)).astype(np.float32)


def test_parameter_count_matches_torchvision(variables):
  # torchvision's inception_v3 has 27,161,264 parameters, of which the
  # auxiliary head (dropped for FID) holds 3,326,696; the FID net has 1008
  # instead of 1000 classes: 8 more rows of 2048 weights + 1 bias each.
  assert inc.parameter_count(variables) == 27_161_264 - 3_326_696 + 8 * 2049


def test_forward_299_and_32(variables, images299):
  feats, logits = inc.fid_features(variables, images299, batch_size=BATCH,
                                   return_logits=True)
  assert feats.shape == (BATCH, inc.FEATURE_DIM)
  assert logits.shape == (BATCH, inc.NUM_CLASSES)
  assert np.all(np.isfinite(feats)) and np.all(np.isfinite(logits))
  assert np.all(feats >= 0)  # mean of ReLU outputs
  assert feats.std() > 0
  # 32x32 grey images: resized and repeated to 3 channels.
  grey = np.random.default_rng(1).uniform(-1, 1, (3, 32, 32, 1))
  f_grey = inc.fid_features(variables, grey, batch_size=BATCH)
  assert f_grey.shape == (3, inc.FEATURE_DIM)
  f_rgb = inc.fid_features(variables, np.repeat(grey, 3, axis=-1),
                           batch_size=BATCH)
  np.testing.assert_allclose(f_grey, f_rgb, rtol=1e-5, atol=1e-6)
  # Padding of the last batch and batch independence: reversed order gives
  # the same rows reversed (3 images in batches of 2).
  f_rev = inc.fid_features(variables, grey[::-1], batch_size=BATCH)
  np.testing.assert_allclose(f_rev[::-1], f_grey, rtol=1e-4, atol=1e-5)


def test_logits_leave_out_the_fc_bias(variables, images299):
  # The Inception score's logits are pool @ W (the TF reference rebuilds the
  # softmax from softmax/logits/MatMul's weight input, without the bias).
  bias = np.linspace(-50.0, 50.0, inc.NUM_CLASSES).astype(np.float32)
  params = dict(variables["params"])
  params["fc"] = {**params["fc"], "bias": jax.numpy.asarray(bias)}
  biased = {**variables, "params": params}
  feats, logits = inc.fid_features(biased, images299, batch_size=BATCH,
                                   return_logits=True)
  kernel = np.asarray(variables["params"]["fc"]["kernel"], np.float64)
  want = feats.astype(np.float64) @ kernel  # [B, 1008]
  scale = np.abs(want).max()
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * scale)
  assert np.abs(logits - (want + bias)).max() > 10.0  # not pool @ W + b
  # The bias is still a variable (weight files carry it) and the features
  # do not depend on it.
  np.testing.assert_array_equal(
      feats, inc.fid_features(variables, images299, batch_size=BATCH))


def test_preprocess_resize_constant_and_range():
  x = np.full((1, 32, 32, 1), 0.25, np.float32)
  y = np.asarray(inc.preprocess(x))
  assert y.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(y, 0.25, rtol=1e-6)
  # 2x upsampling with half-pixel centres: out[1] = 0.75 a0 + 0.25 a1.
  ramp = np.arange(4, dtype=np.float32)
  up = np.asarray(jax.image.resize(ramp, (8,), "bilinear", antialias=False))
  np.testing.assert_allclose(up, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])


def _to_torch_names(variables) -> dict[str, np.ndarray]:
  """Independent inverse of the loader's mapping (Flax -> PyTorch)."""
  out = {}
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  for name, v in flat.items():
    coll, *path, leaf = name.split("/")
    mod = ".".join(path)
    v = np.asarray(v)
    if mod == "fc":
      out[f"fc.{'weight' if leaf == 'kernel' else 'bias'}"] = (
          v.T if leaf == "kernel" else v)
    elif leaf == "kernel":
      out[f"{mod}.weight"] = np.transpose(v, (3, 2, 0, 1))  # OIHW
    else:
      torch_leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                    "var": "running_var"}[leaf]
      out[f"{mod}.{torch_leaf}"] = v
      if leaf == "mean":
        out[f"{mod}.num_batches_tracked"] = np.array(0, np.int64)
  return out


def test_load_torch_named_and_flax_named_npz(variables, tmp_path):
  torch_named = _to_torch_names(variables)
  assert "Mixed_7c.branch3x3dbl_3b.conv.weight" in torch_named
  assert torch_named["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  path = str(tmp_path / "pt_inception.npz")
  np.savez(path, **torch_named)
  loaded = incw.load_inception_params(path=path)
  flat_a = traverse_util.flatten_dict(jax.device_get(variables))
  flat_b = traverse_util.flatten_dict(jax.device_get(loaded))
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k])
  os.remove(path)
  # Flax naming round trip through save_inception_npz, with a checksum.
  path2 = str(tmp_path / "flax_inception.npz")
  incw.save_inception_npz(variables, path2)
  digest = incw.sha256_of_file(path2)
  loaded2 = incw.load_inception_params(path=path2, sha256=digest[:12])
  np.testing.assert_array_equal(
      loaded2["params"]["Mixed_5b"]["branch_pool"]["conv"]["kernel"],
      variables["params"]["Mixed_5b"]["branch_pool"]["conv"]["kernel"])
  os.remove(path2)


def test_wrong_shapes_give_clear_error(tmp_path):
  path = str(tmp_path / "bad.npz")
  np.savez(path, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5)),
                    "fc.weight": np.zeros((1000, 2048)),
                    "fc.bias": np.zeros(1000)})
  with pytest.raises(incw.InceptionWeightsError) as e:
    incw.load_inception_params(path=path)
  msg = str(e.value)
  assert "wrong shapes" in msg and "missing" in msg
  assert "params/Conv2d_1a_3x3/conv/kernel: file (5, 5, 3, 32) vs model " \
         "(3, 3, 3, 32)" in msg
  assert "params/fc/bias: file (1000,) vs model (1008,)" in msg
  # Unknown PyTorch names are reported too.
  np.savez(path, **{"AuxLogits.fc.weight": np.zeros((3, 3))})
  with pytest.raises(incw.InceptionWeightsError, match="unexpected PyTorch"):
    incw.load_inception_params(path=path)


def test_wrong_checksum_gives_clear_error(tmp_path):
  path = str(tmp_path / "w.npz")
  np.savez(path, a=np.zeros(3))
  with pytest.raises(incw.InceptionWeightsError, match="checksum mismatch"):
    incw.load_inception_params(path=path, sha256="0" * 64)
  with open(path, "wb") as f:
    f.write(b"garbage")
  with pytest.raises(incw.InceptionWeightsError, match="could not read"):
    incw.load_inception_params(path=path)
  # A torch-hub style hash prefix in a .pth name is checked by default.
  pth = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  with open(pth, "wb") as f:
    f.write(b"not the weights")
  with pytest.raises(incw.InceptionWeightsError, match="6726825d"):
    incw.load_inception_params(path=pth)


def test_missing_weights_fail_fast_with_instructions(tmp_path):
  cache = str(tmp_path / "cache")
  with pytest.raises(incw.InceptionWeightsError, match="download=False"):
    incw.load_inception_params(cache_dir=cache, download=False)
  with pytest.raises(incw.InceptionWeightsError, match="no file at"):
    incw.load_inception_params(path=str(tmp_path / "nope.npz"))
  t0 = time.time()
  # Port 9 (discard) on localhost: refused at once, no hang.
  with pytest.raises(incw.InceptionWeightsError) as e:
    incw.load_inception_params(cache_dir=cache, url="http://127.0.0.1:9/w.npz",
                              timeout=2.0)
  assert time.time() - t0 < 10
  msg = str(e.value)
  assert "download of http://127.0.0.1:9/w.npz failed" in msg
  assert incw.FID_WEIGHTS_FILE in msg and "np.savez" in msg


def test_download_to_cache_with_checksum(tmp_path):
  served = tmp_path / "served"
  served.mkdir()
  np.savez(served / "tiny.npz", **{"fc.bias": np.zeros(5)})
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(served))
  handler.log_message = lambda *a, **k: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f"http://127.0.0.1:{server.server_port}/tiny.npz"
    cache = str(tmp_path / "cache")
    with pytest.raises(incw.InceptionWeightsError, match="checksum mismatch"):
      incw.load_inception_params(cache_dir=cache, url=url, sha256="ab" * 32,
                                timeout=5.0)
    assert not os.path.exists(os.path.join(cache, "tiny.npz"))  # removed
    # Right checksum: the download is read and then fails the shape check.
    digest = incw.sha256_of_file(str(served / "tiny.npz"))
    with pytest.raises(incw.InceptionWeightsError, match="wrong shapes"):
      incw.load_inception_params(cache_dir=cache, url=url, sha256=digest,
                                timeout=5.0)
    assert os.path.exists(os.path.join(cache, "tiny.npz"))  # cached
  finally:
    server.shutdown()
    server.server_close()


def test_fid_features_on_a_mesh(variables):
  from mesp_jax.base.sharding import make_mesh

  devices = jax.local_devices()
  if len(devices) < 2:
    pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_"
                "device_count=8)")
  mesh = make_mesh(devices=devices[:2])
  x = np.random.default_rng(2).uniform(-1, 1, (3, 32, 32, 3))
  sharded = inc.fid_features(variables, x, batch_size=2, mesh=mesh)
  np.testing.assert_allclose(sharded, inc.fid_features(variables, x, 2),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="multiple"):
    inc.fid_features(variables, x, batch_size=3, mesh=mesh)
