"""Kernel ARVM sampler benchmark: samples/s, ms per image, steps, memory.

``python -m mesp_jax.bench kernel [args]``

Defaults follow the paper's setting: S=64 samples from a bank of N=60000
latents of 32x32 tokens of g=7 bits, for gamma in {2, 5, global}. The bank is
random (``--bank path.npz`` loads a ``tokens`` array [N, H, W(, Tp)] instead).
Each case runs once to compile and warm up (reported separately), then is
timed ``--repeats`` times with ``block_until_ready`` (the best time is
reported). With ``--max_tokens M`` only the first M tokens of every sample
are generated and the batch time is extrapolated linearly to all steps; such
rows are labelled ``extrapolated``.

Several grids (``--grids 8x8x2,32x32x1``, one random bank each), sample
counts (``--num_samples 1,64``) and orders (``--orders raster,wavefront``)
run in one invocation; the cases of one grid, gamma and S run one after the
other, and ``vs raster`` is the raster row's batch time over this row's, so
ratios come from the same minute of a busy machine. ``steps`` are the
sequential token steps: ``Tp H W`` for raster and random order,
``Tp (W + (H-1)(gamma+1))`` for wavefront order.

Memory: the process' resident-set high-water mark (``getrusage``, cumulative
over the run) and the analytic per-device bound of the sampling program
(:func:`mesp_jax.sample.kernel.kernel_memory_bytes`), which depends on
``--chunk_size`` but never holds S x N x |C| x 2^g values; wavefront order
keeps one [N, S] state per lane.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import numpy as np

from mesp_jax.base.gamma import parse_gamma
from mesp_jax.base.sharding import make_mesh
from mesp_jax.sample import kernel as kernel_lib
from mesp_jax.sample import kernel_schedule

ORDERS = ("raster", "random", "wavefront")


def _ints(text: str) -> list[int]:
  values = [int(x) for x in text.split(",") if x.strip()]
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
  return values


def _grids(text: str) -> list[tuple[int, int, int]]:
  out = []
  for item in text.split(","):
    parts = item.strip().lower().split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
      raise argparse.ArgumentTypeError(f"a grid is HxW or HxWxTp, got {item!r}")
    out.append(tuple(int(p) for p in parts) + ((1,) if len(parts) == 2 else ()))
  return out


def _orders(text: str) -> list[str]:
  out = [x.strip() for x in text.split(",") if x.strip()]
  if not out or any(x not in ORDERS for x in out):
    raise argparse.ArgumentTypeError(f"orders are from {ORDERS}, got {text!r}")
  return out


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m mesp_jax.bench kernel",
      description="Kernel (non-parametric) gamma-ARVM sampling speed.")
  p.add_argument("--num_samples", type=_ints, default=[64],
                 help="S, or comma-separated S values")
  p.add_argument("--bank_size", type=int, default=60000,
                 help="N for the random bank")
  p.add_argument("--bank", default="",
                 help="npz file with a 'tokens' array [N, H, W(, Tp)]")
  p.add_argument("--height", type=int, default=32)
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--tokens_per_position", type=int, default=1, help="Tp")
  p.add_argument("--grids", type=_grids, default=None,
                 help="comma-separated HxWxTp grids, one random bank each "
                      "(overrides --height/--width/--tokens_per_position)")
  p.add_argument("--group", type=int, default=7, help="bits per token g")
  p.add_argument("--gammas", default="2,5,global",
                 help="comma-separated observation ranges")
  p.add_argument("--order", default="raster", choices=ORDERS)
  p.add_argument("--orders", type=_orders, default=None,
                 help="comma-separated orders (overrides --order), e.g. "
                      "raster,wavefront")
  p.add_argument("--sigma_s", type=float, default=0.5)
  p.add_argument("--chunk_size", type=int, default=8192,
                 help="bank entries per device processed at once")
  p.add_argument("--max_tokens", type=int, default=0,
                 help="time only the first M tokens and extrapolate (0: all)")
  p.add_argument("--repeats", type=int, default=1,
                 help="timed runs per case; the best is reported")
  p.add_argument("--devices", type=int, default=0,
                 help="split the bank over this many devices (0: all)")
  p.add_argument("--updates", default="default",
                 help="comma-separated update forms: popcount, product or "
                      "default (the platform's: popcount on CPU); rows of "
                      "one case share the raster baseline of the same form")
  p.add_argument("--seed", type=int, default=0)
  return p


def _peak_rss_mb() -> float:
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_bank(args, grid: tuple[int, int, int]) -> np.ndarray:
  if args.bank:
    with np.load(args.bank) as data:
      tokens = np.asarray(data["tokens"])
    if tokens.ndim == 3:
      tokens = tokens[..., None]
    if tokens.ndim != 4:
      raise SystemExit(f"--bank tokens must be [N, H, W(, Tp)], got "
                       f"{tokens.shape}")
    return tokens.astype(np.int32)
  rng = np.random.default_rng(args.seed)
  return rng.integers(0, 2**args.group, (args.bank_size,) + grid,
                      dtype=np.int32)


UPDATES = {"default": None, "popcount": True, "product": False}


def run_case(bank: kernel_lib.KernelBank, gamma, args, order: str | None = None,
             num_samples: int | None = None, update: str = "default") -> dict:
  """Compiles, warms up and times one case; returns a table row."""
  if update not in UPDATES:
    raise SystemExit(f"--updates: {update!r} is not one of {sorted(UPDATES)}")
  popcount = UPDATES[update]
  if popcount is None:
    popcount = kernel_lib.popcount_default(bank.mesh)
  order = args.order if order is None else order
  num_samples = args.num_samples[0] if num_samples is None else num_samples
  height, width, tp = bank.grid
  num_tok = height * width * tp
  rng = jax.random.key(args.seed)
  max_tokens = args.max_tokens or None
  schedule = kernel_schedule.plan_schedule(height, width, tp, gamma, order,
                                           bank.group, rng,
                                           max_tokens=max_tokens)
  lanes = None
  if isinstance(schedule, kernel_schedule.LaneSchedule):
    lanes = schedule.lanes
    total = kernel_schedule.wavefront_steps(height, width, tp, gamma)
  else:
    total = num_tok
  steps = len(schedule.first)

  def sample():
    return kernel_lib.kernel_sample(
        bank, group=bank.group, sigma_s=args.sigma_s, gamma=gamma,
        num_samples=num_samples, rng=rng, order=order, max_tokens=max_tokens,
        popcount=popcount)

  start = time.perf_counter()
  sample().block_until_ready()
  warmup = time.perf_counter() - start
  times = []
  for _ in range(max(1, args.repeats)):
    start = time.perf_counter()
    sample().block_until_ready()
    times.append(time.perf_counter() - start)
  measured = min(times)
  per_batch = measured * total / steps
  memory = kernel_lib.kernel_memory_bytes(bank, num_samples, schedule.width,
                                          lanes=lanes)
  return {
      "grid": f"{height}x{width}x{tp}",
      "gamma": "global" if parse_gamma(gamma) is None else gamma,
      "order": order,
      "update": "popcount" if popcount else "product",
      "S": num_samples,
      "lanes": lanes or 1,
      "K": schedule.width,
      "ops": schedule.num_ops,
      "steps": total,
      "warmup_s": warmup,
      "measured_s": measured,
      "batch_s": per_batch,
      "samples_per_s": num_samples / per_batch,
      "ms_per_image": 1e3 * per_batch / num_samples,
      "tokens_per_s": num_samples * num_tok / per_batch,
      "ms_per_step": 1e3 * measured / steps,
      "rss_mb": _peak_rss_mb(),
      "bound_mb": memory["total"] / 2**20,
      "note": "measured" if steps == total else
              f"extrapolated from {steps}/{total} steps",
  }


HEADER = (f"{'grid':>8} {'gamma':>6} {'order':>9} {'update':>8} {'S':>3} "
          f"{'L':>2} {'K':>3} "
          f"{'ops':>5} {'steps':>5} {'warmup s':>8} {'s/batch':>8} "
          f"{'samples/s':>9} {'ms/image':>9} {'tokens/s':>9} {'ms/step':>8} "
          f"{'RSS MB':>6} {'bound MB':>8} {'vs raster':>9}  note")


def format_row(row: dict, raster_s: float | None) -> str:
  ratio = f"{raster_s / row['batch_s']:.2f}x" if raster_s else "-"
  return (f"{row['grid']:>8} {row['gamma']!s:>6} {row['order']:>9} "
          f"{row['update']:>8} {row['S']:>3} {row['lanes']:>2} "
          f"{row['K']:>3} {row['ops']:>5} "
          f"{row['steps']:>5} {row['warmup_s']:>8.2f} {row['batch_s']:>8.2f} "
          f"{row['samples_per_s']:>9.2f} {row['ms_per_image']:>9.1f} "
          f"{row['tokens_per_s']:>9.0f} {row['ms_per_step']:>8.2f} "
          f"{row['rss_mb']:>6.0f} {row['bound_mb']:>8.1f} {ratio:>9}  "
          f"{row['note']}")


def main(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  devices = jax.devices()
  if args.devices:
    devices = devices[:args.devices]
  mesh = make_mesh(devices=devices)
  grids = args.grids or [(args.height, args.width, args.tokens_per_position)]
  if args.bank and len(grids) > 1:
    raise SystemExit("--bank fixes the grid: give at most one --grids entry")
  orders = args.orders or [args.order]
  print(f"kernel ARVM: S={','.join(map(str, args.num_samples))} "
        f"g={args.group} orders={','.join(orders)} sigma_s={args.sigma_s} "
        f"repeats={args.repeats} devices={mesh.size} "
        f"[{devices[0].platform}] jax={jax.__version__}")
  for grid in grids:
    tokens = _load_bank(args, grid)
    start = time.perf_counter()
    bank = kernel_lib.prepare_bank(tokens, group=args.group,
                                   chunk_size=args.chunk_size, mesh=mesh)
    prep = time.perf_counter() - start
    num, height, width, tp = tokens.shape
    del tokens
    print(f"\nN={num} grid={height}x{width}x{tp} chunk={bank.chunk} "
          f"(x{bank.chunks_per_device} per device): bank placement "
          f"{prep:.2f}s; peak RSS after placement {_peak_rss_mb():.0f} MB")
    print(HEADER)
    print("-" * len(HEADER))
    for gamma in args.gammas.split(","):
      gamma = gamma.strip()
      gamma = gamma if gamma == "global" else int(gamma)
      for num_samples in args.num_samples:
        for update in args.updates.split(","):
          raster_s = None
          for order in orders:
            row = run_case(bank, gamma, args, order, num_samples,
                           update.strip())
            if order == "raster":
              raster_s = row["batch_s"]
            print(format_row(row, raster_s if order != "raster" else None),
                  flush=True)
