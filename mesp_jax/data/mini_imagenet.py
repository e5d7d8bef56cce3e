"""A miniature ImageNet in tfds format, made on the spot with no network.

  python -m mesp_jax.data.mini_imagenet --data_dir=runs/mini_imagenet

writes a tfds ``imagenet2012`` build in array_record format (the real
builder's features: JPEG ``image``, ``label`` over 1000 classes,
``file_name``) with ``train`` and ``validation`` splits of JPEGs of varied
sizes (sides 48-320 px) and aspect ratios (1:2 to 2:1), about one in ten
greyscale, the rest RGB, quality 75-95. Each image is a smooth pattern whose
colours, stripe orientation and frequency and blob position come from the
label, plus mild noise, so a small model can learn something. It is read
exactly like the real build (``tfds.data_source`` without TensorFlow), so
smoke runs exercise the real decode and crop path: point a config at it with
``config.data.data_dir=DIR``.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

NAME = "imagenet2012"
SPLITS = ("train", "validation")
TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
MAX_SHARDS = 4
MIN_SHARD = 16  # examples per shard at least, when there are several


def _shape(rng: np.random.Generator) -> tuple[int, int]:
  """(h, w): long side 48-320 px, aspect ratio 1-2, either orientation."""
  long = int(rng.integers(48, 321))
  short = max(48, round(long / np.exp(rng.uniform(0, np.log(2)))))
  return (long, short) if rng.random() < 0.5 else (short, long)


def _pixels(rng: np.random.Generator, label: int) -> np.ndarray:
  """uint8 [h, w, 3]: the label's colours, stripes and blob, plus noise."""
  code = np.random.default_rng([label, 12345])  # the class's own look
  c0, c1, c2 = code.uniform(0, 255, (3, 3, 1, 1)).astype(np.float32)
  angle, freq = code.uniform(0, np.pi), code.uniform(0.5, 3.0)
  cx, cy = code.uniform(0.2, 0.8, 2)
  h, w = _shape(rng)
  y = np.arange(h, dtype=np.float32) / h
  x = np.arange(w, dtype=np.float32) / w
  # Stripes sin(a x + b y + p) and a Gaussian blob, both separable in x, y;
  # channels first, as numpy broadcasts a trailing axis of 3 slowly.
  a = 2 * np.pi * freq * np.cos(angle)
  b, p = 2 * np.pi * freq * np.sin(angle), rng.uniform(-0.5, 0.5)
  stripes = np.outer(np.sin(b * y + p), np.cos(a * x))
  stripes += np.outer(np.cos(b * y + p), np.sin(a * x))
  blob = np.outer(np.exp(-((y - cy) ** 2) / 0.03),
                  np.exp(-((x - cx) ** 2) / 0.03))
  base = c1 + (c0 - c1) * (0.5 + 0.5 * stripes)
  pixels = base + (c2 - base) * blob
  pixels += rng.integers(-8, 9, (h, w), dtype=np.int16)  # mild noise
  return np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()


def _jpeg(rng: np.random.Generator, label: int) -> bytes:
  """One JPEG of the label's pattern; about one in ten greyscale (mode L)."""
  image = Image.fromarray(_pixels(rng, label))
  if rng.random() < 0.1:
    image = image.convert("L")
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
  return buf.getvalue()


def _write_split(builder, folder: str, split: str, n: int,
                 rng: np.random.Generator, num_classes: int):
  """Writes ``n`` examples of ``split`` in up to MAX_SHARDS shards."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module

  num_shards = max(1, min(MAX_SHARDS, n // MIN_SHARD))
  bounds = np.linspace(0, n, num_shards + 1).astype(int)
  features = builder.info.features
  wnids = features["label"].names
  num_bytes = 0
  for shard in range(num_shards):
    path = os.path.join(folder, f"{NAME}-{split}.array_record-"
                        f"{shard:05d}-of-{num_shards:05d}")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for index in range(bounds[shard], bounds[shard + 1]):
      label = int(rng.integers(num_classes))
      file_name = (f"{wnids[label]}_{index}.JPEG" if split == "train" else
                   f"ILSVRC2012_val_{index + 1:08d}.JPEG")
      record = features.serialize_example(
          {"image": _jpeg(rng, label), "label": label, "file_name": file_name})
      writer.write(record)
      num_bytes += len(record)
    writer.close()
  return tfds.core.SplitInfo(
      name=split, shard_lengths=[int(k) for k in np.diff(bounds)],
      num_bytes=num_bytes,
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=folder, template=TEMPLATE, dataset_name=NAME, split=split,
          filetype_suffix="array_record"))


def make_mini_imagenet(data_dir: str, *, num_train: int = 2000,
                       num_validation: int = 200, seed: int = 0,
                       num_classes: int = 1000, overwrite: bool = False
                       ) -> str:
  """Writes the build under ``data_dir/imagenet2012/<version>``; returns it.

  Labels are uniform over ``range(num_classes)`` (the features always have
  1000 classes). Deterministic for a seed. Written into a temporary folder
  and moved into place at the end, so an interrupted run never leaves a
  build that looks complete.

  Raises:
    FileExistsError: a build exists and ``overwrite`` is False.
    ValueError: bad counts.
  """
  import tensorflow_datasets as tfds

  if min(num_train, num_validation) < 1:
    raise ValueError(f"num_train={num_train} and num_validation="
                     f"{num_validation} must be >= 1")
  if not 1 <= num_classes <= 1000:
    raise ValueError(f"num_classes={num_classes}; imagenet2012 has 1000")
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  builder = tfds.builder(NAME, data_dir=data_dir, file_format="array_record")
  final = builder.data_dir

  def refuse_existing():
    if os.path.exists(final) and not overwrite:
      raise FileExistsError(f"{final} exists; pass overwrite=True "
                            "(--overwrite) or choose another data_dir")

  refuse_existing()
  os.makedirs(os.path.dirname(final), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-",
                         dir=os.path.dirname(final))
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would carry over to the build
    rng = np.random.default_rng(seed)
    splits = [_write_split(builder, tmp, split, n, rng, num_classes)
              for split, n in zip(SPLITS, (num_train, num_validation),
                                  strict=True)]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.set_file_format("array_record")
    builder.info.write_to_directory(tmp)
    # The shards are found relative to the build folder on reading, so the
    # moved build reads from its own place.
    refuse_existing()
    if os.path.exists(final):
      shutil.rmtree(final)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True,
                      help="tfds data_dir to write imagenet2012/<version> in")
  parser.add_argument("--num_train", type=int, default=2000)
  parser.add_argument("--num_validation", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing build")
  args = parser.parse_args(argv)
  path = make_mini_imagenet(args.data_dir, num_train=args.num_train,
                            num_validation=args.num_validation,
                            seed=args.seed, overwrite=args.overwrite)
  data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
  print(f"wrote a miniature imagenet2012 ({args.num_train} train, "
        f"{args.num_validation} validation JPEGs) to {path}\n"
        f"point a config at it with config.data.data_dir={data_dir} "
        f"(e.g. --config.data.data_dir={data_dir})")


if __name__ == "__main__":
  main()
