"""ImageNet end to end: BL-AE -> tokens -> gamma-ARVM -> CFG samples -> report.

  python -m mesp_jax.main --config=configs/imagenet_pipeline.py --workdir=runs/imagenet

Runs ``configs/blae_imagenet.py`` into ``workdir/blae``, encodes the train
and validation splits into per-process token shards in ``workdir/tokens``,
trains ``configs/arvm_imagenet.py`` into ``workdir/arvm``, draws
class-conditional samples with classifier-free guidance from the EMA
parameters into ``workdir/samples`` and evaluates them (latent copy rate
against the training tokens, bits per token) into ``workdir/report.md``.
Every step resumes.

``:smoke`` runs the same path on the miniature ImageNet (make it with
``python -m mesp_jax.data.mini_imagenet --data_dir=runs/mini_imagenet``):
real JPEG decoding and crops, tiny models, a few steps.
"""

import os

import ml_collections

from mesp_jax.base.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = ""):
  if variant not in ("", "smoke"):
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  sub = f":{variant}" if variant else ""
  config = ml_collections.ConfigDict()
  config.stage = "pipeline"
  config.reencode = False
  config.blae = load_config(os.path.join(HERE, f"blae_imagenet.py{sub}"))
  config.arvm = load_config(os.path.join(HERE, f"arvm_imagenet.py{sub}"))
  config.evaluate_train_examples = 10_000 if not variant else 0
  return config
