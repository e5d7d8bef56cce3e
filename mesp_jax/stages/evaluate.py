"""Stage ``evaluate``: quality and memorisation of a samples ``.npz``.

Reads ``images`` of ``config.inputs.samples`` and the classifier of
``config.inputs.feature_net_workdir`` (stage ``train_feature_net``) and
writes ``eval.json`` (see :mod:`mesp_jax.eval.evaluate` for every field):
the offline Frechet distance, KID, precision/recall, the real test split as a
reference line, the copy rate, and FID / KID / IS only with the standard
Inception weights (``config.evaluate.inception_weights``).
"""

from __future__ import annotations

import os

import ml_collections

from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.data import source_from_config
from mesp_jax.eval import evaluate
from mesp_jax.train import feature_net, provenance


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes ``{workdir}/eval.json`` and returns it."""
  config_lib.validate(config, "evaluate")
  provenance.absolute_inputs(config)
  cfg = config.evaluate
  os.makedirs(workdir, exist_ok=True)
  net = feature_net.load_feature_net(config.inputs.feature_net_workdir)
  inputs = {"feature_net": provenance.checkpoint_identity(
      config.inputs.feature_net_workdir)}
  if os.path.isfile(config.inputs.samples):  # else a manifest's folder
    inputs["samples"] = provenance.file_identity(config.inputs.samples)
  provenance.check_and_record(workdir, "evaluate", config, inputs,
                              resuming=False)
  fn_data = net[2].data
  shape = source_from_config(fn_data, fn_data.get("eval_split", "test")
                             ).image_shape
  samples = evaluate.load_samples(config.inputs.samples, shape)
  if int(cfg.max_samples):
    samples = samples[:int(cfg.max_samples)]
  mesh = sharding.mesh_from_config(config)
  result = evaluate.evaluate_images(samples, config, net, mesh)
  path = os.path.join(workdir, cfg.get("output", "eval.json"))
  io.write_json(path, result)
  if io.is_writer():
    name = result["feature_net"]["name"]
    ref = result.get("reference_test_vs_train", {})
    mem = result.get("memorization") or {}
    print(f"[evaluate] {result['num_samples']} samples: {name} "
          f"{result[name]:.3f} (test vs train {ref.get(name, float('nan')):.3f})"
          f", copy rate {mem.get('copy_rate', 'n/a')} -> {path}", flush=True)
  return result
