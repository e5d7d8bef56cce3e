"""Device mesh, sharding rules, placement and host gathering.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data
parallelism whose replicas also split the parameters) and ``model`` (tensor
parallelism: attention heads and MLP hidden units split over devices). The
batch is split over ``data`` and ``fsdp``.

Parameters get their shardings in one of two ways, never by hand per array:

* Parameters created with logical axis names (``nn.with_logical_partitioning``,
  e.g. the ARVM's ``('embed', 'heads', 'kv')``) are mapped to mesh axes by
  the logical rules (``config.mesh.rules``, default :data:`DEFAULT_RULES`):
  :func:`logical_spec`.
* Every other parameter (the BL-AE, the VAE) follows the size rule: the
  largest dimension divisible by the ``fsdp`` size is sharded over it when
  the tensor is at least ``min_fsdp_size_mb``: :func:`fsdp_spec`.

:func:`state_shardings` applies both to a whole (abstract) train state, and
:func:`activation_rules` is the context under which models constrain their
activations by the same logical names (:func:`constrain`).

Moving data: :func:`shard_batch` (process-local rows -> global batch),
:func:`place` / :func:`replicate` (a host array every process holds in full
-> a global array), :func:`to_host` (any global pytree -> numpy on every
process), :func:`gather_local` (process-local numpy -> all rows), and
:func:`batched_map` (a jitted function over fixed-size padded batches).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import shard_map  # noqa: F401 (re-exported)
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")
MESH_AXES = ("data", "fsdp", "model")

# Logical axis name -> mesh axes (None: replicated). A name missing from the
# rules is replicated. Batch over the data axes; the model width over fsdp
# (ZeRO-3 style: each fsdp replica holds a slice of every large matrix and
# all-gathers it for the layer); heads, MLP units and the histogram bins over
# model (Megatron-style tensor parallelism).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", DATA_AXES),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("length", None),
    ("layers", None),
    ("grid", None),
)

SHARD_MAP_CHECK_KW = "check_vma"  # shard_map(..., **{SHARD_MAP_CHECK_KW: False})


def make_mesh(data: int = -1, fsdp: int = 1, devices=None,
              model: int = 1) -> Mesh:
  """A ``('data', 'fsdp', 'model')`` mesh over ``devices`` (default: all).

  Args:
    data: size of the data axis; -1 takes every device not used by ``fsdp``
      and ``model``.
    fsdp: size of the fsdp axis.
    devices: optional explicit device list (tests use a subset; the
      ahead-of-time check passes a TPU topology's devices).
    model: size of the model (tensor-parallel) axis.

  On TPU the devices are laid out along the physical torus
  (``mesh_utils.create_device_mesh``), so that the inner axes (model, then
  fsdp) are neighbours; elsewhere, and where jax has no layout for the
  devices (one device per TensorCore), in the order given.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for name, size in (("fsdp", fsdp), ("model", model)):
    if size < 1 or n % size:
      raise ValueError(
          f"mesh.{name}={size} must be >= 1 and divide the device count {n}")
  if data == -1:
    data = n // (fsdp * model)
  if data * fsdp * model != n:
    raise ValueError(
        f"mesh.data * mesh.fsdp * mesh.model = {data} * {fsdp} * {model} must "
        f"equal the device count {n}; set mesh.data=-1 to use all devices")
  shape = (data, fsdp, model)
  if devices[0].platform == "tpu" and n > 1:
    from jax.experimental import mesh_utils
    try:
      grid = mesh_utils.create_device_mesh(shape, devices,
                                           allow_split_physical_axes=True)
    except (AssertionError, ValueError, NotImplementedError):
      # e.g. one device per TensorCore (v4 without megacore): in id order.
      grid = np.asarray(devices).reshape(shape)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


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
  return state_shardings(abstract_tree, mesh, min_size_mb=min_size_mb)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """``config.mesh.rules`` as a tuple of ``(logical name, mesh axes)``;
  :data:`DEFAULT_RULES` when absent or empty."""
  mesh_cfg = config.get("mesh", None) or {}
  rules = mesh_cfg.get("rules", None) or DEFAULT_RULES
  return tuple((str(name), tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in rules)


def _mesh_axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_spec(names: tuple[str | None, ...], shape: tuple[int, ...],
                 mesh: Mesh, rules) -> P:
  """The mesh PartitionSpec of a tensor with logical axis ``names``.

  Each logical name maps to the mesh axes of its rule (unknown names and
  None: replicated). A mesh axis is used at most once per tensor (the first
  dimension that asks for it gets it), and a dimension whose size the mesh
  axes do not divide is replicated, so odd sizes (e.g. 10 classes over a
  model axis of 4) still compile.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape, strict=True):
    axes = tuple(a for a in _mesh_axes_of(table.get(name)) if a not in used
                 and mesh.shape.get(a, 1) > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def state_shardings(abstract_tree: Any, mesh: Mesh, rules=DEFAULT_RULES,
                    min_size_mb: float = 4.0) -> Any:
  """NamedShardings for an abstract pytree (e.g. a whole train state).

  Leaves boxed with logical axis names (flax ``nn.LogicallyPartitioned``,
  also inside optimizer states built from boxed parameters) follow
  ``rules`` (:func:`logical_spec`); plain leaves follow the fsdp size rule
  (:func:`fsdp_spec`). Returns an unboxed tree (the structure of
  ``flax.linen.unbox(abstract_tree)``).
  """
  from flax.core import meta
  from flax.linen import spmd

  fsdp_size = mesh.shape["fsdp"]

  def rule(x):
    if isinstance(x, meta.Partitioned):
      value = x.value
      names = tuple(x.names)
      if isinstance(x, spmd.LogicallyPartitioned):
        return NamedSharding(mesh, logical_spec(names, tuple(value.shape),
                                                mesh, rules))
      return NamedSharding(mesh, P(*names))  # already mesh axes
    if not hasattr(x, "shape"):
      return replicated(mesh)
    spec = fsdp_spec(tuple(x.shape), fsdp_size, np.dtype(x.dtype).itemsize,
                     min_size_mb)
    return NamedSharding(mesh, spec)

  return jax.tree.map(rule, abstract_tree,
                      is_leaf=lambda x: isinstance(x, meta.Partitioned))


def unbox(tree: Any) -> Any:
  """``tree`` with flax's partitioning boxes replaced by their values."""
  from flax.core import meta
  return meta.unbox(tree)


_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar(
    "mesp_jax_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh | None, rules=DEFAULT_RULES):
  """Context under which :func:`constrain` in a model constrains activations
  on ``mesh`` by ``rules``; outside it (and with ``mesh=None``) those
  constraints do nothing. It must be active when a jitted function traces.

  (Flax's own ``nn.with_logical_constraint`` needs a global mesh, and under
  one flax also constrains every boxed initializer output, which breaks
  ``nn.DenseGeneral``'s flat-then-reshape kernel init; this context does
  not set a global mesh.)
  """
  token = _ACTIVATIONS.set(None if mesh is None else (mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """``x`` constrained to the sharding of its logical axis ``names`` under
  :func:`activation_rules` (a no-op outside it)."""
  active = _ACTIVATIONS.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_spec(tuple(names), tuple(x.shape), mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


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


def mesh_from_config(config, devices=None) -> Mesh:
  """The mesh of ``config.mesh`` (``data``, ``fsdp``, ``model``) over
  ``devices`` (default: all devices)."""
  mesh_cfg = config.get("mesh", None) or {}
  return make_mesh(data=mesh_cfg.get("data", -1), fsdp=mesh_cfg.get("fsdp", 1),
                   model=mesh_cfg.get("model", 1), devices=devices)


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
