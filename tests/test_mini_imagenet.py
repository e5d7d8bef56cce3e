"""The miniature ImageNet: a tfds build read back without TensorFlow."""

from __future__ import annotations

import glob
import io
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mesp_jax.data import mini_imagenet
from mesp_jax.data.mini_imagenet import main, make_mini_imagenet

COUNTS = {"train": 40, "validation": 12}


def read(data_dir: str, split: str, skip_decoding: bool = True) -> list[dict]:
  decoders = {"image": tfds.decode.SkipDecoding()} if skip_decoding else None
  source = tfds.data_source("imagenet2012", split=split, data_dir=data_dir,
                            download=False, decoders=decoders)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[str, str]:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  path = make_mini_imagenet(data_dir, num_train=COUNTS["train"],
                            num_validation=COUNTS["validation"], seed=0)
  return data_dir, path


def test_layout(build):
  data_dir, path = build
  assert path == os.path.join(data_dir, "imagenet2012", "5.1.0")
  assert os.path.exists(os.path.join(path, "dataset_info.json"))
  # 40 examples in 2 shards, 12 in 1; no temporary folder is left behind.
  assert len(glob.glob(os.path.join(path, "*-train.array_record-*"))) == 2
  assert len(glob.glob(os.path.join(path, "*-validation.array_record-*"))) == 1
  assert os.listdir(os.path.dirname(path)) == ["5.1.0"]
  assert os.stat(path).st_mode & 0o755 == 0o755
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("split", list(COUNTS))
def test_reads_back_through_tfds(build, split):
  data_dir, _ = build
  raw = read(data_dir, split)
  decoded = read(data_dir, split, skip_decoding=False)
  assert len(raw) == len(decoded) == COUNTS[split]
  names = [r["file_name"].decode() for r in raw]
  assert len(set(names)) == len(names)  # every shard read once
  pattern = "n" if split == "train" else "ILSVRC2012_val_"
  assert all(n.startswith(pattern) and n.endswith(".JPEG") for n in names)
  for r, d in zip(raw, decoded, strict=True):
    assert isinstance(r["image"], bytes) and 0 <= r["label"] < 1000
    assert r["label"] == d["label"]
    image = Image.open(io.BytesIO(r["image"]))
    assert image.format == "JPEG" and image.mode in ("L", "RGB")
    # tfds decodes with PIL too, grey JPEGs into the feature's 3 channels.
    want = np.asarray(image.convert("RGB"))
    assert d["image"].dtype == np.uint8
    np.testing.assert_array_equal(d["image"], want)


def test_images_vary(build):
  data_dir, _ = build
  images = [Image.open(io.BytesIO(r["image"]))
            for split in COUNTS for r in read(data_dir, split)]
  modes = [im.mode for im in images]
  assert 1 <= modes.count("L") <= len(images) // 3  # about one in ten
  sizes = {im.size for im in images}
  assert len(sizes) > len(images) // 2
  for w, h in sizes:
    assert 48 <= min(w, h) and max(w, h) <= 320 and max(w, h) <= 2 * min(w, h)
  labels = [r["label"] for r in read(data_dir, "train")]
  assert len(set(labels)) > 30  # spread over the 1000 classes


def test_content_depends_on_label():
  """Nearest neighbour on 8x8 thumbnails tells the classes apart."""
  rng = np.random.default_rng(0)
  labels = list(range(0, 1000, 100))

  def thumb(label):
    image = Image.fromarray(mini_imagenet._pixels(rng, label))
    return np.asarray(image.resize((8, 8), Image.BILINEAR), np.float32).ravel()

  train = np.stack([thumb(lab) for lab in labels])
  test = np.stack([thumb(lab) for lab in labels])
  distances = ((test[:, None] - train[None]) ** 2).sum(-1)
  assert (distances.argmin(1) == np.arange(len(labels))).mean() >= 0.8


def test_deterministic_for_a_seed(tmp_path):
  runs = []
  for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
    make_mini_imagenet(str(tmp_path / name), num_train=6, num_validation=3,
                       seed=seed)
    runs.append(read(str(tmp_path / name), "train"))
  assert runs[0] == runs[1]
  assert [r["image"] for r in runs[0]] != [r["image"] for r in runs[2]]


def test_existing_build_is_refused_unless_overwrite(tmp_path):
  make_mini_imagenet(str(tmp_path), num_train=3, num_validation=2, seed=0)
  with pytest.raises(FileExistsError, match="overwrite"):
    make_mini_imagenet(str(tmp_path), num_train=5, num_validation=2)
  assert len(read(str(tmp_path), "train")) == 3
  make_mini_imagenet(str(tmp_path), num_train=5, num_validation=2,
                     overwrite=True)
  assert len(read(str(tmp_path), "train")) == 5


def test_an_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
  calls = []

  def interrupted(rng, label):
    calls.append(label)
    if len(calls) > 4:
      raise KeyboardInterrupt
    return b""

  monkeypatch.setattr(mini_imagenet, "_jpeg", interrupted)
  with pytest.raises(KeyboardInterrupt):
    make_mini_imagenet(str(tmp_path), num_train=8, num_validation=2)
  assert os.listdir(tmp_path / "imagenet2012") == []


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="num_train"):
    make_mini_imagenet(str(tmp_path), num_train=0)
  with pytest.raises(ValueError, match="num_classes"):
    make_mini_imagenet(str(tmp_path), num_classes=1001)


def test_cli(tmp_path, capsys):
  data_dir = str(tmp_path / "mini")
  main([f"--data_dir={data_dir}", "--num_train=5", "--num_validation=3",
        "--seed=1"])
  out = capsys.readouterr().out
  assert f"config.data.data_dir={data_dir}" in out
  assert os.path.join(data_dir, "imagenet2012", "5.1.0") in out
  assert [len(read(data_dir, s)) for s in COUNTS] == [5, 3]
  with pytest.raises(FileExistsError):
    main([f"--data_dir={data_dir}", "--num_train=5", "--num_validation=3"])
  main([f"--data_dir={data_dir}", "--num_train=4", "--num_validation=3",
        "--overwrite"])
  assert len(read(data_dir, "train")) == 4
