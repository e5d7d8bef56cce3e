"""Kernel ARVM sampler benchmark: samples/s, seconds per batch, peak memory.

``python -m mesp_jax.bench kernel [args]``

Defaults follow the paper's setting: S=64 samples from a bank of N=60000
latents of 32x32 tokens of g=7 bits, for gamma in {2, 5, global}. The bank is
random (``--bank path.npz`` loads a ``tokens`` array [N, H, W(, Tp)] instead).
Each case runs once to compile and warm up (reported separately), then is
timed with ``block_until_ready``. With ``--max_tokens M`` only the first M
tokens of every sample are generated and the batch time is extrapolated
linearly to all tokens; such rows are labelled ``extrapolated``.

Memory: the process' resident-set high-water mark (``getrusage``, cumulative
over the run) and the analytic per-device bound of the sampling program
(:func:`mesp_jax.sample.kernel.kernel_memory_bytes`), which depends on
``--chunk_size`` but never holds S x N x |C| x 2^g values.
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


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m mesp_jax.bench kernel",
      description="Kernel (non-parametric) gamma-ARVM sampling speed.")
  p.add_argument("--num_samples", type=int, default=64, help="S")
  p.add_argument("--bank_size", type=int, default=60000,
                 help="N for the random bank")
  p.add_argument("--bank", default="",
                 help="npz file with a 'tokens' array [N, H, W(, Tp)]")
  p.add_argument("--height", type=int, default=32)
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--tokens_per_position", type=int, default=1, help="Tp")
  p.add_argument("--group", type=int, default=7, help="bits per token g")
  p.add_argument("--gammas", default="2,5,global",
                 help="comma-separated observation ranges")
  p.add_argument("--order", default="raster", choices=("raster", "random"))
  p.add_argument("--sigma_s", type=float, default=0.5)
  p.add_argument("--chunk_size", type=int, default=8192,
                 help="bank entries per device processed at once")
  p.add_argument("--max_tokens", type=int, default=0,
                 help="time only the first M tokens and extrapolate (0: all)")
  p.add_argument("--devices", type=int, default=0,
                 help="split the bank over this many devices (0: all)")
  p.add_argument("--seed", type=int, default=0)
  return p


def _peak_rss_mb() -> float:
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_bank(args) -> np.ndarray:
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
  return rng.integers(
      0, 2**args.group,
      (args.bank_size, args.height, args.width, args.tokens_per_position),
      dtype=np.int32)


def run_case(bank: kernel_lib.KernelBank, gamma, args) -> dict:
  """Compiles, warms up and times one gamma; returns a table row."""
  height, width, tp = bank.grid
  num_tok = height * width * tp
  rng = jax.random.key(args.seed)
  max_tokens = args.max_tokens or None
  positions = kernel_schedule.generation_order(height, width, args.order, rng)
  schedule = kernel_schedule.build_schedule(height, width, tp, gamma,
                                            positions, bank.group,
                                            max_tokens=max_tokens)
  steps = len(schedule.token)

  def sample():
    return kernel_lib.kernel_sample(
        bank, group=bank.group, sigma_s=args.sigma_s, gamma=gamma,
        num_samples=args.num_samples, rng=rng, order=args.order,
        max_tokens=max_tokens)

  start = time.perf_counter()
  sample().block_until_ready()
  warmup = time.perf_counter() - start
  start = time.perf_counter()
  sample().block_until_ready()
  measured = time.perf_counter() - start
  per_batch = measured * num_tok / steps
  memory = kernel_lib.kernel_memory_bytes(bank, args.num_samples,
                                          schedule.width)
  return {
      "gamma": "global" if parse_gamma(gamma) is None else gamma,
      "K": schedule.width,
      "ops": schedule.num_ops,
      "steps": steps,
      "warmup_s": warmup,
      "measured_s": measured,
      "batch_s": per_batch,
      "samples_per_s": args.num_samples / per_batch,
      "ms_per_token": 1e3 * measured / steps,
      "rss_mb": _peak_rss_mb(),
      "bound_mb": memory["total"] / 2**20,
      "note": "measured" if steps == num_tok else
              f"extrapolated from {steps}/{num_tok} tokens",
  }


def main(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  devices = jax.devices()
  if args.devices:
    devices = devices[:args.devices]
  mesh = make_mesh(devices=devices)
  tokens = _load_bank(args)
  start = time.perf_counter()
  bank = kernel_lib.prepare_bank(tokens, group=args.group,
                                 chunk_size=args.chunk_size, mesh=mesh)
  prep = time.perf_counter() - start
  num, height, width, tp = tokens.shape
  print(f"kernel ARVM: S={args.num_samples} N={num} grid={height}x{width}x{tp} "
        f"g={args.group} order={args.order} sigma_s={args.sigma_s} "
        f"chunk={bank.chunk} (x{bank.chunks_per_device} per device) "
        f"devices={mesh.size} [{devices[0].platform}] jax={jax.__version__}")
  print(f"bank placement {prep:.2f}s; peak RSS after placement "
        f"{_peak_rss_mb():.0f} MB")
  header = (f"{'gamma':>7} {'K':>3} {'ops':>5} {'warmup s':>9} {'s/batch':>8} "
            f"{'samples/s':>9} {'ms/token':>8} {'RSS MB':>7} {'bound MB':>8}"
            f"  note")
  print(header)
  print("-" * len(header))
  for gamma in args.gammas.split(","):
    gamma = gamma.strip()
    row = run_case(bank, gamma if gamma == "global" else int(gamma), args)
    print(f"{row['gamma']!s:>7} {row['K']:>3} {row['ops']:>5} "
          f"{row['warmup_s']:>9.2f} {row['batch_s']:>8.2f} "
          f"{row['samples_per_s']:>9.2f} {row['ms_per_token']:>8.2f} "
          f"{row['rss_mb']:>7.0f} {row['bound_mb']:>8.1f}  {row['note']}",
          flush=True)
