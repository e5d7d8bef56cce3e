"""Encoded-image record sources: a tfds array_record build, or a folder.

A record source has ``len(records)`` and ``records[i] -> {'image', 'label'}``
where ``image`` is the encoded file (bytes: JPEG, PNG, ...) or a decoded
uint8 array, and ``label`` an int. It is what the grain pipeline
(:mod:`mesp_jax.data.pipeline`) shuffles, shards and decodes in worker
processes, so it must pickle cheaply: both sources here pickle as their
arguments and reopen their files in each process.

:class:`ImageSource` turns a record source into the random-access ``read``
interface of :mod:`mesp_jax.data.sources` (resize-small + centre crop), which
evaluation and encoding use.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mesp_jax.data import image_ops

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                    ".tiff", ".ppm", ".pgm")


class TfdsRecords:
  """Records of a tfds array_record build, the images left encoded.

  Read with ``tfds.data_source`` (no TensorFlow) and ``SkipDecoding`` on the
  image feature, so the JPEG bytes reach the pipeline's decoder, which
  downscales in the DCT domain before the crop.
  """

  def __init__(self, name: str, split: str, data_dir: str):
    self.args = (name, split, data_dir)
    self.name = f"{name}/{split}"
    self._source = None
    self._len = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds
      name, split, data_dir = self.args
      self._source = tfds.data_source(
          name, split=split, data_dir=data_dir, download=False,
          decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self):
    return {"args": self.args, "name": self.name, "_len": self._len}

  def __setstate__(self, state):
    self.__dict__.update(state, _source=None)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    record = self._open()[int(index)]
    return {"image": record["image"], "label": int(record.get("label", 0))}


def _list_folder(root: str) -> tuple[list[str], list[int], list[str]]:
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)))
  paths, labels = [], []
  for label, cls in enumerate(classes):
    for dirpath, _, files in sorted(os.walk(os.path.join(root, cls))):
      for f in sorted(files):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(dirpath, f))
          labels.append(label)
  return paths, labels, classes


class FolderRecords:
  """Images in ``root/<class>/...`` (any common format), one label per class.

  Classes are the sub-folder names in sorted order. When ``root`` has a
  folder named like the split (``root/train``, ``root/test``), that folder is
  the split's root; otherwise every split reads ``root`` itself.
  """

  def __init__(self, root: str, split: str):
    from mesp_jax.data.sources import DataNotFoundError
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
      raise DataNotFoundError(
          f"config.data.data_dir={root!r} is not a folder; for "
          f"config.data.name='folder' give a directory with one sub-folder "
          f"per class (optionally inside split folders such as train/ and "
          f"test/)")
    split_root = os.path.join(root, split)
    self.root = split_root if os.path.isdir(split_root) else root
    self.paths, self.labels, self.classes = _list_folder(self.root)
    if not self.paths:
      raise DataNotFoundError(
          f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders "
          f"of {self.root!r}; expected {self.root}/<class name>/<image>")
    self.name = f"folder:{self.root}"

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    path = self.paths[int(index)]
    with open(path, "rb") as f:
      return {"image": f.read(), "label": self.labels[int(index)],
              "path": path}


class ArrayRecords:
  """An in-memory :class:`~mesp_jax.data.sources.ArraySource` as records."""

  def __init__(self, source):
    self.source = source
    self.name = source.name

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    row = self.source.read(np.array([int(index)]))
    return {"image": row["image"][0], "label": int(row["label"][0])}


def decode_error(record: dict, index: int, error: Exception) -> ValueError:
  where = record.get("path", f"record {index}")
  return ValueError(f"cannot decode image {where}: {error}. Remove or "
                    f"replace the file (or re-prepare the data set).")


class ImageSource:
  """Random-access source of centre-cropped images from a record source.

  ``read(indices)`` returns ``image`` uint8 ``[n, size, size, channels]``
  (resize-small + centre crop, decoding on a few threads) and ``label``.
  ``records`` stays available for the training pipeline.
  """

  def __init__(self, records, image_size: int, channels: int = 3,
               threads: int | None = None):
    self.records = records
    self.image_size = image_size
    self.channels = channels
    self.name = records.name
    self.threads = threads or min(8, os.cpu_count() or 1)

  def __len__(self) -> int:
    return len(self.records)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def _one(self, index: int) -> tuple[np.ndarray, int]:
    record = self.records[index]
    try:
      image = image_ops.eval_crop(record["image"], self.image_size,
                                  channels=self.channels)
    except ValueError as e:
      raise decode_error(record, index, e) from e
    return image, record["label"]

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = [int(i) for i in np.asarray(indices)]
    if len(indices) > 1 and self.threads > 1:
      with ThreadPoolExecutor(self.threads) as pool:
        rows = list(pool.map(self._one, indices))
    else:
      rows = [self._one(i) for i in indices]
    return {"image": np.stack([r[0] for r in rows]),
            "label": np.asarray([r[1] for r in rows], np.int32)}
