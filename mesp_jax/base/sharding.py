"""Device mesh, sharding rules, placement and host gathering.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data
parallelism whose replicas also split the parameters). The batch is split over
both; parameters are replicated or sharded over ``fsdp`` by a size rule, never
by hand per array.

Moving data: :func:`shard_batch` (process-local rows -> global batch),
:func:`place` / :func:`replicate` (a host array every process holds in full
-> a global array), :func:`to_host` (any global pytree -> numpy on every
process), :func:`gather_local` (process-local numpy -> all rows), and
:func:`batched_map` (a jitted function over fixed-size padded batches).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import shard_map  # noqa: F401 (re-exported)
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")

SHARD_MAP_CHECK_KW = "check_vma"  # shard_map(..., **{SHARD_MAP_CHECK_KW: False})


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


def mesh_from_config(config) -> Mesh:
  """The mesh of ``config.mesh`` (``data``, ``fsdp``); all devices by default."""
  mesh_cfg = config.get("mesh", None) or {}
  return make_mesh(data=mesh_cfg.get("data", -1), fsdp=mesh_cfg.get("fsdp", 1))


def place(x: Any, mesh: Mesh, spec: P | None = None) -> jax.Array:
  """A host array that every process holds in full, as a global array.

  Args:
    x: the whole array (the same on every process).
    mesh: the mesh.
    spec: its partitioning; default: the leading axis over the data axes.
  """
  x = np.asarray(x)
  sharding = NamedSharding(mesh, P(DATA_AXES) if spec is None else spec)
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def replicate(x: Any, mesh: Mesh) -> jax.Array:
  """A host array as a replicated global array (works across processes)."""
  return place(x, mesh, P())


def local_mesh() -> Mesh:
  """A ``data`` mesh over this process's own devices (work that each process
  does alone, e.g. its share of the samples)."""
  return make_mesh(devices=jax.local_devices())


def to_local(tree: Any, mesh: Mesh) -> Any:
  """A pytree of global arrays, whole and replicated on ``mesh`` (a
  :func:`local_mesh`): gathered from every process first if sharded."""
  return jax.tree.map(lambda x: jax.device_put(x, replicated(mesh)),
                      to_host(tree))


def batched_map(fn: Callable[..., Any], inputs: np.ndarray, batch_size: int,
                mesh: Mesh | None = None, *args) -> np.ndarray:
  """``fn(*args, batch)`` over fixed-size batches of ``inputs``, on the host.

  Every batch has the same shape (the last one is padded with zeros and the
  padding dropped), so a jitted ``fn`` compiles once. With ``mesh`` each batch
  is split over its data axes (``batch_size`` is rounded to a multiple of the
  data-parallel size); every process passes the same full ``inputs`` and gets
  all outputs back.

  Args:
    fn: ``(*args, batch [B, ...]) -> [B, ...]`` (a single array).
    inputs: [N, ...] host array.
    batch_size: rows per call.
    mesh: optional mesh for the batch.
    *args: leading arguments passed unchanged (e.g. parameters).

  Returns:
    [N, ...] numpy outputs.
  """
  inputs = np.asarray(inputs)
  n = inputs.shape[0]
  dp = 1 if mesh is None else data_parallel_size(mesh)
  batch = max(dp, batch_size // dp * dp)
  batch = min(batch, max(-(-n // dp) * dp, dp))  # no bigger than needed
  out = []
  for start in range(0, n, batch):
    chunk = inputs[start:start + batch]
    real = chunk.shape[0]
    if real < batch:
      chunk = np.concatenate(
          [chunk, np.zeros((batch - real,) + chunk.shape[1:], chunk.dtype)])
    placed = chunk if mesh is None else place(chunk, mesh)
    out.append(to_host(fn(*args, placed))[:real])
  if not out:
    raise ValueError("batched_map needs at least one input row")
  return np.concatenate(out)
