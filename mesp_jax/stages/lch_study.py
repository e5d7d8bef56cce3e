"""Stage ``lch_study``: the local dependence test with both gamma-ARVMs.

One command trains a neural gamma-ARVM for every gamma of ``config.gammas``
on the same tokens with the same budget (``config.arvm``: the same model,
steps, batch and seed; only ``arvm.gamma`` differs), then runs the gamma
sweep (stage ``gamma_sweep`` with ``config.sweep``) once per kernel noise of
``config.sigmas``: the kernel ARVM at every gamma each time, the neural ARVMs
once (their samples do not depend on sigma_s). Every sample set has the same
count and seed. The result is one table and one figure for both ARVMs:

  workdir/arvm_gamma_{g}/        the neural ARVMs (checkpoints, metrics)
  workdir/sweep_sigma_{s}/       each sweep (samples, triplet grids, JSON)
  workdir/lch.json, lch.md, lch.png

Rows carry the test bits per token of each neural ARVM, the copy rates
(pixels, reconstructions, latents), the Frechet distance of all samples,
of the authors' non-copies (no training image within ``threshold_db``) with
their count, and precision / recall. Rerunning resumes: a trained ARVM is
only restored. See docs/method.md, section 'LCH and the copy criterion'.
"""

from __future__ import annotations

import os
import time

import ml_collections

from mesp_jax import stages
from mesp_jax.base import config as config_lib
from mesp_jax.base import io
from mesp_jax.base.gamma import gamma_label, parse_gammas
from mesp_jax.experiments import plots
from mesp_jax.train.metrics import read_metrics


def _sigmas(config: ml_collections.ConfigDict) -> list[float]:
  return [float(s) for s in str(config.sigmas).split(",") if s.strip()]


def arvm_config(config: ml_collections.ConfigDict, gamma) -> (
    ml_collections.ConfigDict):
  """``config.arvm`` for one gamma, on the sweep's tokens."""
  sub = stages.with_stage(config.arvm, "arvm",
                          tokens_dir=config.sweep.inputs.tokens_dir)
  # A section again, so that gamma may change type (int or 'global').
  value = gamma_label(gamma) if gamma is None else gamma
  sub.arvm = config_lib.section("arvm",
                                **dict(sub.arvm.to_dict(), gamma=value))
  return sub


def sweep_config(config: ml_collections.ConfigDict, sigma_s: float,
                 arvm_workdirs: str, cache_dir: str
                 ) -> ml_collections.ConfigDict:
  """``config.sweep`` at one kernel noise, with the neural ARVMs listed."""
  sub = stages.with_stage(config.sweep, "gamma_sweep")
  sub.kernel.sigma_s = float(sigma_s)
  sub.sweep.gammas = config.gammas
  sub.sweep.arvm_workdirs = arvm_workdirs
  sub.sweep.cache_dir = sub.sweep.get("cache_dir") or cache_dir
  return sub


def _bits_per_token(workdir: str) -> float | None:
  """The last evaluation's test bits per token of an ARVM workdir."""
  rows = [r for r in read_metrics(workdir) if r.get("split") == "eval"
          and "bits_per_token" in r]
  return float(rows[-1]["bits_per_token"]) if rows else None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.validate(config, "lch_study")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  say = (lambda msg: print(f"[lch_study] {msg}", flush=True)) if (
      io.is_writer()) else (lambda msg: None)
  gammas = parse_gammas(config.gammas)
  sigmas = _sigmas(config)

  arvm_dirs, bits, train_s = {}, {}, {}
  for gamma in gammas:
    label = gamma_label(gamma)
    arvm_dirs[label] = os.path.join(workdir, f"arvm_gamma_{label}")
    t = time.time()
    stages.run(arvm_config(config, gamma), arvm_dirs[label])
    train_s[label] = time.time() - t
    bits[label] = _bits_per_token(arvm_dirs[label])
    say(f"neural ARVM gamma={label}: {bits[label]} bits/token on the test "
        f"split ({train_s[label]:.0f} s)")

  rows, sweeps = [], []
  for i, sigma_s in enumerate(sigmas):
    neural = ",".join(f"{k}={v}" for k, v in arvm_dirs.items()) if i == 0 \
        else ""
    sweep_dir = os.path.join(workdir, f"sweep_sigma_{sigma_s:g}")
    out = stages.run(sweep_config(config, sigma_s, neural, workdir),
                     sweep_dir)
    sweeps.append({"sigma_s": sigma_s, "dir": sweep_dir,
                   "distance": out["distance"],
                   "reference": out["reference"]})
    for row in out["results"]:
      row = dict(row, dir=os.path.join(sweep_dir, row["dir"]))
      if row["model"] == "kernel":
        row.update(series=f"kernel, sigma_s={sigma_s:g}", sigma_s=sigma_s)
      else:
        row.update(series="neural", bits_per_token=bits[row["gamma"]],
                   arvm_stage_seconds=train_s[row["gamma"]])
      rows.append(row)

  distance = sweeps[0]["distance"]["name"]
  result = {"gammas": [gamma_label(g) for g in gammas], "sigmas": sigmas,
            "distance": sweeps[0]["distance"],
            "reference": sweeps[0]["reference"],
            "num_samples": int(config.sweep.sampler.num_samples),
            "seed": int(config.sweep.sampler.seed),
            "arvm_steps": int(config.arvm.train.num_steps),
            "rows": rows, "sweeps": sweeps,
            "seconds": time.time() - t0, "config": config.to_dict()}
  io.write_json(os.path.join(workdir, "lch.json"), io.json_safe(result))
  if io.is_writer():
    io.atomic_write_bytes(os.path.join(workdir, "lch.md"),
                          markdown_table(rows, distance).encode())
    io.atomic_write_bytes(
        os.path.join(workdir, "lch.png"),
        plots.plot_lch(rows, distance, result["reference"],
                       title=f"{result['num_samples']} samples per model and "
                       f"gamma; neural ARVMs {result['arvm_steps']} steps "
                       f"each"))
  say(f"done in {result['seconds']:.0f} s -> {workdir}/lch.md, lch.png")
  return result


def _fmt(value, digits: int = 3) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def markdown_table(rows: list[dict], distance: str) -> str:
  """One row per (series, gamma): bits/token, copy rates, distances, P/R."""
  head = ("| model | gamma | bits/token | copy rate (pixels) | copy rate "
          "(recon) | latent copy rate | exact latent copies | "
          f"{distance} (all) | {distance} of the authors' non-copies (count) "
          "| precision | recall |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    kept = r.get(f"{distance}_non_pixel_copies")
    lines.append(
        f"| {r['series']} | {r['gamma']} | {_fmt(r.get('bits_per_token'))} | "
        f"{_fmt(r['copy_rate'])} | {_fmt(r['copy_rate_recon'])} | "
        f"{_fmt(r['copy_rate_latent'])} | "
        f"{_fmt(r['exact_latent_copy_rate'])} | {_fmt(r[distance], 2)} | "
        f"{_fmt(kept, 2)} ({r['num_non_pixel_copies']}) | "
        f"{_fmt(r.get('precision'))} | {_fmt(r.get('recall'))} |")
  return "\n".join(lines) + "\n"
