"""Input-pipeline throughput: ``python -m mesp_jax.bench data [args]``.

Times the grain training pipeline (:class:`mesp_jax.data.pipeline.GrainLoader`:
JPEG decode with DCT-domain downscaling, Inception crop, flip, batching) with
0, 1, 2, ... decode worker processes (``--workers``), in images/s after a
warm-up, on a tfds ``imagenet2012`` build: ``--data_dir`` (the real one, or
any build), else a miniature ImageNet written to a temporary folder first
(:mod:`mesp_jax.data.mini_imagenet`; its JPEGs are 48-320 px, smaller than
ImageNet's ~400x350, so decoding is cheaper than on the real data).

Then it times the train step of a BL-AE config (``--blae-config``, default
the ImageNet smoke) on random images of the same size, and prints the ratio
pipeline images/s / step images/s per worker count: above 1 the pipeline
keeps up with the step on this machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax

from mesp_jax.data.pipeline import GrainLoader
from mesp_jax.data.records import TfdsRecords


def time_pipeline(records, *, workers: int, image_size: int, batch: int,
                  batches: int, warmup: int) -> float:
  """Images/s of ``batches`` training batches after ``warmup`` ones."""
  loader = GrainLoader(records, image_size=image_size, channels=3,
                       global_batch_size=batch, seed=0, augment="inception",
                       min_scale=0.35, workers=workers, process_index=0,
                       process_count=1)
  try:
    for _ in range(warmup):  # starts the workers, fills their buffers
      next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(loader)
    return batches * batch / (time.perf_counter() - t0)
  finally:
    loader.close()


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m mesp_jax.bench data", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default="",
                      help="tfds dir holding an imagenet2012 build (default: "
                      "make a miniature one in a temporary folder)")
  parser.add_argument("--split", default="train")
  parser.add_argument("--mini-examples", type=int, default=512,
                      help="size of the miniature build (default 512)")
  parser.add_argument("--workers", default="0,1,2",
                      help="comma-separated worker counts (default 0,1,2)")
  parser.add_argument("--image-size", type=int, default=64,
                      help="output crop size (default 64, the smoke BL-AE)")
  parser.add_argument("--batch", type=int, default=32, help="default 32")
  parser.add_argument("--batches", type=int, default=20,
                      help="timed batches per worker count (default 20)")
  parser.add_argument("--warmup", type=int, default=3, help="default 3")
  parser.add_argument("--blae-config", default="configs/blae_imagenet.py:smoke",
                      help="BL-AE config whose train step is the reference "
                      "('' to skip)")
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir
    if not data_dir:
      from mesp_jax.data.mini_imagenet import make_mini_imagenet
      data_dir = os.path.join(tmp, "tfds")
      t0 = time.perf_counter()
      make_mini_imagenet(data_dir, num_train=args.mini_examples,
                         num_validation=8, seed=0)
      print(f"miniature ImageNet: {args.mini_examples} JPEGs in "
            f"{time.perf_counter() - t0:.1f} s", flush=True)
    records = TfdsRecords("imagenet2012", args.split, data_dir)
    rows = []
    for w in (int(x) for x in args.workers.split(",")):
      rate = time_pipeline(records, workers=w, image_size=args.image_size,
                           batch=args.batch, batches=args.batches,
                           warmup=args.warmup)
      rows.append((w, rate))
      print(f"workers={w}: {rate:.0f} images/s", flush=True)

  step_rate = None
  if args.blae_config:
    from mesp_jax.benchmarks import train as train_bench
    r = train_bench.run(args.blae_config, steps=5, warmup=2,
                        batch_size=args.batch)
    step_rate = r["images_per_s"]
  print(f"\nbackend {jax.default_backend()}, {os.cpu_count()} CPUs, crops "
        f"{args.image_size}px, batch {args.batch}")
  if step_rate:
    print(f"BL-AE train step ({args.blae_config}, {jax.device_count()} "
          f"device(s)): {step_rate:.0f} images/s\n")
  print("| workers | pipeline images/s | pipeline / BL-AE step |")
  print("|---|---|---|")
  for w, rate in rows:
    ratio = f"{rate / step_rate:.2f}" if step_rate else "-"
    print(f"| {w} | {rate:.0f} | {ratio} |")
