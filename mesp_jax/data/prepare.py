"""Prepares a tfds dataset as an array_record build (needs network access).

  python -m mesp_jax.data.prepare --dataset=cifar10 --data_dir=~/tensorflow_datasets

ImageNet additionally needs ``--manual_dir`` holding the original tar files.
Some tfds builders encode images with tensorflow while preparing; if the
preparation fails with a tensorflow import error, ``pip install
tensorflow-cpu`` for this one step (training never needs it).
"""

from __future__ import annotations

import argparse
import os

from mesp_jax.data.sources import TFDS_NAMES, default_tfds_dir


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", required=True, choices=TFDS_NAMES)
  parser.add_argument("--data_dir", default=default_tfds_dir())
  parser.add_argument("--manual_dir", default=None)
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds
  data_dir = os.path.expanduser(args.data_dir)
  builder = tfds.builder(args.dataset, data_dir=data_dir,
                         file_format="array_record")
  config = tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(args.manual_dir)
      if args.manual_dir else None)
  builder.download_and_prepare(download_config=config)
  print(f"prepared {args.dataset} in {builder.data_dir}")


if __name__ == "__main__":
  main()
