"""Sharded token sets: the memory-mapped reader against np.concatenate of
hand-made shards, its errors, the legacy npz, and stage 'blae_encode' on two
processes writing exactly the shards of the one-process run."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesp_jax.data import tokens as tokens_lib
from mesp_jax.data.tokens import TokenSource, load_tokens, repack

BITS = 16
GRID = (3, 2)


def make_shards(directory, counts, split="train", seed=0):
  """Shards of ``counts`` rows written by hand; returns (tokens, labels)."""
  rng = np.random.default_rng(seed)
  n = sum(counts)
  tokens = rng.integers(0, 2**BITS, (n, *GRID, 1)).astype(np.int32)
  labels = rng.integers(0, 10, (n,)).astype(np.int32)
  manifest = tokens_lib.make_manifest(
      split=split, dataset="synthetic", grid=GRID, bits=BITS, num_examples=n,
      process_count=len(counts), blae_workdir="/nowhere", checkpoint_step=7)
  starts = np.cumsum([0] + list(counts))
  for p, shard in enumerate(manifest["shards"]):  # uneven counts by hand
    shard["start"], shard["count"] = int(starts[p]), int(counts[p])
    sl = slice(starts[p], starts[p + 1])
    tokens_lib.write_shard(str(directory), split, p, len(counts), tokens[sl],
                           labels[sl])
  tokens_lib.write_manifest(tokens_lib.manifest_path(str(directory), split),
                            manifest)
  return tokens, labels


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tokens")
  tokens, labels = make_shards(directory, (5, 1, 0, 9, 4))
  return str(directory), tokens, labels


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_reads_match_concatenation(sharded, data):
  directory, tokens, labels = sharded
  n = len(tokens)
  idx = np.asarray(data.draw(st.lists(st.integers(0, n - 1), max_size=40)),
                   np.int64)
  group = data.draw(st.sampled_from([16, 8, 4, 2, 1]))
  source = TokenSource(tokens_lib.tokens_path(directory, "train"), group)
  got = source.read(idx)
  want = repack(tokens[idx], BITS, BITS, group)  # [n, h, w, 16/group]
  assert got["tokens"].shape == (len(idx), *GRID, BITS // group)
  np.testing.assert_array_equal(got["tokens"], want)
  np.testing.assert_array_equal(got["label"], labels[idx])
  shard, row = source.locate(idx)
  starts = np.asarray([0, 5, 6, 6, 15, 19])
  np.testing.assert_array_equal(starts[shard] + row, idx)
  assert np.all(row < np.diff(starts)[shard])  # never the empty shard


def test_source_attributes_and_memmaps(sharded):
  directory, tokens, labels = sharded
  source = TokenSource(tokens_lib.tokens_path(directory, "train"), 8)
  assert len(source) == len(tokens) == 19
  assert (source.bits, source.group, source.grid) == (BITS, 8, GRID)
  assert source.blae_workdir == "/nowhere"
  assert source.name == "tokens_train.json"
  np.testing.assert_array_equal(source.labels, labels)
  assert len(source.shards) == 5
  assert all(isinstance(s, np.memmap) for s in source.shards)
  whole = source.read(np.arange(19))["tokens"]
  np.testing.assert_array_equal(whole, repack(tokens, BITS, BITS, 8))
  with pytest.raises(IndexError):
    source.read(np.asarray([19]))
  again = pickle.loads(pickle.dumps(source))
  assert all(isinstance(s, np.memmap) for s in again.shards)
  np.testing.assert_array_equal(again.read(np.asarray([18, 3]))["tokens"],
                                whole[[18, 3]])
  data = load_tokens(tokens_lib.tokens_path(directory, "train"))
  np.testing.assert_array_equal(data["tokens"], tokens)
  np.testing.assert_array_equal(data["labels"], labels)
  assert data["bits"] == BITS and data["checkpoint_step"] == 7
  assert tokens_lib.read_info(tokens_lib.tokens_path(directory, "train")) \
      ["num_examples"] == 19


def test_missing_or_wrong_shards_are_refused(tmp_path):
  make_shards(tmp_path, (4, 3))
  path = tokens_lib.manifest_path(str(tmp_path), "train")
  shard = tmp_path / "tokens_train" / "tokens-00001-of-00002.npy"
  np.save(shard, np.zeros((2, *GRID, 1), np.int32))  # 2 rows, manifest: 3
  with pytest.raises(ValueError, match="tokens-00001-of-00002.npy.*fresh"):
    TokenSource(path, 16)
  os.remove(shard)
  with pytest.raises(FileNotFoundError,
                     match="tokens-00001-of-00002.npy.*missing.*blae_encode"):
    TokenSource(path, 16)
  with pytest.raises(FileNotFoundError, match="blae_encode"):
    TokenSource(tokens_lib.tokens_path(str(tmp_path), "test"), 16)
  assert not tokens_lib.has_tokens(str(tmp_path), "test")


def test_legacy_npz_still_reads(tmp_path):
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 2**BITS, (6, *GRID, 1)).astype(np.int32)
  np.savez(tmp_path / "tokens_train.npz", tokens=tokens,
           labels=np.arange(6, dtype=np.int32), bits=np.int32(BITS),
           blae_workdir=np.asarray("/b"), checkpoint_step=np.int32(3))
  path = tokens_lib.tokens_path(str(tmp_path), "train")
  assert path.endswith("tokens_train.npz")
  source = TokenSource(path, 4)
  np.testing.assert_array_equal(source.read(np.asarray([5, 0]))["tokens"],
                                repack(tokens[[5, 0]], BITS, BITS, 4))
  assert source.blae_workdir == "/b" and len(source) == 6
  info = tokens_lib.read_info(path)
  assert info["checkpoint_step"] == 3 and info["grid"] == list(GRID)
  make_shards(tmp_path, (2, 2))  # a manifest takes precedence
  assert tokens_lib.tokens_path(str(tmp_path), "train").endswith(".json")


# --------------------------------------------------------------------------
# Stage 'blae_encode': 2 processes x 4 devices == 1 process x 8 devices.
# --------------------------------------------------------------------------
def test_two_process_shards_equal_one_process_tokens(repo_root, tmp_path):
  from mesp_jax import stages
  from mesp_jax.base.config import load_config

  config = load_config(os.path.join(repo_root,
                                    "configs/blae_fashion_mnist.py:smoke"))
  config.train.update(num_steps=2, checkpoint_every=2, eval_every=2,
                      log_every=2)
  blae_dir = str(tmp_path / "blae")
  stages.run(config, blae_dir)  # a 2-step BL-AE (the encode's cost: 10k)
  config.stage = "blae_encode"
  config.inputs.blae_workdir = blae_dir
  assert tuple(config.encode.splits) == ("test",)  # 10000 images
  single = str(tmp_path / "single")
  paths = stages.run(config, single)
  assert paths == {"test": tokens_lib.manifest_path(single, "test")}

  env = dict(os.environ, PY=sys.executable, N="2", D="4",
             PORT=str(20000 + (os.getpid() + 7) % 20000))
  env.pop("XLA_FLAGS", None)
  multi = str(tmp_path / "multi")
  shutil.copytree(single, multi)  # re-encoding over a 1-process token set
  result = subprocess.run(
      ["bash", "launch/multiprocess_local.sh",
       "--config=configs/blae_fashion_mnist.py:smoke",
       "--config.stage=blae_encode", f"--config.inputs.blae_workdir={blae_dir}",
       f"--workdir={multi}"],
      cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

  with open(paths["test"]) as f:
    one = json.load(f)
  with open(tokens_lib.manifest_path(multi, "test")) as f:
    two = json.load(f)
  assert [s["count"] for s in one.pop("shards")] == [10_000]
  assert [(s["start"], s["count"]) for s in two.pop("shards")] == [
      (0, 5000), (5000, 5000)]
  assert one == two
  assert one["blae_workdir"] == blae_dir and one["checkpoint_step"] == 2
  parts = [np.load(os.path.join(multi, "tokens_test",
                                f"tokens-0000{p}-of-00002.npy"))
           for p in range(2)]
  ref = load_tokens(paths["test"])
  assert ref["tokens"].shape == (10_000, 8, 8, 1)
  np.testing.assert_array_equal(np.concatenate(parts), ref["tokens"])
  got = load_tokens(tokens_lib.manifest_path(multi, "test"))
  np.testing.assert_array_equal(got["tokens"], ref["tokens"])
  np.testing.assert_array_equal(got["labels"], ref["labels"])
  assert sorted(os.listdir(os.path.join(multi, "tokens_test"))) == [
      f"{kind}-0000{p}-of-00002.npy" for kind in ("labels", "tokens")
      for p in range(2)]  # the 1-process shards are gone
