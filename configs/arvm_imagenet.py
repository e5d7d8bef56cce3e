"""Class-conditional gamma-ARVM on ImageNet 256x256 BL-AE tokens.

The headline command::

  python -m mesp_jax.main --config=configs/arvm_imagenet.py --workdir=runs/imagenet/arvm

It trains on the tokens that ``configs/blae_imagenet.py`` encodes (16x16
positions x 24 bits, read memory-mapped from per-process shards), grouped
into two 12-bit tokens per position: 512 tokens per image, histogram head
2^12 = 4096 wide. 1000 classes plus the null label (id 1000) for
classifier-free guidance, labels dropped to null 10 % of the time. gamma = 4:
the model sees the already generated tokens within Chebyshev distance 4 (a
9x9 window), the local correlation hypothesis's regime.

Model: 24 layers, d_model 1024, 16 heads: 311,862,272 parameters (checked by
the tests). AdamW (warm-up, cosine decay, clipping at 1), bf16 activations
with float32 master weights, EMA 0.9999 (sampling uses the EMA parameters,
with CFG scale 2), gradient accumulation available through
``train.grad_accum_steps``.

Hardware: sized for a TPU v5p-128 slice (64 chips, 95 GiB HBM each): global
batch 1024 = 16 sequences of 512 tokens per chip, parameters and optimizer
state sharded over ``fsdp = 8``. A plan, not a measurement (nothing here has
run on a TPU); on a smaller slice keep the global batch and raise
``train.grad_accum_steps``.

Before it, in order (``configs/imagenet_pipeline.py`` runs all of it into
one workdir)::

  python -m mesp_jax.data.prepare --dataset=imagenet2012 --manual_dir=DIR
  python -m mesp_jax.main --config=configs/blae_imagenet.py --workdir=runs/imagenet/blae
  python -m mesp_jax.main --config=configs/blae_imagenet.py \\
      --config.stage=blae_encode --config.inputs.blae_workdir=runs/imagenet/blae \\
      --workdir=runs/imagenet/tokens

Sample with ``--config.stage=sample --config.inputs.arvm_workdir=runs/imagenet/arvm``.
Variants: (none) full; ``smoke``: a tiny model on the miniature ImageNet's
tokens (tests).
"""

import ml_collections

from mesp_jax.base import config as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "arvm"
  config.seed = 0
  config.mesh = cu.section("mesh", fsdp=8)
  config.inputs = cu.section("inputs", tokens_dir="runs/imagenet/tokens",
                             blae_workdir="runs/imagenet/blae")
  config.tokens = cu.section("tokens", train_split="train",
                             eval_split="validation", eval_examples=10_000)
  config.arvm = cu.section(
      "arvm", group=12, gamma=4, num_layers=24, d_model=1024, num_heads=16,
      mlp_ratio=4.0, num_classes=1000, label_drop=0.1, dtype="bfloat16",
      attention="auto")
  config.train = cu.section(
      "train", batch_size=1024, num_steps=250_000, learning_rate=3e-4,
      warmup_steps=5_000, schedule="cosine", grad_clip=1.0,
      weight_decay=0.05, b2=0.95, ema_decay=0.9999, log_every=100,
      eval_every=10_000, checkpoint_every=2_000, eval_batch_size=512)
  config.sampler = cu.section("sampler", kind="neural", num_samples=50_000,
                              batch_size=256, cfg_scale=2.0, order="wavefront")

  if variant == "smoke":
    config.mesh.fsdp = 1
    config.inputs.update(tokens_dir="", blae_workdir="")
    config.arvm.update(num_layers=1, d_model=32, num_heads=2, gamma=2)
    cu.smoke(config, ema_decay=0.9, grad_accum_steps=2)
    config.sampler.update(num_samples=16, batch_size=8)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
