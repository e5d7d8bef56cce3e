"""Data loading, sharding by process, bad input and config errors."""

import gzip
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mesp_jax.base import config as config_lib
from mesp_jax.base.config import load_config
from mesp_jax.data import DataNotFoundError, Loader, eval_batches, get_source
from mesp_jax.data.sources import ArraySource, read_idx


def tiny_source(n=50):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
      (1, 4, 4, 1), np.uint8)
  return ArraySource(images, np.arange(n))


def test_loader_is_deterministic_and_resumes():
  a, b = Loader(tiny_source(), 8, seed=3), Loader(tiny_source(), 8, seed=3)
  first = [next(a)["label"] for _ in range(9)]  # crosses an epoch boundary
  np.testing.assert_array_equal(np.concatenate(first),
                                np.concatenate([next(b)["label"]
                                                for _ in range(9)]))
  resumed = Loader(tiny_source(), 8, seed=3)
  resumed.set_state({"step": 5, "seed": 3})
  np.testing.assert_array_equal(next(resumed)["label"], first[5])
  # An epoch is a permutation: 6 batches of 8 from 50 see 48 distinct items.
  assert len(set(np.concatenate(first[:6]).tolist())) == 48


def test_process_slices_make_up_the_global_batch():
  whole = Loader(tiny_source(), 12, seed=0, process_index=0, process_count=1)
  parts = [Loader(tiny_source(), 12, seed=0, process_index=i, process_count=3)
           for i in range(3)]
  for _ in range(5):
    global_batch = next(whole)["label"]
    np.testing.assert_array_equal(
        np.concatenate([next(p)["label"] for p in parts]), global_batch)


def test_eval_batches_cover_each_example_once():
  labels, n = [], 0
  for batch in eval_batches(tiny_source(), 16, num_examples=37):
    labels.append(batch["label"][batch["mask"]])
    n += int(batch["mask"].sum())
  assert n == 37
  np.testing.assert_array_equal(np.concatenate(labels), np.arange(37))


def test_loader_state_mismatch_is_refused():
  loader = Loader(tiny_source(), 8, seed=0)
  with pytest.raises(ValueError, match="global_batch_size"):
    loader.set_state({"step": 1, "global_batch_size": 16})


def test_fashion_mnist_matches_the_idx_files():
  source = get_source("fashion_mnist", "test", image_size=32)
  raw = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
  assert len(source) == 10_000 and source.image_shape == (32, 32, 1)
  np.testing.assert_array_equal(source.images[:5, 2:30, 2:30, 0], raw[:5])
  assert source.images[:, :2].max() == 0  # the padding is background


def test_truncated_idx_file_is_a_clear_error(tmp_path):
  path = tmp_path / "bad-idx.gz"
  with gzip.open(path, "wb") as f:
    f.write(bytes([0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28, 1, 2]))
  with pytest.raises(ValueError, match="truncated"):
    read_idx(str(path))


def test_missing_data_fails_fast_with_instructions(tmp_path):
  t0 = time.time()
  with pytest.raises(DataNotFoundError, match="mesp_jax.data.prepare"):
    get_source("cifar10", "train", data_dir=str(tmp_path))
  with pytest.raises(DataNotFoundError, match="apt-get install"):
    get_source("fashion_mnist", "train", data_dir=str(tmp_path),
               fashion_mnist_dir=str(tmp_path / "none"))
  assert time.time() - t0 < 10


def test_unknown_dataset_and_bad_field_name_the_field(repo_root):
  with pytest.raises(ValueError, match="config.data.name"):
    get_source("cifar100", "train")
  config = load_config(os.path.join(repo_root,
                                    "configs/blae_fashion_mnist.py:smoke"))
  config.blae.family = "unet"
  with pytest.raises(ValueError, match=r"config\.blae\.family.*full_res"):
    config_lib.validate(config, "blae")
  config.blae.family = "downsample"
  config.blae.downsample_factor = 3
  with pytest.raises(ValueError, match="downsample_factor"):
    config_lib.validate(config, "blae")
  with pytest.raises(ValueError, match="unknown variant"):
    load_config(os.path.join(repo_root, "configs/blae_fashion_mnist.py:tiny"))


def test_config_typo_on_the_command_line(repo_root, tmp_path):
  def main_with(override):
    return subprocess.run(
        [sys.executable, "-m", "mesp_jax.main",
         "--config=configs/blae_fashion_mnist.py:smoke", override,
         f"--workdir={tmp_path}"],
        cwd=repo_root, capture_output=True, text=True, timeout=120)

  result = main_with("--config.blae.widht=3")
  assert result.returncode != 0
  assert "widht" in result.stderr
  result = main_with("--config.stage=trian")
  assert result.returncode != 0
  assert "config.stage='trian'" in result.stderr and "blae" in result.stderr
