"""Stage ``score``: the scripted FID protocol, from a trained sampler to
``eval.json`` in one command.

1. Draws ``sampler.num_samples`` samples from either gamma-ARVM with the
   seed ``sampler.seed`` (stage ``sample`` in ``workdir/samples``: batch
   ``b`` uses ``fold_in(key(seed), b)``, token ``i`` of sample ``s`` of it
   ``fold_in(fold_in(., s), i)``), decoded by the BL-AE.
2. Scores them (stage ``evaluate`` in ``workdir/evaluate``): FID, KID and
   IS on Inception-v3 when ``evaluate.inception_weights`` names the standard
   weights, always the offline Frechet distance, KID and precision/recall
   in the project's classifier (``inputs.feature_net_workdir``), each
   against reference statistics cached with that network.
3. Writes ``workdir/eval.json``: the evaluation plus ``protocol``, what a
   number needs to be reproduced: N, the seed and batch size, the sampler's
   settings and checkpoints (with digests), the samples' SHA-256, the
   reference statistics files with their SHA-256, the classifier's
   checkpoint and the Inception weights' SHA-256.

Anyone holding the same checkpoints and weights who reruns the command gets
the same samples, bit for bit on the same backend, and so the same numbers.
"""

from __future__ import annotations

import glob
import os

import ml_collections

from mesp_jax import stages
from mesp_jax.base import config as config_lib
from mesp_jax.base import io
from mesp_jax.data.sample_set import SampleSet
from mesp_jax.train import provenance

PROTOCOL_KEYS = ("num_samples", "seed", "batch_size", "temperature", "top_k",
                 "top_p", "cfg_scale", "order")


def reference_files(feature_net_workdir: str,
                    inception_cache_dir: str = "") -> list[dict]:
  """``{path, sha256}`` of the cached reference statistics a score used:
  the classifier's (``refstats_*.npz`` in its workdir) and, when FID ran,
  the Inception ones in ``inception_cache_dir``."""
  folders = [feature_net_workdir] + ([inception_cache_dir]
                                     if inception_cache_dir else [])
  paths = sorted({p for folder in folders
                  for p in glob.glob(os.path.join(folder, "refstats_*.npz"))})
  return [provenance.file_identity(p) for p in paths]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.validate(config, "score")
  provenance.absolute_inputs(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  sample_dir = os.path.join(workdir, "samples")
  stages.run(stages.with_stage(config, "sample"), sample_dir)
  samples = os.path.join(sample_dir, "samples.npz")
  if not os.path.exists(samples):  # several processes: shards + manifest
    samples = os.path.join(sample_dir, "samples_manifest.json")
  result = stages.run(stages.with_stage(config, "evaluate", samples=samples),
                      os.path.join(workdir, "evaluate"))

  ecfg, smp = config.evaluate, config.sampler
  sample_set = SampleSet.load(samples)
  weights = ecfg.get("inception_weights") or ""
  protocol = {
      "num_samples": len(sample_set),
      "sampler": {"kind": smp.kind,
                  **{k: smp[k] for k in PROTOCOL_KEYS if k in smp},
                  "keys": "batch b: fold_in(key(seed), b); token i of its "
                          "sample s: fold_in(fold_in(., s), i)"},
      "sources": sample_set.sources,
      "samples": provenance.file_identity(samples),
      "feature_net": provenance.checkpoint_identity(
          config.inputs.feature_net_workdir),
      "reference_statistics": reference_files(
          config.inputs.feature_net_workdir,
          (ecfg.get("inception_cache_dir")
           or config.inputs.feature_net_workdir) if weights else ""),
      "inception_weights": (provenance.file_identity(weights) if weights
                            else None),
  }
  if smp.kind == "kernel":
    protocol["sampler"]["kernel"] = config.kernel.to_dict()
  out = {"protocol": protocol, **result}
  path = os.path.join(workdir, "eval.json")
  io.write_json(path, io.json_safe(out))
  if io.is_writer():
    name = result["feature_net"]["name"]
    fid = result.get("fid")
    print(f"[score] {protocol['num_samples']} samples (seed {smp.seed}): "
          f"{name} {result[name]:.4g}"
          f"{'' if fid is None else f', FID {fid:.4g}'} -> {path}",
          flush=True)
  return out
