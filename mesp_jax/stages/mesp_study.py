"""Stage ``mesp_study``: posterior overlap against the reconstruction floor.

Trains Gaussian VAEs (``config.vae``) and BL-AEs (``config.sigma_sweep``)
with one encoder/decoder (``config.model``) into ``{workdir}/{model}``, then
measures on held-out pairs the overlap, the pair reconstruction loss and the
bound ``OVL * ||x_i - x_j||^2 / 4`` (:mod:`mesp_jax.experiments.mesp_overlap`,
docs/method.md, section 'MESP'). Writes ``mesp_study.json`` and
``mesp_study.png``.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.base.image import to_float_images
from mesp_jax.data import source_from_config
from mesp_jax.experiments import mesp_overlap as study
from mesp_jax.experiments import plots
from mesp_jax.models.blae import build_blae
from mesp_jax.models.vae import build_vae
from mesp_jax.train import provenance


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes ``mesp_study.json`` and ``.png``; returns the summary."""
  config_lib.validate(config, "mesp_study")
  provenance.check_and_record(
      workdir, "mesp_study", config,
      {"data": provenance.data_identity(config.data)},
      resuming=provenance.has_checkpoints_below(workdir))
  cfg = config.study
  mesh = sharding.mesh_from_config(config)
  models = study.train_models(config, workdir, mesh)

  source = source_from_config(config.data, cfg.heldout_split)
  n = min(int(cfg.num_heldout), len(source))
  record = source.read(np.arange(n))
  images = to_float_images(record["image"])  # [N, H, W, C] in [-1, 1]
  pairs = study.select_pairs(images, int(cfg.num_nn_pairs),
                       int(cfg.num_random_pairs), int(cfg.seed))
  pairs = {k: v for k, v in pairs.items() if v.shape[0]}
  results = []
  for m in models:
    if m["kind"] == "vae":
      net = build_vae(config.model, image_channels=images.shape[-1])
    else:
      net = build_blae(study.blae_config(config, m["sigma"]).blae,
                       image_channels=images.shape[-1])
    res = study.measure_model(m, net, images, pairs, cfg, int(cfg.seed))
    res["workdir"] = os.path.abspath(os.path.join(workdir, m["name"]))
    results.append(res)
    if io.is_writer():
      msg = " | ".join(
          f"{k}: log10 OVL {s['log10_mean_overlap']:.3g}, L_rec "
          f"{s['mean_l_rec']:.3g}, bound {s['mean_bound']:.3g}"
          for k, s in res["pairs"].items())
      print(f"[mesp_study] {study.model_label(res)} (bin rate "
            f"{res['bin_rate']:.3f}): {msg}", flush=True)

  vae_ok = all(s["bound_below_l_rec"] for r in results if r["kind"] == "vae"
               for s in r["pairs"].values())
  all_ok = all(s["bound_below_l_rec"] for r in results
               for s in r["pairs"].values())
  summary = {
      "dataset": config.data.name, "heldout_split": cfg.heldout_split,
      "num_heldout": n,
      "pairs": {k: {"num_pairs": int(v.shape[0])} for k, v in pairs.items()},
      "all_vae_bounds_below_l_rec": vae_ok,
      "all_bounds_below_l_rec": all_ok,
      "l_rec_definition": ("(E_{z~q_i}||d(z)-x_i||^2 + E_{z~q_j}||d(z)-x_j||"
                           "^2)/2, squared error summed over pixels in "
                           "[-1, 1], Monte Carlo over rec_samples draws"),
      "bound_definition": "OVL(q_i, q_j) * ||x_i - x_j||^2 / 4",
      "comparison": study.compare(results, cfg.primary_blae_sigma),
      "models": results,
      "config": config.to_dict(),
  }
  io.write_json(os.path.join(workdir, "mesp_study.json"), summary)
  first = summary["comparison"][next(iter(pairs))]
  plots.plot_mesp_study(results, os.path.join(workdir, "mesp_study.png"),
       f"MESP: reconstruction floor vs posterior overlap (held-out "
       f"{config.data.name} {cfg.heldout_split}, {n} images)",
       highlight=(first["elbo_vae"], first["blae"]) if "blae" in first
       else ())
  if not vae_ok and cfg.get("fail_on_violation", True):
    raise AssertionError(
        f"a VAE's mean bound exceeds its measured L_rec (see "
        f"{workdir}/mesp_study.json): the bound is a theorem, so this is a "
        f"bug or Monte Carlo noise; raise config.study.rec_samples")
  return summary
