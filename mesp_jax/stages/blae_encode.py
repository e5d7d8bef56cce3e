"""Stage ``blae_encode``: a trained BL-AE's token grids of whole splits.

Reads the BL-AE from ``config.inputs.blae_workdir``. Every process encodes
its own contiguous share of each of ``config.encode.splits`` (process p of P:
examples ``[p*N//P, (p+1)*N//P)``) on its own devices, with no collectives,
and writes it as a shard pair ``tokens_{split}/{tokens,labels}-p-of-P.npy``;
process 0 then writes the manifest ``tokens_{split}.json`` (format in
:mod:`mesp_jax.data.tokens`): tokens int32 [N, h, w, 1] (one token of C bits
per position, first channel most significant), labels, bits, grid, the
BL-AE workdir (absolute) and the checkpoint step they came from.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from mesp_jax.base import config as config_lib
from mesp_jax.base import io, sharding
from mesp_jax.data import source_from_config
from mesp_jax.data import tokens as tokens_lib
from mesp_jax.train import blae, provenance


class _Share:
  """The examples ``[start, stop)`` of a source, as a source of its own."""

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return self.source.read(self.start + np.asarray(indices))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _remove_stale_shards(workdir: str, split: str, process_count: int) -> None:
  """Deletes shards of an earlier run with another process count."""
  folder = os.path.join(workdir, f"tokens_{split}")
  keep = {os.path.basename(f) for p in range(process_count)
          for f in tokens_lib.shard_files(split, p, process_count)}
  for name in os.listdir(folder):
    if (name.startswith(("tokens-", "labels-")) and name.endswith(".npy")
        and name not in keep):
      os.remove(os.path.join(folder, name))


def _local_blae(blae_dir: str, mesh):
  """(model, params on ``mesh``, config, step) of the BL-AE.

  ``mesh`` holds this process's devices only. Orbax (0.12) restores onto
  such a mesh directly in multi-process runs too: each process reads the
  arrays its own devices need from the shared checkpoint, so no restore on
  the global mesh and gather (``sharding.to_local``) is needed (checked by
  tests/test_tokens_sharded.py with 2 processes).
  """
  return blae.load_blae(blae_dir, mesh)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.validate(config, "blae_encode")
  provenance.absolute_inputs(config)
  blae_dir = os.path.abspath(config.inputs.blae_workdir or workdir)
  p, num_p = jax.process_index(), jax.process_count()
  # This process's devices only (no collectives); config.mesh.fsdp splits
  # large parameters over them, config.mesh.data is not used.
  fsdp = int((config.get("mesh", None) or {}).get("fsdp", 1))
  mesh = sharding.make_mesh(fsdp=fsdp, devices=jax.local_devices())
  model, params, blae_config, step = _local_blae(blae_dir, mesh)
  dp = sharding.data_parallel_size(mesh)
  batch_size = max(dp, int(config.encode.batch_size) // dp * dp)
  written, lines = {}, []
  for split in config.encode.splits:
    manifest = tokens_lib.manifest_path(workdir, split)
    if io.is_writer() and os.path.exists(manifest):
      os.remove(manifest)  # no manifest over a half-rewritten shard set
    _barrier(f"blae_encode_{split}_start")
    source = source_from_config(blae_config.data, split)
    n = len(source)
    grid = model.latent_shape(tuple(source.image_shape))[:2]  # (h, w)
    start, stop = tokens_lib.shard_range(n, p, num_p)
    if stop > start:
      tokens, labels = blae.encode_split(model, params,
                                         _Share(source, start, stop),
                                         batch_size, mesh)  # [n_p, h, w, 1]
    else:  # more processes than examples
      tokens = np.zeros((0, *grid, 1), np.int32)
      labels = np.zeros((0,), np.int32)
    shard, _ = tokens_lib.write_shard(workdir, split, p, num_p, tokens,
                                      labels)
    _barrier(f"blae_encode_{split}_shards")
    if io.is_writer():
      tokens_lib.write_manifest(manifest, tokens_lib.make_manifest(
          split=split, dataset=blae_config.data.name,
          grid=grid, bits=model.bits, num_examples=n,
          process_count=num_p, blae_workdir=blae_dir, checkpoint_step=step))
      _remove_stale_shards(workdir, split, num_p)
    _barrier(f"blae_encode_{split}_manifest")
    lines.append(f"[blae_encode] process {p}/{num_p} {split}: images "
                 f"[{start}, {stop}) of {n} -> tokens {tokens.shape[1:]} of "
                 f"{model.bits} bits -> {shard}")
    written[split] = manifest
  # Re-encoding rewrites the tokens, so nothing is refused here; the record
  # lets every consumer of these tokens see which BL-AE step made them.
  provenance.check_and_record(
      workdir, "blae_encode", config,
      {"blae": provenance.checkpoint_identity(blae_dir, step)},
      resuming=False)
  print("\n".join(lines), flush=True)
  return written
