"""Stage ``gamma_sweep``: copy rate and quality against the observation range.

For every gamma in ``config.sweep.gammas`` the kernel gamma-ARVM (bank:
``tokens_{train_split}.npz`` of ``config.inputs.tokens_dir``; settings in
``config.kernel`` and ``config.sampler``) draws the same number of samples
with the same seed, and so does each neural ARVM listed in
``config.sweep.arvm_workdirs`` ('gamma=workdir' pairs; ``config.sweep.neural``
holds their decoding settings). Each sample set is decoded by the bank's
BL-AE and measured (:mod:`mesp_jax.experiments.gamma_sweep`): copy rates
against the training images, their BL-AE reconstructions and the latents, PSNR
quantiles, and a Frechet distance (the project's classifier when
``config.inputs.feature_net_workdir`` is set, else raw pixels; never FID).

Writes ``gamma_sweep.json``, ``gamma_sweep.png`` and per model and gamma
``{model}_gamma_{gamma}/`` (samples, triplet grids). See docs/method.md,
section 'LCH and the copy criterion'.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.base.gamma import covers_grid, gamma_label, parse_gammas
from mesp_jax.data.sample_set import SampleSet
from mesp_jax.data.sources import DataNotFoundError
from mesp_jax.data.tokens import Bank, load_bank, repack
from mesp_jax.eval import memorization as mem
from mesp_jax.experiments import gamma_sweep as sweep
from mesp_jax.experiments import plots
from mesp_jax.sample import kernel as kernel_lib
from mesp_jax.sample import samplers
from mesp_jax.train import arvm, blae, provenance


def neural_tokens(arvm_workdir: str, gamma, bank: Bank,
                  config: ml_collections.ConfigDict, mesh,
                  rng: jax.Array) -> np.ndarray:
  """``sampler.num_samples`` token grids from a trained neural ARVM, at the
  bank's grouping.

  Raises:
    ValueError: the ARVM was trained for another gamma or token grid.
  """
  model, params, _, _, _ = arvm.load_arvm(arvm_workdir, mesh)
  if model.gamma != gamma:
    raise ValueError(f"config.sweep.arvm_workdirs: {arvm_workdir} holds an "
                     f"ARVM for gamma={gamma_label(model.gamma)}, listed "
                     f"under gamma={gamma_label(gamma)}")
  ncfg = config.sweep.neural
  sampler = samplers.NeuralSampler(
      model, params, mesh, temperature=float(config.sampler.temperature),
      top_k=int(ncfg.top_k), top_p=float(ncfg.top_p),
      cfg_scale=float(ncfg.cfg_scale), cache=ncfg.cache,
      order=ncfg.get("order", "raster"))
  tokens, _ = samplers.draw(sampler, rng, int(config.sampler.num_samples),
                            int(ncfg.batch_size))
  tokens = repack(tokens, bank.bits, int(model.group), bank.group)
  if tokens.shape[1:] != bank.tokens.shape[1:]:
    raise ValueError(f"{arvm_workdir}: token grid {tokens.shape[1:]} does "
                     f"not match the bank's {bank.tokens.shape[1:]}")
  return tokens


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.validate(config, "gamma_sweep")
  provenance.absolute_inputs(config)
  kcfg, scfg, smp = config.kernel, config.sweep, config.sampler
  gammas = parse_gammas(scfg.gammas)
  neural_dirs = sweep.parse_workdir_map(scfg.get("arvm_workdirs", ""))
  unknown = set(neural_dirs) - {gamma_label(g) for g in gammas}
  if unknown:
    raise ValueError(f"config.sweep.arvm_workdirs names gammas "
                     f"{sorted(unknown)} that are not in config.sweep.gammas")
  mesh = sharding.mesh_from_config(config)
  os.makedirs(workdir, exist_ok=True)
  cache_dir = scfg.get("cache_dir") or workdir
  t0 = time.time()
  say = (lambda msg: print(f"[gamma_sweep] {msg}", flush=True)) if (
      io.is_writer()) else (lambda msg: None)

  # Bank, BL-AE, images, reconstructions, reference statistics.
  bank = load_bank(config, int(scfg.train_examples))
  num_bank = len(bank.tokens)
  held_out = None  # test latents for the kernel's held-out bits per token
  if int(scfg.get("bits_examples", 0)):
    split = config.tokens.get("eval_split", "test")
    try:
      held_out = load_bank(config, int(scfg.bits_examples), split=split)
    except DataNotFoundError as e:
      raise DataNotFoundError(
          f"{e}\nconfig.sweep.bits_examples={scfg.bits_examples} scores the "
          f"kernel ARVM on the {split!r} latents; encode that split too or "
          f"set config.sweep.bits_examples=0") from e
    if held_out.tokens.shape[1:] != bank.tokens.shape[1:]:
      raise ValueError(f"{held_out.path}: grid {held_out.tokens.shape[1:]} "
                       f"differs from the bank's {bank.tokens.shape[1:]}")
  model, params, blae_config, blae_step = blae.load_blae(bank.blae_workdir,
                                                         mesh)
  provenance.check_and_record(workdir, "gamma_sweep", config, {
      "tokens": provenance.tokens_identity(
          config.inputs.tokens_dir, [config.tokens.get("train_split",
                                                       "train")]),
      "blae": provenance.checkpoint_identity(bank.blae_workdir, blae_step),
      "arvms": {label: provenance.checkpoint_identity(d)
                for label, d in sorted(neural_dirs.items())}},
      resuming=False)
  decode = samplers.token_decoder(model, params, bank.group, mesh,
                                  int(scfg.decode_batch_size))
  data_cfg = blae_config.data
  train_split = config.tokens.get("train_split", "train")
  train_images = sweep.read_images(data_cfg, train_split, num_bank)
  if len(train_images) != num_bank:
    raise ValueError(f"{bank.path} holds {num_bank} latents but the "
                     f"{data_cfg.name} {train_split} split has "
                     f"{len(train_images)} images: the bank must be the "
                     f"encoding of that split, in order")
  t = time.time()
  train_recons, cached = sweep.bank_recons(bank, decode, blae_step, cache_dir)
  recon_psnr = mem.psnr(train_recons, train_images)
  say(f"bank {num_bank} latents {bank.tokens.shape[1:]} x {bank.group} bits "
      f"({bank.path}); BL-AE {bank.blae_workdir} step {blae_step}; "
      f"reconstructions {'from cache' if cached else 'decoded'} in "
      f"{time.time() - t:.1f} s, median PSNR {np.median(recon_psnr):.2f} dB")
  ref_split = scfg.reference_split
  reference = sweep.read_images(data_cfg, ref_split, int(scfg.reference_examples))
  distance = sweep.make_distance(reference, ref_split,
                                 config.inputs.feature_net_workdir,
                                 data_cfg.name, cache_dir,
                                 pr_examples=int(scfg.pr_examples))
  num = int(smp.num_samples)
  pick = np.random.default_rng(int(smp.seed)).choice(
      num_bank, size=min(num, num_bank), replace=False)
  reference_lines = {
      "train_images": distance.distance(train_images[pick]),
      "train_recons": distance.distance(train_recons[pick]),
      "num_images": int(len(pick)),
  }
  say(f"{distance.name} of {len(pick)} training images / reconstructions vs "
      f"{ref_split} ({len(reference)}): {reference_lines['train_images']:.4g}"
      f" / {reference_lines['train_recons']:.4g}")

  # Sample and evaluate every (model, gamma).
  kbank = kernel_lib.prepare_bank(bank.tokens, group=bank.group,
                                  chunk_size=int(kcfg.chunk_size), mesh=mesh)
  grid_h, grid_w = bank.tokens.shape[1:3]
  rng = jax.random.key(int(smp.seed))
  runs = [("kernel", g) for g in gammas] + [
      ("neural", g) for g in gammas if gamma_label(g) in neural_dirs]
  results = []
  for model_name, gamma in runs:
    label = gamma_label(gamma)
    row_extra, bits_s = {}, 0.0
    t = time.time()
    if model_name == "kernel":
      sampler = samplers.KernelSampler(
          kbank, sigma_s=float(kcfg.sigma_s), gamma=gamma, order=kcfg.order,
          temperature=float(smp.temperature))
      tokens, _ = samplers.draw(sampler, rng, num, int(smp.batch_size))
      sample_s = time.time() - t
      if held_out is not None:
        t = time.time()
        row_extra = {"bits_per_token": sweep.kernel_bits_per_token(
            kbank, held_out.tokens, sigma_s=float(kcfg.sigma_s), gamma=gamma,
            order=kcfg.order, rng=rng, batch_size=int(smp.batch_size)),
            "bits_examples": len(held_out.tokens)}
        bits_s = time.time() - t
    else:
      tokens = neural_tokens(neural_dirs[label], gamma, bank, config, mesh,
                             rng)
      sample_s = time.time() - t
    t = time.time()
    images = decode(tokens)
    decode_s = time.time() - t
    t = time.time()
    summary, report = mem.evaluate_samples(
        images, tokens, train_images=train_images, train_recons=train_recons,
        bank_tokens=bank.tokens, group=bank.group, distance=distance,
        threshold_db=float(scfg.threshold_db),
        latent_threshold=float(scfg.latent_threshold),
        chunk_size=int(scfg.nn_chunk_size), mesh=mesh)
    eval_s = time.time() - t
    out_dir = os.path.join(workdir, f"{model_name}_gamma_{label}")
    sources = {"tokens": os.path.abspath(bank.path),
               "blae_workdir": os.path.abspath(bank.blae_workdir),
               "blae_step": int(blae_step)}
    if model_name == "neural":
      sources["arvm_workdir"] = os.path.abspath(neural_dirs[label])
    sample_set = SampleSet(
        tokens=tokens, images=images,
        labels=np.full(len(tokens), -1, np.int32), kind=model_name,
        gamma=label, group=bank.group, sources=sources,
        settings={"seed": int(smp.seed), "num_samples": num})
    sweep.write_sample_set(out_dir, sample_set, report, train_images,
                           train_recons, int(scfg.grid_samples),
                           int(scfg.triplet_rows))
    row = {"model": model_name, "gamma": label,
           "covers_whole_grid": covers_grid(gamma, grid_h, grid_w),
           **summary, **row_extra,
           "seconds": {"sample": sample_s, "decode": decode_s,
                       "evaluate": eval_s, "bits_per_token": bits_s},
           "dir": os.path.relpath(out_dir, workdir)}
    if model_name == "neural":
      row["arvm_workdir"] = os.path.abspath(neural_dirs[label])
    results.append(row)
    fd = summary[distance.name]
    say(f"{model_name} gamma={label}: {num} samples in {sample_s:.1f} s | "
        f"copy rate {summary['copy_rate']:.3f} (pixels) "
        f"{summary['copy_rate_recon']:.3f} (recon) "
        f"{summary['copy_rate_latent']:.3f} (latent) | median PSNR "
        f"{summary['psnr_quantiles']['q0.50']:.2f} dB | {distance.name} "
        f"{fd:.4g} | eval {eval_s:.1f} s"
        + (f" | {row_extra['bits_per_token']:.3f} bits/token on "
           f"{row_extra['bits_examples']} held-out latents ({bits_s:.1f} s)"
           if row_extra else ""))

  out = {
      "bank": {"path": os.path.abspath(bank.path), "size": num_bank,
               "grid": list(bank.tokens.shape[1:]), "bits": bank.bits,
               "group": bank.group,
               "blae_workdir": os.path.abspath(bank.blae_workdir),
               "blae_step": int(blae_step),
               "recon_psnr_median": float(np.median(recon_psnr)),
               "recon_psnr_quantiles": mem.psnr_quantiles(recon_psnr)},
      "kernel": {"sigma_s": float(kcfg.sigma_s),
                 "p_flip": kernel_lib.flip_probability(float(kcfg.sigma_s)),
                 "order": kcfg.order, "temperature": float(smp.temperature),
                 "seed": int(smp.seed)},
      "num_samples": num,
      "threshold_db": float(scfg.threshold_db),
      "latent_threshold": float(scfg.latent_threshold),
      "distance": {"name": distance.name, "split": distance.split,
                   "num_reference": distance.num_reference,
                   "note": distance.note},
      "reference": reference_lines,
      "results": results,
      "seconds": time.time() - t0,
      "config": config.to_dict(),
  }
  json_path = os.path.join(workdir, "gamma_sweep.json")
  io.write_json(json_path, io.json_safe(out))
  png_path = os.path.join(workdir, "gamma_sweep.png")
  if io.is_writer():
    title = (f"kernel gamma-ARVM (sigma_s={kcfg.sigma_s})"
             f"{' and neural ARVMs' if neural_dirs else ''}, bank {num_bank} "
             f"x {bank.tokens.shape[1]}x{bank.tokens.shape[2]}x{bank.bits} "
             f"bits, g={bank.group}, {num} samples per gamma")
    io.atomic_write_bytes(png_path, plots.plot_sweep(results, distance.name,
                                               reference_lines, title))
  say(f"done in {time.time() - t0:.0f} s -> {json_path}, {png_path}")
  out.update(json=json_path, png=png_path)
  return out
