"""Kernel gamma-ARVM on Fashion-MNIST BL-AE tokens: samples and the gamma sweep.

The bank is ``tokens_train.npz`` of a ``blae_encode`` run (the demo pipeline
writes it to ``runs/demo/tokens``): 60k latents of 8x8 positions x 16 bits,
grouped into g = 8 bit tokens (2 per position, 256-value histograms; g = 16
would need a 2^16 x 2^16 kernel matrix). The BL-AE comes from the npz (or
``--config.inputs.blae_workdir``).

  # the sweep (stage gamma_sweep): copy rates and distance against gamma
  python -m mesp_jax.main --config=configs/gamma_sweep_fashion_mnist.py \\
      --workdir=runs/gamma_sweep --config.inputs.tokens_dir=runs/demo/tokens
  # one sample set (stage sample, kernel sampler) at kernel.gamma
  python -m mesp_jax.main --config=configs/gamma_sweep_fashion_mnist.py \\
      --workdir=runs/kernel_sample --config.stage=sample

``kernel.*`` and ``sampler.*`` are shared: the sample stage uses
``kernel.gamma``, the sweep every gamma of ``sweep.gammas`` (a
comma-separated string; 'global' is the fully causal model) with the same
sigma_s, order, seed and sample count. sigma_s = 0.3 (p_flip = Phi(-1/0.3) =
4.3e-4, about 0.4 flipped bits per 1024-bit latent) lets global context
reproduce bank entries; at 0.5 (p_flip = 2.3 %) every sample carries about 23
flipped bits, more than the 1 % latent copy threshold, even when it follows
one bank entry.

Neural ARVMs join the sweep with ``--config.sweep.arvm_workdirs=
'3=runs/demo/arvm,1=runs/arvm_g1'`` (gamma=workdir pairs; each ARVM must
have been trained for that gamma on tokens of the same BL-AE).
``--config.inputs.feature_net_workdir`` (a ``train_feature_net`` workdir)
replaces the pixel-space Frechet distance by the classifier one.

Variants: (none) the full sweep; ``smoke`` (tests: tiny sample counts).
"""

import ml_collections

from mesp_jax.base import config as cu


def get_config(variant: str = ""):
  config = ml_collections.ConfigDict()
  config.stage = "gamma_sweep"
  config.seed = 0
  config.mesh = cu.section("mesh")
  config.inputs = cu.section("inputs", tokens_dir="runs/demo/tokens")
  config.tokens = cu.section("tokens")
  config.kernel = cu.section("kernel", group=8, sigma_s=0.3, gamma=3,
                             order="raster", chunk_size=8192)
  config.sampler = cu.section("sampler", kind="kernel", num_samples=256,
                              batch_size=128, temperature=1.0, seed=0)
  config.sweep = cu.section("sweep")
  if variant == "smoke":
    config.inputs.tokens_dir = ""
    config.kernel.update(chunk_size=64)
    config.sampler.update(num_samples=16, batch_size=16)
    config.sweep.update(gammas="0,global", reference_examples=256,
                        grid_samples=16, triplet_rows=4, decode_batch_size=64,
                        nn_chunk_size=256, bits_examples=8)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
