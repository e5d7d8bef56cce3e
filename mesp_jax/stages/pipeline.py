"""Stage ``pipeline``: the whole method end to end in one workdir.

Runs the stages ``blae``, ``blae_encode``, ``arvm`` and ``sample`` through
:func:`mesp_jax.stages.run`, each in a sub-folder:

  workdir/blae     BL-AE training (recon grids, metrics)
  workdir/tokens   blae_encode of the train and test splits
  workdir/arvm     neural gamma-ARVM training (sample grids, metrics)
  workdir/samples  samples.png / samples.npz from the jitted KV-cache sampler
  workdir/report.md, report.json   a summary with the numbers and pictures

Each sub-stage takes its own full config (``config.blae``, ``config.arvm``)
so ``--config.blae.train.num_steps=...`` style overrides work. Every step
resumes: rerunning the command after an interruption continues where it
stopped.
"""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np

from mesp_jax import stages
from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.data import tokens as tokens_lib
from mesp_jax.data.sample_set import SampleSet
from mesp_jax.eval import memorization
from mesp_jax.train import loop
from mesp_jax.train.metrics import read_metrics


def _tokens_current(tokens_dir: str, blae_step: int,
                    splits: tuple[str, ...] = ("train", "test")) -> bool:
  """True if both splits' tokens (manifest ``tokens_{split}.json`` or legacy
  npz) exist and came from the BL-AE's final step."""
  for split in splits:
    if not tokens_lib.has_tokens(tokens_dir, split):
      return False
    path = tokens_lib.tokens_path(tokens_dir, split)
    if tokens_lib.read_info(path)["checkpoint_step"] != blae_step:
      return False
  return True


def _last(records: list[dict], split: str) -> dict:
  rows = [r for r in records if r.get("split") == split]
  return rows[-1] if rows else {}


def check_meshes(config: ml_collections.ConfigDict) -> None:
  """The device checks of the later stages, now rather than after the
  BL-AE has trained: each training batch, eval batch and the sampler's
  batch against the data-parallel size of its stage's mesh."""
  for name in ("blae", "arvm"):
    sub = config[name]
    mesh = sharding.mesh_from_config(sub)
    loop.check_batch(sub.train, mesh)
    loop.check_eval_batch(sub.train, mesh)
  dp = sharding.data_parallel_size(sharding.mesh_from_config(config.arvm))
  batch = int(config.arvm.sampler.batch_size)
  if batch % dp:
    raise config_lib.ConfigError(
        f"config.arvm.sampler.batch_size={batch} must be a multiple of the "
        f"data-parallel size {dp} (each batch is split over that many "
        f"devices); use e.g. --config.arvm.sampler.batch_size="
        f"{max(dp, batch // dp * dp)}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.validate(config, "pipeline")
  check_meshes(config)
  workdir = os.path.abspath(workdir)
  t0 = time.time()
  timings = {}
  dirs = {k: os.path.join(workdir, k)
          for k in ("blae", "tokens", "arvm", "samples")}

  blae_cfg = config.blae
  stages.run(stages.with_stage(blae_cfg, "blae"), dirs["blae"])
  timings["blae_s"] = time.time() - t0

  t = time.time()
  splits = (blae_cfg.data.get("train_split", "train"),
            blae_cfg.data.get("eval_split", "test"))
  if not _tokens_current(dirs["tokens"], int(blae_cfg.train.num_steps),
                         splits) or config.get("reencode", False):
    enc_cfg = stages.with_stage(blae_cfg, "blae_encode", blae_workdir=dirs["blae"])
    enc_cfg.encode.splits = splits
    stages.run(enc_cfg, dirs["tokens"])
  timings["encode_s"] = time.time() - t

  t = time.time()
  arvm_cfg = stages.with_stage(config.arvm, "arvm", tokens_dir=dirs["tokens"],
                   blae_workdir=dirs["blae"])
  arvm_cfg.tokens.update(train_split=splits[0], eval_split=splits[1])
  stages.run(arvm_cfg, dirs["arvm"])
  timings["arvm_s"] = time.time() - t

  t = time.time()
  sample_cfg = stages.with_stage(arvm_cfg, "sample", arvm_workdir=dirs["arvm"])
  sample_cfg.sampler.kind = "neural"
  samples = stages.run(sample_cfg, dirs["samples"])
  timings["sample_s"] = time.time() - t

  t = time.time()
  memorisation = evaluate_copies(
      samples["npz"], tokens_lib.tokens_path(dirs["tokens"], splits[0]),
      int(config.get("evaluate_train_examples", 0)))
  timings["evaluate_s"] = time.time() - t
  timings["total_s"] = time.time() - t0

  report = {
      "blae_eval": _last(read_metrics(dirs["blae"]), "eval"),
      "arvm_eval": _last(read_metrics(dirs["arvm"]), "eval"),
      "samples": samples, "memorisation": memorisation, "timings": timings,
      "blae_config": blae_cfg.to_dict(), "arvm_config": arvm_cfg.to_dict(),
  }
  io.write_json(os.path.join(workdir, "report.json"), report)
  if io.is_writer():
    io.atomic_write_bytes(os.path.join(workdir, "report.md"),
                          _markdown(report).encode())
    print(f"[pipeline] done in {timings['total_s']:.0f} s; report: "
          f"{os.path.join(workdir, 'report.md')}", flush=True)
  return report


def evaluate_copies(samples_path: str, train_tokens: str, limit: int = 0
                    ) -> dict:
  """How close the samples' latents are to the training latents.

  The nearest training latent of every sample by exact Hamming distance
  (over the first ``limit`` training examples; 0: all), the share of exact
  copies and of samples within 1 % of the bits (the latent copy rate).
  """
  sample_set = SampleSet.load(samples_path)
  bank = tokens_lib.TokenSource(train_tokens, sample_set.group)
  n = len(bank) if not limit else min(limit, len(bank))
  bank_tokens = bank.read(np.arange(n))["tokens"]  # [n, h, w, Tp]
  _, hamming = memorization.nearest_latents(sample_set.tokens, bank_tokens,
                                            sample_set.group)
  total_bits = int(np.prod(bank_tokens.shape[1:])) * sample_set.group
  return {
      "train_examples": int(n), "bits_per_latent": total_bits,
      "exact_copy_rate": float(np.mean(hamming == 0)),
      "latent_copy_rate": memorization.latent_copy_rate(hamming, total_bits),
      "hamming_fraction_quantiles": memorization.psnr_quantiles(
          hamming / total_bits),
      "num_samples": len(sample_set),
      "classes_sampled": int(np.unique(
          sample_set.labels[sample_set.labels >= 0]).size),
  }


def _markdown(report: dict) -> str:
  b, a, t = report["blae_eval"], report["arvm_eval"], report["timings"]
  m = report["memorisation"]
  median_hamming = m["hamming_fraction_quantiles"].get("q0.50", float("nan"))
  g = report["arvm_config"]["arvm"]
  return f"""# mesp_jax run report

## BL-AE (evaluation split, step {b.get('step')})
| metric | value |
|---|---|
| PSNR from the sign bits (dB) | {b.get('psnr', float('nan')):.2f} |
| PSNR from the continuous code (dB) | {b.get('psnr_continuous', float('nan')):.2f} |
| bin rate (share of abs(z) >= 0.9) | {b.get('bin_rate', float('nan')):.3f} |
| dead bits | {b.get('dead_bits')} |

![reconstructions: originals, sign-bit decode, continuous decode](blae/recon_latest.png)

## gamma-ARVM (gamma = {g['gamma']}, g = {g['group']}, eval split, step {a.get('step')})
| metric | value |
|---|---|
| bits per token | {a.get('bits_per_token', float('nan')):.3f} |
| bits per image | {a.get('bits_per_image', float('nan')):.1f} |

![samples](samples/samples.png)

## Memorisation
{m['num_samples']} samples against {m['train_examples']} training latents
({m['bits_per_latent']} bits each), nearest by Hamming distance.

| metric | value |
|---|---|
| exact latent copies | {m['exact_copy_rate']:.3f} |
| latent copy rate (within 1 % of the bits) | {m['latent_copy_rate']:.3f} |
| median Hamming distance (share of bits) | {median_hamming:.3f} |

## Time (s)
BL-AE {t['blae_s']:.0f} · encode {t['encode_s']:.0f} · ARVM {t['arvm_s']:.0f} ·
sampling {t['sample_s']:.0f} · evaluation {t['evaluate_s']:.0f} ·
total {t['total_s']:.0f}
"""
