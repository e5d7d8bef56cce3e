"""Training into a gs:// workdir, on a fake bucket (tests/fake_gcs.py): the
same losses and parameters as a local run, resume, damaged steps moved
aside; and the URIs that cannot work are refused at start."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from fake_gcs import STORE, install_fsspec, serve
from test_train_blae import smoke_config, train_losses

from mesp_jax import stages
from mesp_jax.base import io
from mesp_jax.base.config import ConfigError
from mesp_jax.train import blae as blae_stage
from mesp_jax.train import checkpoint as ckpt
from mesp_jax.train import metrics

RUN = "gs://test-bucket/runs/blae"
KW = dict(num_steps=4, checkpoint_every=2, log_every=1, eval_every=4)


@pytest.fixture(scope="module")
def bucket():
  """The fake bucket, seen by fsspec (epath, Orbax's folders) and, over
  HTTP, by TensorStore (Orbax's arrays)."""
  server = serve()
  saved = os.environ.get("TENSORSTORE_GCS_HTTP_URL")
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = (
      f"http://127.0.0.1:{server.server_port}")
  install_fsspec()
  yield STORE
  server.shutdown()
  if saved is None:
    os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
  else:
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = saved


@pytest.fixture
def remote_ok(bucket, monkeypatch):
  """What the real gcsfs and google-cloud-storage would provide: a flat
  bucket (no hierarchical namespace) and no extra module to import."""
  from orbax.checkpoint._src.path import gcs_utils
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled",
                      lambda path: False)
  monkeypatch.setattr(stages, "REMOTE_MODULES", {})
  return bucket


def _params(workdir):
  _, params, _, step = blae_stage.load_blae(workdir)
  return jax.tree.map(np.asarray, params), step


def test_a_gs_workdir_trains_resumes_and_equals_a_local_one(
    repo_root, tmp_path, remote_ok):
  local = str(tmp_path / "local")
  config = smoke_config(repo_root, **KW)
  stages.run(config, local)
  stages.run(config, RUN)
  assert not os.path.exists("gs:")  # nothing landed in a local "gs:" folder
  names = set(remote_ok.keys("test-bucket/runs/blae/"))
  for name in ("metrics.jsonl", "blae_config.json", "blae_provenance.json",
               "recon_latest.png", "checkpoints/4/checksums.json"):
    assert f"test-bucket/runs/blae/{name}" in names, name
  assert train_losses(local) == pytest.approx(
      {r["step"]: r["loss"] for r in metrics.read_metrics(RUN, "train")},
      rel=1e-6)
  (want, step_l), (got, step_r) = _params(local), _params(RUN)
  assert step_l == step_r == 4
  jax.tree.map(np.testing.assert_array_equal, got, want)
  manager = ckpt.make_manager(os.path.join(RUN, "checkpoints"),
                              async_save=False)
  assert manager.all_steps() == [2, 4] and ckpt.verify(manager, 4)

  # A damaged newest step on the bucket: moved aside, resumed from step 2;
  # the result equals a local 6-step run.
  key = max((k for k in remote_ok.keys("test-bucket/runs/blae/checkpoints/4/"
                                       "state/")),
            key=lambda k: len(remote_ok.get(k)[0]))
  data = bytearray(remote_ok.get(key)[0])
  data[len(data) // 2] ^= 0xFF
  remote_ok.put(key, bytes(data))
  config.train.num_steps = 6
  stages.run(config, RUN)
  local = str(tmp_path / "local6")  # steps 1-2 do not depend on num_steps
  stages.run(config, local)
  damaged = io.listdir(os.path.join(RUN, "checkpoints", ckpt.DAMAGED))
  assert [d.split("-")[0] for d in damaged] == ["4"]
  assert io.exists(os.path.join(RUN, "checkpoints", ckpt.DAMAGED, damaged[0],
                                "NOTE.txt"))
  (want, _), (got, step) = _params(local), _params(RUN)
  assert step == 6
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  history = io.listdir(os.path.join(RUN, "config_history"))
  assert len(history) == 1  # the 4-step config, kept


def test_an_arvm_trains_into_a_gs_workdir_and_restores(repo_root, tmp_path,
                                                       remote_ok):
  from test_provenance import arvm_config, write_tokens

  from mesp_jax.train import arvm as arvm_stage
  tokens_dir = tmp_path / "tokens"  # inputs stay local (memory-mapped)
  write_tokens(tokens_dir, seed=0)
  config = arvm_config(repo_root, tokens_dir)
  workdir = "gs://test-bucket/runs/arvm"
  stages.run(config, workdir)
  stages.run(config, str(tmp_path / "arvm"))
  remote = arvm_stage.load_arvm(workdir)
  local = arvm_stage.load_arvm(str(tmp_path / "arvm"))
  assert remote[3] == local[3] == 2  # the checkpoint step
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b)), remote[1], local[1])
  assert io.exists(f"{workdir}/arvm_provenance.json")


def test_uris_that_cannot_work_are_refused(repo_root, bucket, tmp_path):
  config = smoke_config(repo_root, **KW)
  if stages.remote_problem(RUN):  # as here: google-cloud-storage missing
    with pytest.raises(ConfigError, match=r"is not installed\. Install that "
                       r"file system \(for gs://: pip install "
                       r"'mesp_jax\[gcs\]'"):
      stages.run(config, RUN)
  problem = stages.remote_problem("s3://bucket/run")  # no s3fs here
  assert problem and "s3://" in problem
  config.stage = "blae_encode"  # writes token shards with local APIs
  with pytest.raises(ConfigError, match="stage 'blae_encode' writes local "
                     "files only.*gcsfuse"):
    stages.run(config, "gs://test-bucket/tokens")
  config.stage = "blae"
  config.inputs.tokens_dir = "gs://test-bucket/tokens"
  with pytest.raises(ConfigError, match="inputs are read with local file"):
    stages.run(config, str(tmp_path / "x"))
  config.inputs.tokens_dir = ""
  with pytest.raises(ConfigError, match=r"s3://.*Install that file system.*gcsfuse"):
    stages.run(config, "s3://bucket/run")
