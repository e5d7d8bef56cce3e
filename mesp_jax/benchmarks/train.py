"""BL-AE training throughput: ``python -m mesp_jax.bench train --config=...``.

Times the real jitted, donated, sharded train step of ``mesp_jax.train.loop``
on random images of the config's shape (no data set needed), after a
warm-up, with ``block_until_ready``. Prints images/s in total and per device.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mesp_jax.base import sharding
from mesp_jax.base.config import load_config
from mesp_jax.data import image_channels
from mesp_jax.models.blae import build_blae
from mesp_jax.train import blae as blae_stage
from mesp_jax.train import loop


def run(spec: str, steps: int, warmup: int, batch_size: int | None) -> dict:
  config = load_config(spec)
  if config.stage != "blae":
    raise ValueError(f"{spec}: the train benchmark times stage 'blae' configs")
  if batch_size:
    config.train.batch_size = batch_size
  channels = image_channels(config.data.name)
  size = config.data.image_size
  model = build_blae(config.blae, channels)
  mesh = sharding.mesh_from_config(config)
  tx = loop.make_optimizer(config.train)
  b = config.train.batch_size
  latent = model.latent_shape((size, size, channels))

  def init_state(r):
    params = model.init(r, jnp.zeros((1, size, size, channels)),
                        jnp.zeros((1,) + latent))
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))

  abstract = jax.eval_shape(init_state, jax.random.key(0))
  shardings = sharding.param_shardings(abstract, mesh)
  state = jax.jit(init_state, out_shardings=shardings)(jax.random.key(0))
  step = jax.jit(loop.make_train_step(blae_stage.make_loss_fn(model,
                                                              config.blae), tx),
                 in_shardings=(shardings, sharding.batch_sharding(mesh),
                               sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))
  rng = np.random.default_rng(0)
  batch = sharding.shard_batch(
      {"image": rng.uniform(-1, 1, (b, size, size, channels)).astype(
          np.float32)}, mesh)
  key = jax.random.key(1)
  for _ in range(warmup):
    state, metrics = step(state, batch, key)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, key)
  jax.block_until_ready(state)
  dt = (time.perf_counter() - t0) / steps
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return {"config": spec, "batch": b, "devices": jax.device_count(),
          "params": n_params, "ms_per_step": dt * 1e3,
          "images_per_s": b / dt, "images_per_s_per_device":
          b / dt / jax.device_count()}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m mesp_jax.bench train",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--config", action="append",
                      help="config spec; repeat for several (default: the "
                      "Fashion-MNIST demo and the CIFAR-10 config)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batch", type=int, default=None,
                      help="override config.train.batch_size")
  args = parser.parse_args(argv)
  specs = args.config or ["configs/blae_fashion_mnist.py:demo",
                          "configs/blae_fashion_mnist.py",
                          "configs/blae_cifar10.py"]
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), "
        f"jax {jax.__version__}")
  print("| config | batch | params | ms/step | images/s | images/s/device |")
  print("|---|---|---|---|---|---|")
  for spec in specs:
    r = run(spec, args.steps, args.warmup, args.batch)
    print(f"| {r['config']} | {r['batch']} | {r['params']:,} | "
          f"{r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | "
          f"{r['images_per_s_per_device']:.1f} |", flush=True)
