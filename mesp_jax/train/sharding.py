"""Device mesh and sharding rules.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data
parallelism whose replicas also split the parameters). The batch is split over
both; parameters are replicated or sharded over ``fsdp`` by a size rule, never
by hand per array.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")

try:  # jax >= 0.7 exposes shard_map at the top level.
  from jax import shard_map  # noqa: F401 (re-exported)
  SHARD_MAP_CHECK_KW = "check_vma"  # shard_map(..., **{SHARD_MAP_CHECK_KW: False})
except ImportError:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map  # noqa: F401
  SHARD_MAP_CHECK_KW = "check_rep"


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ``('data', 'fsdp')`` mesh over ``devices`` (default: all devices).

  Args:
    data: size of the data axis; -1 takes every device not used by ``fsdp``.
    fsdp: size of the fsdp axis.
    devices: optional explicit device list (tests use a subset).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(
        f"mesh.fsdp={fsdp} must be >= 1 and divide the device count {n}")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(
        f"mesh.data * mesh.fsdp = {data} * {fsdp} must equal the device count "
        f"{n}; set mesh.data=-1 to use all devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in DATA_AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, itemsize: int,
              min_size_mb: float) -> P:
  """Rule: shard the largest divisible dimension over ``fsdp`` if big enough."""
  size_mb = math.prod(shape) * itemsize / 2**20
  if fsdp_size == 1 or size_mb < min_size_mb or not shape:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(abstract_tree: Any, mesh: Mesh,
                    min_size_mb: float = 4.0) -> Any:
  """NamedShardings for a pytree of ShapeDtypeStructs by the fsdp rule."""
  fsdp_size = mesh.shape["fsdp"]

  def rule(x):
    if not hasattr(x, "shape"):
      return replicated(mesh)
    spec = fsdp_spec(tuple(x.shape), fsdp_size, np.dtype(x.dtype).itemsize,
                     min_size_mb)
    return NamedSharding(mesh, spec)

  return jax.tree.map(rule, abstract_tree)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a process-local numpy batch as a global array on the mesh.

  Each process passes its own slice (leading axis); the global batch is the
  concatenation over processes in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def to_host(tree: Any) -> Any:
  """Numpy values of a pytree of (possibly multi-host) global arrays.

  Arrays that span devices of other processes are gathered with
  ``process_allgather``; everything else is a plain ``device_get``.
  """
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def gather_local(x: np.ndarray) -> np.ndarray:
  """Concatenates a process-local numpy array over processes (in order)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x),
                                                      tiled=True))
