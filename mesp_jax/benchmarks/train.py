"""Train-step throughput: ``python -m mesp_jax.bench train [--compare=...]``.

Times the real jitted, donated, sharded train step of ``mesp_jax.train.loop``
on random inputs of the config's shape (no data set needed), after a
warm-up, with ``block_until_ready``. Four modes:

* default: the BL-AE configs (``--config``, repeatable), images/s in total
  and per device;
* ``--compare=conv``: each BL-AE config with ``blae.conv`` = xla and im2col
  (:mod:`mesp_jax.models.conv`) in one process: ms/step, images/s and
  GFLOP/s (FLOPs from the compiled step's ``cost_analysis``);
* ``--compare=nan_guard``: each BL-AE config's step with
  ``train.nan_guard`` off and stop, alternating twice: ms/step and the
  guard's cost;
* ``--compare=attention``: the ARVM train step with ``attention`` = dense
  and block_local (:mod:`mesp_jax.models.local_attention`) on square latent
  grids (``--grids``) at ``--gamma``: tokens/s, GFLOP/s and the compiled
  step's temporary memory (``memory_analysis().temp_size_in_bytes``). The
  ARVM is ``--arvm-config`` with ``--d-model``, ``--layers``, ``--heads`` and
  ``--bits`` / ``--group`` (tokens per position ``bits // group``).

Every mode prints a markdown table.
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
from mesp_jax.models import arvm as arvm_lib
from mesp_jax.models import arvm_loss
from mesp_jax.models.blae import build_blae
from mesp_jax.train import blae as blae_stage
from mesp_jax.train import loop

DEFAULT_SPECS = ["configs/blae_fashion_mnist.py:demo",
                 "configs/blae_fashion_mnist.py", "configs/blae_cifar10.py"]
CONV_IMPLS = ("xla", "im2col")
ATTENTION_IMPLS = ("dense", "block_local")


def _cost(compiled) -> tuple[float, int]:
  """(FLOPs, temporary bytes) of a compiled computation (nan / -1 if unknown).
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  flops = float((analysis or {}).get("flops", float("nan")))
  memory = compiled.memory_analysis()
  temp = int(memory.temp_size_in_bytes) if memory is not None else -1
  return flops, temp


def _time_step(loss_fn, tx, init_state, batch_np, mesh, steps: int,
               warmup: int, nan_guard: str = "off") -> dict:
  """Compiles and times ``loop.make_train_step(loss_fn, tx, nan_guard=...)``.

  Returns ms_per_step, flops (per step), temp_bytes, params and the final
  state's loss.
  """
  abstract = jax.eval_shape(init_state, jax.random.key(0))
  shardings = sharding.param_shardings(abstract, mesh)
  state = jax.jit(init_state, out_shardings=shardings)(jax.random.key(0))
  step = jax.jit(loop.make_train_step(loss_fn, tx, nan_guard=nan_guard),
                 in_shardings=(shardings, sharding.batch_sharding(mesh),
                               sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))
  batch = sharding.shard_batch(batch_np, mesh)
  key = jax.random.key(1)
  compiled = step.lower(state, batch, key).compile()
  flops, temp = _cost(compiled)
  metrics = None
  for _ in range(warmup):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready(state)
  dt = (time.perf_counter() - t0) / steps
  return {"ms_per_step": dt * 1e3, "flops": flops, "temp_bytes": temp,
          "params": sum(x.size for x in jax.tree.leaves(state.params)),
          "loss": float(metrics["loss"]) if metrics is not None else None}


# --------------------------------------------------------------------------
# BL-AE.
# --------------------------------------------------------------------------
def run(spec: str, steps: int, warmup: int, batch_size: int | None,
        conv: str | None = None, nan_guard: str = "off") -> dict:
  """One BL-AE config's train step; ``conv`` overrides ``blae.conv``,
  ``nan_guard`` is the step's guard (``train.nan_guard``)."""
  config = load_config(spec)
  if config.stage != "blae":
    raise ValueError(f"{spec}: the train benchmark times stage 'blae' configs")
  if batch_size:
    config.train.batch_size = batch_size
  if conv is not None:
    config.blae.conv = conv
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

  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (b, size, size, channels)).astype(
      np.float32)}
  r = _time_step(blae_stage.make_loss_fn(model, config.blae), tx, init_state,
                 batch, mesh, steps, warmup, nan_guard)
  dt = r["ms_per_step"] / 1e3
  return {"config": spec, "conv": model.conv, "batch": b,
          "devices": jax.device_count(), "params": r["params"],
          "ms_per_step": r["ms_per_step"], "images_per_s": b / dt,
          "images_per_s_per_device": b / dt / jax.device_count(),
          "gflop_per_step": r["flops"] / 1e9,
          "gflop_per_s": r["flops"] / 1e9 / dt, "loss": r["loss"]}


def _print_default(specs, args) -> None:
  print("| config | batch | params | ms/step | images/s | images/s/device |")
  print("|---|---|---|---|---|---|")
  for spec in specs:
    r = run(spec, args.steps, args.warmup, args.batch, args.conv)
    print(f"| {r['config']} | {r['batch']} | {r['params']:,} | "
          f"{r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | "
          f"{r['images_per_s_per_device']:.1f} |", flush=True)


def _print_conv(specs, args) -> None:
  print("| config | conv | batch | ms/step | images/s | GFLOP/step | "
        "GFLOP/s | loss | speed-up vs xla |")
  print("|---|---|---|---|---|---|---|---|---|")
  for spec in specs:
    base = None
    for conv in CONV_IMPLS:
      r = run(spec, args.steps, args.warmup, args.batch, conv)
      base = base or r["ms_per_step"]
      print(f"| {r['config']} | {conv} | {r['batch']} | "
            f"{r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['gflop_per_step']:.2f} | {r['gflop_per_s']:.1f} | "
            f"{r['loss']:.5f} | {base / r['ms_per_step']:.2f}x |",
            flush=True)


def _print_guard(specs, args) -> None:
  """Each config's step without and with the NaN guard, alternating, so
  machine drift affects both; the guard's cost is their ratio."""
  print("| config | round | nan_guard | batch | ms/step | loss | guard cost |")
  print("|---|---|---|---|---|---|---|")
  for spec in specs:
    for round_ in (1, 2):
      base = None
      for guard in ("off", "stop"):
        r = run(spec, args.steps, args.warmup, args.batch, args.conv, guard)
        base = base or r["ms_per_step"]
        print(f"| {r['config']} | {round_} | {guard} | {r['batch']} | "
              f"{r['ms_per_step']:.1f} | {r['loss']:.5f} | "
              f"{r['ms_per_step'] / base - 1:+.1%} |", flush=True)


# --------------------------------------------------------------------------
# ARVM.
# --------------------------------------------------------------------------
def run_arvm(spec: str, grid: int, attention: str, args) -> dict:
  """The ARVM train step on a ``grid x grid`` latent with ``attention``."""
  config = load_config(spec)
  if config.stage != "arvm":
    raise ValueError(f"{spec}: --arvm-config must be a stage 'arvm' config")
  config.arvm.update(gamma=args.gamma, d_model=args.d_model,
                     num_layers=args.layers, num_heads=args.heads,
                     group=args.group)
  model = arvm_lib.build_arvm(config.arvm, (grid, grid), args.bits)
  model = model.clone(attention=attention)  # build_arvm may not pass it
  cfg = config.arvm
  tx = loop.make_optimizer(config.train)
  mesh = sharding.mesh_from_config(config)
  b = args.arvm_batch
  tp = model.tokens_per_pos
  conditional = cfg.num_classes > 0
  p_flip = float(arvm_loss.p_flip(cfg.sigma_s))

  def loss_fn(params, batch, rng, step):  # as mesp_jax.train.arvm.make_task
    del step
    labels = None
    if conditional:
      labels = arvm_loss.drop_labels(rng, batch["label"], cfg.num_classes,
                                     cfg.get("label_drop", 0.0))
    logits = model.apply(params, batch["tokens"], labels)
    return arvm_loss.arvm_loss(logits, batch["tokens"], cfg.target,
                               cfg.group, p_flip)

  def init_state(r):
    labels = jnp.zeros((1,), jnp.int32) if conditional else None
    params = sharding.unbox(
        model.init(r, jnp.zeros((1, grid, grid, tp), jnp.int32), labels))
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))

  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 2**args.group, (b, grid, grid, tp)
                                  ).astype(np.int32),
           "label": rng.integers(0, max(cfg.num_classes, 1), (b,)
                                 ).astype(np.int32)}
  r = _time_step(loss_fn, tx, init_state, batch, mesh, args.steps,
                 args.warmup)
  dt = r["ms_per_step"] / 1e3
  return {"grid": grid, "tokens": model.seq_len, "attention": attention,
          "batch": b, "params": r["params"], "ms_per_step": r["ms_per_step"],
          "tokens_per_s": b * model.seq_len / dt,
          "gflop_per_step": r["flops"] / 1e9,
          "gflop_per_s": r["flops"] / 1e9 / dt,
          "temp_mib": r["temp_bytes"] / 2**20, "loss": r["loss"]}


def _print_attention(args) -> None:
  grids = [int(g) for g in args.grids.split(",")]
  print(f"ARVM {args.arvm_config}: d_model {args.d_model}, {args.layers} "
        f"layers, {args.heads} heads, {args.bits} bits / group {args.group} "
        f"({args.bits // args.group} tokens per position), gamma "
        f"{args.gamma}, batch {args.arvm_batch}")
  print("| grid | T | attention | ms/step | tokens/s | GFLOP/step | GFLOP/s "
        "| temp MiB | loss | tokens/s vs dense | temp vs dense |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for grid in grids:
    base = None
    for attention in ATTENTION_IMPLS:
      r = run_arvm(args.arvm_config, grid, attention, args)
      base = base or r
      print(f"| {grid}x{grid} | {r['tokens']} | {attention} | "
            f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['gflop_per_step']:.2f} | {r['gflop_per_s']:.1f} | "
            f"{r['temp_mib']:.1f} | {r['loss']:.4f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{base['temp_mib'] / r['temp_mib']:.1f}x less |", flush=True)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m mesp_jax.bench train", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", action="append",
                      help="BL-AE config spec; repeat for several (default: "
                      "the Fashion-MNIST demo and full configs and the "
                      "CIFAR-10 config; with --compare=conv: the demo)")
  parser.add_argument("--compare", choices=("conv", "attention", "nan_guard"),
                      default=None,
                      help="conv: BL-AE with blae.conv xla vs im2col; "
                      "attention: ARVM with attention dense vs block_local; "
                      "nan_guard: BL-AE step with train.nan_guard off vs "
                      "stop")
  parser.add_argument("--conv", choices=("xla", "im2col", "auto"),
                      default=None,
                      help="override blae.conv (default mode only)")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed steps (default 10)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps after compiling (default 2)")
  parser.add_argument("--batch", type=int, default=None,
                      help="override config.train.batch_size (BL-AE)")
  arvm = parser.add_argument_group("--compare=attention")
  arvm.add_argument("--arvm-config", default="configs/arvm_fashion_mnist.py:"
                    "demo", help="ARVM config spec (default: the demo)")
  arvm.add_argument("--grids", default="32,64",
                    help="comma-separated square latent grid sizes "
                    "(default 32,64)")
  arvm.add_argument("--gamma", type=int, default=3, help="default 3")
  arvm.add_argument("--d-model", type=int, default=64, help="default 64")
  arvm.add_argument("--layers", type=int, default=2, help="default 2")
  arvm.add_argument("--heads", type=int, default=4, help="default 4")
  arvm.add_argument("--bits", type=int, default=16,
                    help="bits per latent position (default 16)")
  arvm.add_argument("--group", type=int, default=8,
                    help="bits per token (default 8)")
  arvm.add_argument("--arvm-batch", type=int, default=1,
                    help="ARVM batch (default 1)")
  args = parser.parse_args(argv)
  if args.conv is not None and args.compare is not None:
    parser.error("--conv sets one implementation; --compare runs both")
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), "
        f"jax {jax.__version__}")
  if args.compare == "attention":
    _print_attention(args)
  elif args.compare == "conv":
    _print_conv(args.config or DEFAULT_SPECS[:1], args)
  elif args.compare == "nan_guard":
    _print_guard(args.config or DEFAULT_SPECS[:1], args)
  else:
    _print_default(args.config or DEFAULT_SPECS, args)
