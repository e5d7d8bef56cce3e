"""Neural ARVM sampler benchmark against this machine's own limits.

``python -m mesp_jax.bench sampler [--config configs/x.py:variant] [args]``

Four decoders are timed with ``block_until_ready`` after a warm-up: the cached
decoders are compiled ahead of time, called once untimed, and the fastest of
``--repeats`` calls is reported; ``none`` runs one step first:

* ``none``: no cache, every token step reruns the full forward pass; timed
  over the last ``--steps_uncached`` token steps at batch ``--batch_uncached``;
* ``full``: raster order, KV cache over all ``T`` slots;
* ``ring``: raster order, a ring of the last ``(gamma*W + gamma + 1) * Tp``
  slots (the full cache when gamma is global);
* ``wavefront``: every position of a front per step
  (:mod:`mesp_jax.sample.wavefront`), ``Tp * (W + (H-1)(gamma+1))`` steps.

Per decoder: tokens/s and images/s at ``--batch``, the latency of one image
at batch 1, ms per step, FLOPs and bytes of one step (XLA's cost analysis)
and their rates as a fraction of a matmul probe's FLOP/s and a copy probe's
bytes/s measured in the same run (:mod:`mesp_jax.benchmarks.roofline`). The
cache sizes at two image heights and the ARVM train step follow.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mesp_jax.base import config as config_utils
from mesp_jax.base import sharding
from mesp_jax.benchmarks import roofline
from mesp_jax.models import arvm as arvm_lib
from mesp_jax.models import arvm_loss
from mesp_jax.sample import decode, wavefront

VARIANTS = ("none", "full", "ring", "wavefront")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m mesp_jax.bench sampler",
      description="Neural ARVM decoding speed: no cache, full and ring "
      "caches (raster) and wavefront decoding, against this machine's "
      "matmul and copy peaks.")
  p.add_argument("--config", default="",
                 help="config file[:variant] with a config.arvm section; its "
                 "latent grid comes from arvm.grid/arvm.bits or from "
                 "data.image_size, blae.downsample_factor and blae.bits. "
                 "Explicit model args below are ignored when given.")
  p.add_argument("--height", type=int, default=32, help="latent grid height")
  p.add_argument("--width", type=int, default=32, help="latent grid width")
  p.add_argument("--bits", type=int, default=7, help="bits per position")
  p.add_argument("--group", type=int, default=7, help="bits per token")
  p.add_argument("--gamma", default="5", help="int or 'global'")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--mlp_ratio", type=float, default=4.0)
  p.add_argument("--num_classes", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=sorted(arvm_lib.DTYPES))
  p.add_argument("--batch", type=int, default=64, help="samples per call")
  p.add_argument("--cfg_scale", type=float, default=0.0,
                 help="> 0 doubles the rows (needs --num_classes > 0)")
  p.add_argument("--steps_uncached", type=int, default=32,
                 help="last token steps timed for the 'none' decoder")
  p.add_argument("--batch_uncached", type=int, default=8,
                 help="batch of the 'none' decoder (0 = --batch); small by "
                 "default because one full pass over T tokens per token "
                 "step costs seconds on a CPU")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help="comma-separated subset of none,full,ring,wavefront")
  p.add_argument("--repeats", type=int, default=2,
                 help="timed calls per cached decoder after one warm-up "
                 "call; the fastest is reported (the batch-1 latency takes "
                 "at least 3)")
  p.add_argument("--latency", type=int, default=1,
                 help="1: also time one image at batch 1 (cached decoders)")
  p.add_argument("--train_batch", type=int, default=8)
  p.add_argument("--train_steps", type=int, default=3,
                 help="timed train steps (0 skips the train benchmark)")
  p.add_argument("--seed", type=int, default=0)
  return p


def _model_from_args(args: argparse.Namespace) -> arvm_lib.ARVM:
  if args.config:
    config = config_utils.load_config(args.config)
    if "arvm" not in config:
      raise ValueError(f"{args.config}: config.arvm is missing")
    grid, bits = _latent_shape(config)
    return arvm_lib.build_arvm(config.arvm, grid, bits)
  gamma = args.gamma
  if isinstance(gamma, str) and gamma.lstrip("-").isdigit():
    gamma = int(gamma)
  cfg = ml_collections.ConfigDict(dict(
      group=args.group, gamma=gamma, num_layers=args.layers,
      d_model=args.d_model, num_heads=args.heads, mlp_ratio=args.mlp_ratio,
      num_classes=args.num_classes, embed="linear", dtype=args.dtype))
  return arvm_lib.build_arvm(cfg, (args.height, args.width), args.bits)


def _latent_shape(config: ml_collections.ConfigDict
                  ) -> tuple[tuple[int, int], int]:
  """(grid, bits) from ``arvm.grid``/``arvm.bits`` or the data + BL-AE."""
  arvm_cfg = config.arvm
  if "grid" in arvm_cfg and "bits" in arvm_cfg:
    return tuple(arvm_cfg.grid), int(arvm_cfg.bits)
  if "data" in config and "blae" in config:
    factor = 1
    if config.blae.get("family", "downsample") == "downsample":
      factor = int(config.blae.downsample_factor)
    side = int(config.data.image_size) // factor
    return (side, side), int(config.blae.bits)
  raise ValueError(
      "cannot find the latent grid: set config.arvm.grid and config.arvm.bits "
      "or config.data.image_size with config.blae.{downsample_factor,bits}")


def _tree_bytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _time(fn, *args) -> float:
  """Seconds of one call (its result blocked on)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _best_time(fn, *args, repeats: int) -> float:
  """The fastest of ``repeats`` calls after one untimed warm-up call (the
  first call of a compiled program also pays for allocations and waking
  the thread pool)."""
  _time(fn, *args)
  return min(_time(fn, *args) for _ in range(max(1, repeats)))


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


def _labels(model: arvm_lib.ARVM, batch: int) -> jax.Array | None:
  if model.num_classes == 0:
    return None
  return jnp.arange(batch, dtype=jnp.int32) % model.num_classes


def _one_step(model: arvm_lib.ARVM, params: Any, variant: str, rows: int,
              labels: jax.Array | None):
  """The compiled single decoding step of a decoder, for its cost analysis."""
  t = model.seq_len
  if variant == "none":
    tokens = jnp.zeros((rows, t), jnp.int32)
    return jax.jit(model.apply).lower(params, tokens, labels).compile()
  if variant == "wavefront":
    n = wavefront.plan(model)["query"].shape[1]
    state = wavefront.init_cache(model, rows)
    lanes = jnp.zeros((n,), jnp.int32)
    return jax.jit(functools.partial(
        model.apply, method=arvm_lib.ARVM.decode_slots)).lower(
            params, jnp.zeros((rows, n), jnp.int32), lanes, lanes, lanes,
            state, labels).compile()
  state = arvm_lib.init_cache(model, rows, decode.cache_entries(model,
                                                                variant))
  return jax.jit(functools.partial(
      model.apply, method=arvm_lib.ARVM.decode)).lower(
          params, jnp.zeros((rows,), jnp.int32), jnp.int32(1), state,
          labels).compile()


def _sampler_seconds(model: arvm_lib.ARVM, params: Any, batch: int,
                     variant: str, cfg_scale: float, rng: jax.Array,
                     repeats: int) -> float:
  """Seconds of one whole sampling call (compiled ahead, warmed up, best of
  ``repeats``)."""
  labels = decode.labels_or_null(model, _labels(model, batch), batch)
  order = "wavefront" if variant == "wavefront" else "raster"
  cache = "ring" if variant == "wavefront" else variant
  sampler = decode.make_sampler(model, batch, cfg_scale=cfg_scale,
                                cache=cache, order=order)
  run = sampler.lower(params, rng, labels).compile()
  return _best_time(run, params, rng, labels, repeats=repeats)


def bench_decoders(model: arvm_lib.ARVM, params: Any, args: argparse.Namespace,
                   peaks: dict[str, float]) -> list[dict[str, Any]]:
  """Times each requested decoder; one row of results per decoder."""
  t = model.seq_len
  rng = jax.random.key(args.seed)
  guided = 2 if args.cfg_scale > 0 else 1
  rows = []
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"--variants: unknown decoder {v!r}")
  for variant in variants:
    latency = None
    if variant == "none":
      batch = args.batch_uncached or args.batch
      steps = max(1, min(args.steps_uncached, t))
      tokens = jax.random.randint(rng, (batch, t), 0, model.vocab_size,
                                  jnp.int32)
      labels = _labels(model, batch)

      def run(first, num, tokens=tokens, labels=labels):
        return decode.recompute_steps(model, params, rng, tokens, labels,
                                      first, num, cfg_scale=args.cfg_scale)

      _time(run, t - 1, 1)  # compile + one step
      step_s = _time(run, t - steps, steps) / steps
      steps_per_image, cache = t, 0
    else:
      batch = args.batch
      steps_per_image = (wavefront.num_steps(model) if variant == "wavefront"
                         else t)
      step_s = _sampler_seconds(model, params, batch, variant,
                                args.cfg_scale, rng,
                                args.repeats) / steps_per_image
      if args.latency:
        latency = _sampler_seconds(model, params, 1, variant,
                                   args.cfg_scale, rng,
                                   max(3, args.repeats))
      cache = (decode.cache_bytes(model, batch, variant, args.cfg_scale)
               if variant != "wavefront" else
               wavefront.cache_bytes(model, batch, args.cfg_scale))
    step_labels = decode.labels_or_null(
        model, _labels(model, batch * guided), batch * guided)
    cost = roofline.step_cost(_one_step(model, params, variant,
                                        batch * guided, step_labels))
    rows.append(dict(
        decoder=variant, batch=batch, steps=steps_per_image,
        tokens_per_s=batch * t / (step_s * steps_per_image),
        images_per_s=batch / (step_s * steps_per_image),
        ms_per_step=1e3 * step_s, latency_ms=(None if latency is None
                                              else 1e3 * latency),
        gflop_per_step=cost["flops"] / 1e9, mb_per_step=cost["bytes"] / 1e6,
        flops_fraction=cost["flops"] / step_s / peaks["flops"],
        bytes_fraction=cost["bytes"] / step_s / peaks["bytes"],
        cache_bytes=cache))
  return rows


def bench_train(model: arvm_lib.ARVM, params: Any, batch: int,
                steps: int, seed: int) -> float:
  """Train tokens/s of a jitted forward + backward + Adam step."""
  t = model.seq_len
  rng = jax.random.key(seed + 1)
  tokens = jax.random.randint(rng, (batch, t), 0, model.vocab_size, jnp.int32)
  labels = _labels(model, batch)
  opt = optax.adam(1e-4)
  state = (params, opt.init(params))

  def loss_fn(p):
    logits = model.apply(p, tokens, labels)  # [B, T, V]
    return arvm_loss.arvm_loss(logits, tokens, group=model.group)[0]

  @jax.jit
  def step(state):
    p, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = opt.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  state, _ = step(state)  # compile
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, loss = step(state)
  jax.block_until_ready(loss)
  return batch * t * steps / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  model = _model_from_args(args)
  t = model.seq_len
  tokens = jnp.zeros((1, t), jnp.int32)
  params = sharding.unbox(jax.jit(model.init)(jax.random.key(args.seed),
                                              tokens, _labels(model, 1)))
  param_bytes = _tree_bytes(params)
  gamma = "global" if model.gamma is None else model.gamma
  print(f"ARVM sampler benchmark on {jax.devices()[0].platform} "
        f"x{jax.device_count()} (jax {jax.__version__})")
  print(f"grid {model.height}x{model.width}, {model.bits} bits, g="
        f"{model.group} -> T={t} tokens of {model.vocab_size} values; "
        f"gamma={gamma}; {model.num_layers} layers, d_model={model.d_model}, "
        f"{model.num_heads} heads, dtype={jnp.dtype(model.dtype).name}; "
        f"params {_human(param_bytes)}; cfg_scale={args.cfg_scale}")

  peaks = roofline.measure_peaks()
  print(f"peaks measured now: {roofline.describe_peaks(peaks)}")
  rows = bench_decoders(model, params, args, peaks)
  print()
  print("| decoder | batch | steps/image | tokens/s | images/s | ms/step | "
        "latency 1 image (ms) | GFLOP/step | MB/step | % matmul peak | "
        "% copy peak | cache |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    latency = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.0f}"
    print(f"| {r['decoder']} | {r['batch']} | {r['steps']} | "
          f"{r['tokens_per_s']:.0f} | {r['images_per_s']:.3f} | "
          f"{r['ms_per_step']:.2f} | {latency} | {r['gflop_per_step']:.3f} | "
          f"{r['mb_per_step']:.1f} | {100 * r['flops_fraction']:.1f} | "
          f"{100 * r['bytes_fraction']:.1f} | {_human(r['cache_bytes'])} |")
  if any(r["decoder"] == "none" for r in rows):
    print(f"('none': last {min(args.steps_uncached, t)} steps, a full forward "
          f"pass per token step.)")
  print("(FLOPs and bytes per step: XLA's cost analysis of one compiled "
        "step; the % columns divide their rate by the probes above.)")

  print()
  print(f"cache bytes at batch {args.batch} vs image height:")
  for height in (model.height, 2 * model.height):
    other = model.clone(height=height)
    ring = decode.cache_bytes(other, args.batch, "ring", args.cfg_scale)
    full = decode.cache_bytes(other, args.batch, "full", args.cfg_scale)
    front = wavefront.cache_bytes(other, args.batch, args.cfg_scale)
    print(f"  height {height:>4}: ring {_human(ring):>10} "
          f"({decode.cache_entries(other, 'ring') + 1} entries)   "
          f"full {_human(full):>10} "
          f"({decode.cache_entries(other, 'full') + 1} entries)   "
          f"wavefront {_human(front):>10} "
          f"({wavefront.cache_entries(other) + 1} entries)")

  if args.train_steps > 0:
    tps = bench_train(model, params, args.train_batch, args.train_steps,
                      args.seed)
    print()
    print(f"train step (fwd + bwd + adam), batch {args.train_batch}: "
          f"{tps:.0f} tokens/s = {tps / t:.2f} images/s")


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
