"""Random-access image sources.

A source has ``len(source)`` and ``source.read(indices) -> dict`` of numpy
arrays: ``image`` uint8 ``[n, H, W, C]`` at the configured size and ``label``
int32 ``[n]``. Everything is read TF-free:

* ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` IDX files (default
  ``/usr/share/datasets/fashion-mnist``), else a tfds array_record build;
  padded from 28x28 to 32x32.
* ``mnist``, ``cifar10``, ``celeb_a``, ``imagenet2012``: a tfds build in
  ``array_record`` format read with ``tfds.data_source``. When the build is
  absent a :class:`DataNotFoundError` says how to prepare it; nothing tries the
  network (which would retry for minutes offline).
"""

from __future__ import annotations

import glob
import gzip
import os
import struct

import numpy as np

from mesp_jax.base.config import ConfigError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
TFDS_NAMES = ("mnist", "cifar10", "celeb_a", "imagenet2012", "fashion_mnist")
DATASETS = ("fashion_mnist",) + tuple(n for n in TFDS_NAMES
                                      if n != "fashion_mnist")


class DataNotFoundError(FileNotFoundError):
  """The requested data is not on this machine; the message says what to do."""


class DataError(ValueError):
  """Data on disk that cannot be used as it is (truncated, corrupt, another
  format or out-of-range values); the message names the file, what is wrong
  and what to do."""


_REPLACE_FILE = "replace the file with a good copy"
FASHION_MNIST_FIX = (
    "reinstall the data (sudo apt-get install --reinstall "
    "dataset-fashion-mnist) or point config.data.fashion_mnist_dir at a "
    "folder holding the four original Fashion-MNIST IDX files")


def read_idx(path: str, ndim: int | None = None,
             fix: str = _REPLACE_FILE) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) of unsigned bytes.

  Args:
    path: the file.
    ndim: the number of dimensions it must have (None: any).
    fix: what the error message tells the user to do.

  Raises:
    DataError: the file is unreadable, truncated, not an unsigned-byte IDX
      file or has another number of dimensions; the message names it.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:  # BadGzipFile, a truncated stream, ...
    raise DataError(f"{path} is unreadable ({e}): the file is damaged or "
                    f"truncated; {fix}") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise DataError(f"{path} is not an IDX file (bad magic number "
                    f"{data[:4].hex() or 'none: the file is empty'}); {fix}")
  dtype_code, dims = data[2], data[3]
  if dtype_code != 0x08:
    raise DataError(f"{path} is an IDX file of type 0x{dtype_code:02x}, not "
                    f"of unsigned bytes (0x08); {fix}")
  if ndim is not None and dims != ndim:
    raise DataError(f"{path} holds a {dims}-dimensional array, expected "
                    f"{ndim} dimensions; {fix}")
  if len(data) < 4 + 4 * dims:
    raise DataError(f"{path} is truncated inside its header; {fix}")
  shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
  if body.size != int(np.prod(shape)):
    state = "truncated" if body.size < int(np.prod(shape)) else "too long"
    raise DataError(f"{path} is {state}: its header promises {shape} = "
                    f"{int(np.prod(shape))} values, the file holds "
                    f"{body.size}; {fix}")
  return body.reshape(shape)


class ArraySource:
  """In-memory source over uint8 images ``[N, H, W, C]`` and labels ``[N]``."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = ""):
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError("images must be uint8 [N, H, W, C]")
    if len(images) != len(labels):
      raise ValueError("images and labels differ in length")
    self.images = images
    self.labels = labels.astype(np.int32)
    self.name = name

  def __len__(self) -> int:
    return len(self.images)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    return {"image": self.images[indices], "label": self.labels[indices]}


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads [N, h, w, C] uint8 images symmetrically to [N, size, size, C]."""
  n, h, w, c = images.shape
  if h > size or w > size:
    raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}")
  top, left = (size - h) // 2, (size - w) // 2
  out = np.zeros((n, size, size, c), np.uint8)
  out[:, top:top + h, left:left + w] = images
  return out


def _fashion_mnist_debian(split: str, directory: str) -> ArraySource | None:
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise ConfigError(f"fashion_mnist has the splits 'train' and 'test', not "
                      f"{split!r}: set config.data.train_split / eval_split "
                      f"(or config.encode.splits) to those")
  images_path, labels_path = _fashion_mnist_files(split, directory)
  if not (os.path.exists(images_path) and os.path.exists(labels_path)):
    return None
  images = read_idx(images_path, 3, FASHION_MNIST_FIX)  # [N, 28, 28]
  labels = read_idx(labels_path, 1, FASHION_MNIST_FIX)  # [N]
  if images.shape[1:] != (28, 28):
    raise DataError(f"{images_path} holds {images.shape[1]}x"
                    f"{images.shape[2]} images, not Fashion-MNIST's 28x28 "
                    f"grey ones; {FASHION_MNIST_FIX}")
  if len(labels) != len(images):
    raise DataError(f"{labels_path} holds {len(labels)} labels but "
                    f"{images_path} {len(images)} images: the two files "
                    f"come from different sets; {FASHION_MNIST_FIX}")
  if labels.size and labels.max() > 9:
    raise DataError(f"{labels_path} holds the label {int(labels.max())}; "
                    f"Fashion-MNIST has the classes 0..9; {FASHION_MNIST_FIX}")
  return ArraySource(images[..., None], labels, name=f"fashion_mnist/{split}")


def _fashion_mnist_files(split: str, directory: str) -> tuple[str, str]:
  """(images, labels) IDX paths of a Fashion-MNIST split in ``directory``."""
  prefix = {"train": "train", "test": "t10k"}[split]
  return (os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
          os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))


def _tfds_build_dir(name: str, data_dir: str) -> str | None:
  """The newest version folder of a tfds build holding array_record files."""
  pattern = os.path.join(data_dir, name, "*", "*", "*.array_record*")
  files = sorted(glob.glob(pattern)) or sorted(
      glob.glob(os.path.join(data_dir, name, "*", "*.array_record*")))
  return os.path.dirname(files[-1]) if files else None


def default_tfds_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR",
                        os.path.expanduser("~/tensorflow_datasets"))


def _prepare_hint(name: str, data_dir: str) -> str:
  manual = ""
  if name == "imagenet2012":
    manual = (" ImageNet needs the original tar files in a manual_dir: "
              "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
              "from image-net.org into MANUAL_DIR and add "
              "--manual_dir=MANUAL_DIR.")
  return (
      f"tfds dataset {name!r} is not prepared in {data_dir!r} (no "
      f"array_record files). On a machine with network access run\n"
      f"  python -m mesp_jax.data.prepare --dataset={name} "
      f"--data_dir={data_dir}\n"
      f"(it calls tfds download_and_prepare with file_format=array_record), "
      f"then copy the folder here or set config.data.data_dir / "
      f"TFDS_DATA_DIR.{manual}")


class TfdsSource:
  """TF-free reader of a tfds array_record build through ``tfds.data_source``."""

  def __init__(self, name: str, split: str, data_dir: str, image_size: int):
    import tensorflow_datasets as tfds  # heavy import, only when needed
    if _tfds_build_dir(name, data_dir) is None:
      raise DataNotFoundError(_prepare_hint(name, data_dir))
    self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                    download=False)
    self.name = f"{name}/{split}"
    self.image_size = image_size
    self._dataset = name

  def __len__(self) -> int:
    return len(self._source)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.read(np.array([0]))["image"].shape[1:]

  def _convert(self, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    h, w, _ = image.shape
    s = self.image_size
    if (h, w) == (s, s):
      return image
    if h <= s and w <= s:
      return pad_to(image[None], s)[0]
    from PIL import Image
    side = min(h, w)  # centre crop to a square, then resize
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top:top + side, left:left + side]
    pil = Image.fromarray(crop.squeeze(-1) if crop.shape[-1] == 1 else crop)
    out = np.asarray(pil.resize((s, s), Image.BICUBIC), np.uint8)
    return out[..., None] if out.ndim == 2 else out

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = [self._source[int(i)] for i in np.asarray(indices)]
    images = np.stack([self._convert(r["image"]) for r in records])
    labels = np.asarray([int(r.get("label", 0)) for r in records], np.int32)
    return {"image": images, "label": labels}


def source_from_config(data_cfg, split: str):
  """``get_source`` for a ``config.data`` section (name, image_size, dirs)."""
  kw = dict(image_size=data_cfg.image_size,
            data_dir=data_cfg.get("data_dir") or None,
            channels=data_cfg.get("channels", 0))
  if data_cfg.get("fashion_mnist_dir"):
    kw["fashion_mnist_dir"] = data_cfg.fashion_mnist_dir
  return get_source(data_cfg.name, split, **kw)


def train_loader(data_cfg, source, global_batch_size: int, seed: int):
  """The training batches of ``source`` for a ``config.data`` section.

  ``data.pipeline='auto'`` reads encoded images (imagenet2012, folder)
  through grain (:class:`~mesp_jax.data.pipeline.GrainLoader`: workers,
  crops) and the small in-memory sets through the in-memory
  :class:`~mesp_jax.data.loader.Loader`; 'grain' or 'memory' force one.
  Both give the same batch format and checkpointable position.
  """
  from mesp_jax.data.loader import Loader
  from mesp_jax.data.pipeline import GrainLoader
  from mesp_jax.data.records import ArrayRecords
  choice = data_cfg.get("pipeline", "auto")
  records = getattr(source, "records", None)
  if choice == "memory" or (choice == "auto" and records is None):
    if records is not None:
      raise ConfigError(
          f"config.data.pipeline='memory' needs an in-memory data set; "
          f"{data_cfg.name!r} holds encoded images: use 'grain' or 'auto'")
    return Loader(source, global_batch_size, seed)
  if records is None:
    records = ArrayRecords(source)
  return GrainLoader(
      records, image_size=data_cfg.image_size,
      channels=source.image_shape[-1], global_batch_size=global_batch_size,
      seed=seed, augment=data_cfg.get("augment", "none"),
      min_scale=data_cfg.get("crop_min_scale", 0.08),
      flip=data_cfg.get("flip", True), workers=data_cfg.get("workers", 0))


def train_eval_sources(data_cfg):
  """(train source, eval source) of a ``config.data`` section."""
  return (source_from_config(data_cfg, data_cfg.get("train_split", "train")),
          source_from_config(data_cfg, data_cfg.get("eval_split", "test")))


def image_channels(name: str, channels: int = 0) -> int:
  """Channels of a data set's images (1 grey, 3 RGB); ``channels`` (the
  ``config.data.channels`` field, 0 = the set's own) overrides it."""
  if channels:
    return int(channels)
  return 1 if name in ("fashion_mnist", "mnist") else 3


def data_channels(data_cfg) -> int:
  """:func:`image_channels` of a ``config.data`` section."""
  return image_channels(data_cfg.name, data_cfg.get("channels", 0))


def get_source(name: str, split: str, *, image_size: int = 32,
               data_dir: str | None = None,
               fashion_mnist_dir: str = DEBIAN_FASHION_MNIST,
               channels: int = 0):
  """Returns a random-access source for ``name``/``split``.

  ``imagenet2012`` and ``folder`` give an
  :class:`~mesp_jax.data.records.ImageSource` (centre crops for ``read``;
  its ``records`` feed the grain training pipeline).

  Raises:
    DataNotFoundError: quickly (no network retries) with preparation steps.
    ConfigError: unknown dataset or split (a ValueError).
  """
  from mesp_jax.data import records as records_lib
  if name not in DATASETS + ("folder",):
    raise ConfigError(f"config.data.name={name!r} is not supported; choose "
                      f"one of {list(DATASETS) + ['folder']}")
  if name == "folder":
    if not data_dir:
      raise DataNotFoundError(
          "config.data.name='folder' needs config.data.data_dir: a directory "
          "with one sub-folder per class")
    return records_lib.ImageSource(records_lib.FolderRecords(data_dir, split),
                                   image_size, image_channels(name, channels))
  data_dir = data_dir or default_tfds_dir()
  if name == "imagenet2012":
    if _tfds_build_dir(name, data_dir) is None:
      raise DataNotFoundError(_prepare_hint(name, data_dir))
    return records_lib.ImageSource(
        records_lib.TfdsRecords(name, split, data_dir), image_size,
        image_channels(name, channels))
  if name == "fashion_mnist":
    source = _fashion_mnist_debian(split, fashion_mnist_dir)
    if source is not None:
      images = source.images
      if images.shape[1] > image_size:
        raise ConfigError(
            f"config.data.image_size={image_size} is smaller than "
            f"Fashion-MNIST's {images.shape[1]}x{images.shape[2]} images "
            f"(they are zero-padded, never shrunk): use "
            f"{images.shape[1]} or more (32 is the default)")
      if images.shape[1] != image_size:
        images = pad_to(images, image_size)
      return ArraySource(images, source.labels, source.name)
    if _tfds_build_dir(name, data_dir) is None:
      present = [p for p in _fashion_mnist_files(split, fashion_mnist_dir)
                 if os.path.exists(p)]
      partial = (f" (only {present[0]} of the pair is there: the install "
                 f"is incomplete)" if present else "")
      raise DataNotFoundError(
          f"Fashion-MNIST not found: neither Debian's IDX files in "
          f"{fashion_mnist_dir!r}{partial} nor a tfds array_record build in "
          f"{data_dir!r}. Install the data with\n"
          f"  sudo apt-get update && sudo apt-get install -y "
          f"dataset-fashion-mnist\n"
          f"or, with network access, python -m mesp_jax.data.prepare "
          f"--dataset=fashion_mnist --data_dir={data_dir}")
  return TfdsSource(name, split, data_dir, image_size)
