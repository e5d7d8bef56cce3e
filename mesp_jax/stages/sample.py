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

Before the first draw, :func:`check_sampling` refuses (``ConfigError``) a
``sampler.batch_size`` the sampler's devices cannot split and a
``sampler.num_samples`` whose sample set would not fit in this machine's
available host memory.
"""

from __future__ import annotations

import math
import os
import time

import jax
import ml_collections
from jax.experimental import multihost_utils

from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.base.config import ConfigError
from mesp_jax.base.gamma import parse_gamma
from mesp_jax.data import data_channels
from mesp_jax.data import sample_set as sample_set_lib
from mesp_jax.data import tokens as tokens_lib
from mesp_jax.data.sample_set import SampleSet
from mesp_jax.data.tokens import load_bank
from mesp_jax.sample import kernel as kernel_lib
from mesp_jax.sample import samplers
from mesp_jax.train import arvm, blae, loop, provenance

GRID_SAMPLES = 64
# Copies of the sample set held at the peak: the arrays, the in-memory .npz
# that io.save_npz builds and the bytes it writes (BytesIO.getvalue()).
PEAK_COPIES = 3
# Share of the available host memory a sample set may take (the rest: the
# models, XLA, the decoder's batches).
MEMORY_SHARE = 0.9


def _bytes(n: float) -> str:
  """``n`` bytes for people: '1.5 GiB'."""
  units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
  i = 0
  while n >= 1024 and i < len(units) - 1:
    n, i = n / 1024, i + 1
  return f"{n:.1f} {units[i]}"


def available_memory() -> int:
  """Host bytes available to new allocations (psutil; else the free pages)."""
  try:
    import psutil  # a dependency of tensorflow-datasets, not declared here
  except ImportError:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return int(psutil.virtual_memory().available)


def local_samples(num_samples: int, batch_size: int, processes: int) -> int:
  """The most samples one of ``processes`` draws (its batches: p, p + P,
  ...), without listing the batches."""
  batches = -(-num_samples // batch_size)
  return min(num_samples, -(-batches // processes) * batch_size)


def sample_set_bytes(num_samples: int, token_grid: tuple[int, int, int],
                     image_shape: tuple[int, int, int]) -> int:
  """Host bytes of a sample set of ``num_samples``: int32 tokens [h, w, Tp],
  float32 images [H, W, C], int32 labels and int64 indices per sample."""
  per_sample = 4 * math.prod(token_grid) + 4 * math.prod(image_shape) + 4 + 8
  return int(num_samples) * per_sample


def check_sampling(scfg: ml_collections.ConfigDict, sampler,
                   image_shape: tuple[int, int, int], processes: int = 1,
                   available: int | None = None) -> int:
  """Refuses, before any draw, what the sampler cannot do or the host cannot
  hold; returns the estimated peak host bytes of this process.

  Args:
    scfg: ``config.sampler`` (num_samples, batch_size).
    sampler: the built sampler (``grid``, ``batch_multiple``).
    image_shape: (H, W, C) of the BL-AE's decoded images.
    processes: processes sharing the draws (each holds its own batches).
    available: host bytes available (default: :func:`available_memory`).

  Raises:
    ConfigError: ``sampler.batch_size`` is not a multiple of the sampler's
      data-parallel size, or the sample set would need more than
      :data:`MEMORY_SHARE` of the available memory (the message gives the
      estimate, the memory and the largest ``num_samples`` that fits).
  """
  num, batch = int(scfg.num_samples), int(scfg.batch_size)
  multiple = int(sampler.batch_multiple)
  if batch % multiple:
    fit = max(multiple, batch // multiple * multiple)
    raise ConfigError(
        f"config.sampler.batch_size={batch} must be a multiple of the "
        f"sampler's data-parallel size {multiple} (each batch is split over "
        f"that many devices); use e.g. --config.sampler.batch_size={fit}")
  available = available_memory() if available is None else int(available)
  local = local_samples(num, batch, processes)
  per_sample = sample_set_bytes(1, sampler.grid, image_shape)
  need = PEAK_COPIES * local * per_sample
  budget = MEMORY_SHARE * available
  if need > budget:
    most = int(budget // (PEAK_COPIES * per_sample)) * processes
    most = most // batch * batch
    fewer = (f"Draw at most about {most} samples per run "
             f"(--config.sampler.num_samples={most})" if most else
             f"Not even one batch of {batch} fits: lower "
             f"config.sampler.batch_size and num_samples")
    h, w, tp = sampler.grid
    height, width, channels = image_shape
    raise ConfigError(
        f"config.sampler.num_samples={num} needs about {_bytes(need)} of "
        f"host memory in this process ({local} samples of "
        f"{_bytes(per_sample)}: int32 tokens [{h}, {w}, {tp}] and float32 "
        f"images [{height}, {width}, {channels}], held {PEAK_COPIES} times "
        f"while samples.npz is written), but this machine has "
        f"{_bytes(available)} available. {fewer}, or draw several sets, "
        f"each with its own --config.sampler.seed and --workdir")
  return need


def check_decoder(config: ml_collections.ConfigDict, sources: dict) -> None:
  """Refuses to decode tokens with a BL-AE other than the one that made the
  ARVM's (or the bank's) training tokens, unless
  ``config.inputs.allow_changed``.

  ``sources``: the sampler's (``arvm_workdir`` or ``tokens``) and the
  decoder's ``blae_workdir`` / ``blae_step``.

  Raises:
    InputsChangedError: another BL-AE workdir, or another step of it.
  """
  if "arvm_workdir" in sources:
    run_config = arvm.upgrade_config(
        loop.load_run_config(sources["arvm_workdir"], "arvm"))
    path = tokens_lib.tokens_path(
        run_config.inputs.tokens_dir,
        run_config.tokens.get("train_split", "train"))
    what = f"the ARVM in {sources['arvm_workdir']} was trained on tokens"
  else:
    path = sources["tokens"]
    what = "the kernel ARVM's bank is tokens"
  if not os.path.exists(path):
    return  # nothing to compare with (tokens moved since training)
  info = tokens_lib.read_info(path)
  made_by = (info.get("blae_workdir", ""), info.get("checkpoint_step", -1))
  used = (sources["blae_workdir"], sources["blae_step"])
  if made_by[1] < 0:  # older token files do not record the step
    used = (used[0], made_by[1])
  if not made_by[0] or made_by == used:
    return
  if config.inputs.get("allow_changed", False):
    print(f"warning: {what} of {made_by[0]} at step {made_by[1]}, decoded "
          f"by {used[0]} at step {used[1]} (inputs.allow_changed)",
          flush=True)
    return
  raise provenance.InputsChangedError(
      f"{what} encoded by the BL-AE {made_by[0]} at checkpoint step "
      f"{made_by[1]} ({path}), but the samples would be decoded by "
      f"{used[0]} at step {used[1]}: the images would not be what the "
      f"tokens mean. Point config.inputs.blae_workdir at the BL-AE that "
      f"made the tokens (at that step), retrain the ARVM on tokens of this "
      f"BL-AE, or pass --config.inputs.allow_changed=True to decode anyway.")


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
  provenance.absolute_inputs(config)
  scfg = config.sampler
  mesh = sharding.mesh_from_config(config)
  t0 = time.time()
  processes = jax.process_count()
  # With several processes each draws and decodes its own batches on its own
  # devices.
  sample_mesh = sharding.local_mesh() if processes > 1 else mesh
  sampler, blae_dir, sources = build_sampler(config, kind, mesh, sample_mesh)
  blae_dir = os.path.abspath(config.inputs.blae_workdir or blae_dir)
  model_b, params_b, blae_cfg, blae_step = blae.load_blae(blae_dir, mesh)
  sources.update(blae_workdir=blae_dir, blae_step=blae_step)
  size = int(blae_cfg.data.image_size)
  check_sampling(scfg, sampler, (size, size, data_channels(blae_cfg.data)),
                 processes)
  check_decoder(config, sources)
  inputs = {"blae": provenance.checkpoint_identity(blae_dir, blae_step)}
  if kind == "neural":
    inputs["arvm"] = provenance.checkpoint_identity(sources["arvm_workdir"],
                                                    sources["arvm_step"])
  else:
    inputs["tokens"] = {"path": sources["tokens"]}
  sources.update({f"{k}_digest": v["digest"] for k, v in inputs.items()
                  if "digest" in v})
  provenance.check_and_record(workdir, "sample", config, inputs,
                              resuming=False)
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
