"""Stage ``sample``: a sample set from either gamma-ARVM (``sampler.kind``).

* ``neural``: the trained ARVM of ``config.inputs.arvm_workdir`` through the
  jitted KV-cache decoder (``sampler.cache``: ring, full or none);
* ``kernel``: the non-parametric ARVM whose model is the bank of training
  latents ``tokens_{tokens.train_split}.npz`` in ``config.inputs.tokens_dir``
  (``config.kernel``: group, sigma_s, gamma, order, chunk_size). The stage
  name ``kernel_sample`` is this stage with the kernel sampler.

The tokens are decoded by the BL-AE of ``config.inputs.blae_workdir`` (else
the one the ARVM or the bank names). Writes ``samples.npz`` (the
:class:`~mesp_jax.data.sample_set.SampleSet` schema) and ``samples.png``.
With several processes (``--multihost``) each process draws its own batches
(the same samples as one process) on its own devices and writes its shard
``samples-PPPPP-of-NNNNN.npz``; process 0 writes ``samples_manifest.json``,
which every reader of sample sets accepts in place of ``samples.npz``.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
from jax.experimental import multihost_utils

from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.base.gamma import parse_gamma
from mesp_jax.data import sample_set as sample_set_lib
from mesp_jax.data.sample_set import SampleSet
from mesp_jax.data.tokens import load_bank
from mesp_jax.sample import kernel as kernel_lib
from mesp_jax.sample import samplers
from mesp_jax.train import arvm, blae

GRID_SAMPLES = 64


def build_sampler(config: ml_collections.ConfigDict, kind: str, mesh,
                  sample_mesh=None) -> tuple[samplers.Sampler, str, dict]:
  """(sampler, BL-AE workdir, sources) for ``kind`` from the config.

  Checkpoints are restored onto ``mesh``; the sampler runs on
  ``sample_mesh`` (default ``mesh``; a process-local mesh when every process
  draws its own batches).
  """
  scfg, inputs = config.sampler, config.inputs
  sample_mesh = mesh if sample_mesh is None else sample_mesh
  if kind == "neural":
    arvm_dir = os.path.abspath(inputs.arvm_workdir)
    model, params, _, step, blae_dir = arvm.load_arvm(arvm_dir, mesh)
    if sample_mesh is not mesh:
      params = sharding.to_local(params, sample_mesh)
    sampler = samplers.NeuralSampler(
        model, params, sample_mesh, temperature=float(scfg.temperature),
        top_k=int(scfg.top_k), top_p=float(scfg.top_p),
        cfg_scale=float(scfg.cfg_scale), cache=scfg.cache,
        order=scfg.get("order", "raster"), dtype=scfg.get("dtype", ""))
    return sampler, blae_dir, {"arvm_workdir": arvm_dir, "arvm_step": step}
  kcfg = config.kernel
  bank = load_bank(config)
  kbank = kernel_lib.prepare_bank(bank.tokens, group=bank.group,
                                  chunk_size=int(kcfg.chunk_size),
                                  mesh=sample_mesh)
  sampler = samplers.KernelSampler(
      kbank, sigma_s=float(kcfg.sigma_s), gamma=parse_gamma(kcfg.gamma),
      order=kcfg.order, temperature=float(scfg.temperature))
  return sampler, bank.blae_workdir, {"tokens": os.path.abspath(bank.path),
                                      "bank_size": len(bank.tokens)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  kind = "kernel" if config.stage == "kernel_sample" else config.sampler.kind
  config_lib.validate(config, "sample", sampler_kind=kind)
  scfg = config.sampler
  mesh = sharding.mesh_from_config(config)
  t0 = time.time()
  processes = jax.process_count()
  # With several processes each draws and decodes its own batches on its own
  # devices.
  sample_mesh = sharding.local_mesh() if processes > 1 else mesh
  sampler, blae_dir, sources = build_sampler(config, kind, mesh, sample_mesh)
  blae_dir = os.path.abspath(config.inputs.blae_workdir or blae_dir)
  model_b, params_b, _, blae_step = blae.load_blae(blae_dir, mesh)
  sources.update(blae_workdir=blae_dir, blae_step=blae_step)
  if processes > 1:
    params_b = sharding.to_local(params_b, sample_mesh)

  def progress(done, total):
    if io.is_writer():
      print(f"[sample] {done}/{total} samples", flush=True)

  num, batch = int(scfg.num_samples), int(scfg.batch_size)
  tokens, labels, index = samplers.draw_batches(
      sampler, jax.random.key(int(scfg.seed)), num, batch,
      samplers.process_batches(num, batch), progress)
  sample_s = time.time() - t0
  images = samplers.token_decoder(model_b, params_b, sampler.group,
                                  sample_mesh)(
      tokens)  # [n, H, W, C] in [-1, 1]
  info = samplers.describe(sampler)
  settings = dict(info, seed=int(scfg.seed), batch_size=batch,
                  num_samples=num)
  sample_set = SampleSet(tokens=tokens, images=images, labels=labels,
                         kind=sampler.kind, gamma=info["gamma"],
                         group=sampler.group, sources=sources,
                         settings=settings)
  png = os.path.join(workdir, "samples.png")
  if processes == 1:
    npz = os.path.join(workdir, "samples.npz")
    sample_set.save(npz)
  else:
    npz = os.path.join(workdir, sample_set_lib.MANIFEST)
    shards = [sample_set_lib.shard_name(p, processes)
              for p in range(processes)]
    sample_set.extra["index"] = index
    sample_set.save(os.path.join(workdir, shards[jax.process_index()]),
                    shard=True)
    multihost_utils.sync_global_devices("samples written")
    sample_set_lib.write_manifest(npz, shards, num, dict(
        kind=sampler.kind, gamma=info["gamma"], processes=processes))
  io.save_grid(png, images[:GRID_SAMPLES], ncol=8)
  if io.is_writer():
    print(f"[sample] {kind} gamma={info['gamma']} g={sampler.group}: "
          f"{num} samples in {sample_s:.1f} s -> {png}, {npz}", flush=True)
  return {"png": png, "npz": npz, "num_samples": num,
          "sample_seconds": sample_s}
