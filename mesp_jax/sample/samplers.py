"""One interface for both gamma-ARVMs, one batched driver, one BL-AE decode.

A :class:`Sampler` draws token grids: ``sample(rng, num, labels=None) ->
tokens [num, H, W, Tp]`` (int32, on the host). Two implementations:

* :class:`NeuralSampler`: the trained transformer through the jitted KV-cache
  decoder (:mod:`mesp_jax.sample.decode`);
* :class:`KernelSampler`: the non-parametric estimator over a bank of
  training latents (:mod:`mesp_jax.sample.kernel`).

:func:`draw` turns any sampler into a sample set of any size: batch ``b``
uses the key ``fold_in(rng, b)`` and sample ``i`` the label ``i %
num_classes`` (conditional samplers), so a set depends only on the seed and
the batch size. :func:`token_decoder` maps tokens to images with a jitted,
batch-sharded BL-AE decode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mesp_jax.base import sharding
from mesp_jax.base.gamma import gamma_label
from mesp_jax.models import arvm as arvm_lib
from mesp_jax.models.blae import BLAE, decode_tokens
from mesp_jax.sample import decode
from mesp_jax.sample import kernel as kernel_lib


class Sampler(Protocol):
  """What every gamma-ARVM sampler offers."""

  kind: str  # 'neural' or 'kernel'

  @property
  def grid(self) -> tuple[int, int, int]:
    """(H, W, Tp) of the token grids it draws."""

  @property
  def group(self) -> int:
    """Bits per token g."""

  @property
  def gamma(self) -> int | None:
    """Observation range (None = global)."""

  @property
  def num_classes(self) -> int:
    """0 for an unconditional sampler."""

  @property
  def batch_multiple(self) -> int:
    """Batch sizes must be multiples of this (the data-parallel size)."""

  def sample(self, rng: jax.Array, num: int,
             labels: np.ndarray | None = None) -> np.ndarray:
    """[num, H, W, Tp] int32 tokens; sample b uses ``fold_in(rng, b)``."""


@dataclasses.dataclass(frozen=True)
class NeuralSampler:
  """The neural gamma-ARVM with the jitted KV-cache decoder.

  ``order``: 'raster' (``cache`` ring, full or none) or 'wavefront' (every
  position of a front per step; the same tokens for a seed). ``dtype``:
  activations and KV cache ('bfloat16' halves the cache; '' keeps the
  model's); parameters stay as they are.
  """

  model: arvm_lib.ARVM
  params: Any
  mesh: Mesh | None = None
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  cfg_scale: float = 0.0
  cache: str = "ring"
  order: str = "raster"
  dtype: str = ""
  kind: str = dataclasses.field(default="neural", init=False)

  @property
  def grid(self) -> tuple[int, int, int]:
    m = self.model
    return (m.height, m.width, m.tokens_per_pos)

  @property
  def group(self) -> int:
    return self.model.group

  @property
  def gamma(self) -> int | None:
    return self.model.gamma

  @property
  def num_classes(self) -> int:
    return self.model.num_classes

  @property
  def batch_multiple(self) -> int:
    return 1 if self.mesh is None else sharding.data_parallel_size(self.mesh)

  def sample(self, rng: jax.Array, num: int,
             labels: np.ndarray | None = None) -> np.ndarray:
    model = self.model
    if self.dtype:
      model = model.clone(dtype=arvm_lib.DTYPES[self.dtype])
    tokens = decode.sample_tokens(
        model, self.params, rng, num, labels,
        temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
        cfg_scale=self.cfg_scale, cache=self.cache, mesh=self.mesh,
        order=self.order)
    return sharding.to_host(tokens).astype(np.int32)  # [num, H, W, Tp]


@dataclasses.dataclass(frozen=True)
class KernelSampler:
  """The kernel (non-parametric) gamma-ARVM over a prepared bank.

  ``order``: 'raster', 'random' or 'wavefront' (raster order's tokens for a
  seed, every position of a wavefront per step;
  :func:`mesp_jax.sample.kernel.kernel_sample`).
  """

  bank: kernel_lib.KernelBank
  sigma_s: float
  gamma: int | None
  order: str = "raster"
  temperature: float = 1.0
  kind: str = dataclasses.field(default="kernel", init=False)

  @property
  def grid(self) -> tuple[int, int, int]:
    return tuple(self.bank.grid)

  @property
  def group(self) -> int:
    return self.bank.group

  @property
  def num_classes(self) -> int:
    return 0

  @property
  def batch_multiple(self) -> int:
    return 1  # the bank, not the batch, is split over the devices

  def sample(self, rng: jax.Array, num: int,
             labels: np.ndarray | None = None) -> np.ndarray:
    if labels is not None:
      raise ValueError("the kernel ARVM is unconditional: pass labels=None")
    tokens = kernel_lib.kernel_sample(
        self.bank, group=self.bank.group, sigma_s=self.sigma_s,
        gamma=self.gamma, num_samples=num, rng=rng, order=self.order,
        temperature=self.temperature)
    return sharding.to_host(tokens).astype(np.int32)  # [num, H, W, Tp]


def describe(sampler: Sampler) -> dict[str, Any]:
  """JSON-able facts about a sampler (stored with its samples)."""
  out = {"kind": sampler.kind, "gamma": gamma_label(sampler.gamma),
         "group": int(sampler.group), "grid": list(sampler.grid),
         "num_classes": int(sampler.num_classes)}
  if isinstance(sampler, NeuralSampler):
    out.update(temperature=sampler.temperature, top_k=sampler.top_k,
               top_p=sampler.top_p, cfg_scale=sampler.cfg_scale,
               cache=sampler.cache, order=sampler.order,
               dtype=sampler.dtype or jnp.dtype(sampler.model.dtype).name)
  elif isinstance(sampler, KernelSampler):
    out.update(sigma_s=float(sampler.sigma_s), order=sampler.order,
               temperature=sampler.temperature,
               bank_size=int(sampler.bank.size))
  return out


def process_batches(num_samples: int, batch_size: int,
                    process_index: int | None = None,
                    process_count: int | None = None) -> list[int]:
  """The batch indices one process draws: ``p, p + P, p + 2P, ...``."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  return list(range(p, -(-num_samples // batch_size), n))


def draw(sampler: Sampler, rng: jax.Array, num_samples: int,
         batch_size: int, progress: Callable[[int, int], None] | None = None,
         labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``num_samples`` token grids from any sampler, in batches.

  Batch ``b`` is drawn with ``fold_in(rng, b)`` at the full ``batch_size``
  (the surplus of the last batch is dropped), so the samples do not depend on
  ``num_samples``; sample ``i`` of a conditional sampler gets label
  ``labels[i]`` if given, else ``i % num_classes``.

  Returns:
    (tokens [N, H, W, Tp] int32, labels [N] int32; -1 = unconditional).
  """
  tokens, used, _ = draw_batches(sampler, rng, num_samples, batch_size,
                                 None, progress, labels)
  return tokens, used


def draw_batches(sampler: Sampler, rng: jax.Array, num_samples: int,
                 batch_size: int, batches: Sequence[int] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 labels: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Batches ``batches`` (default: all) of the sample set :func:`draw` makes.

  A process draws its share (:func:`process_batches`) and gets exactly the
  samples a single process would have drawn at those indices.

  Returns:
    (tokens [n, H, W, Tp] int32, labels [n] int32, index [n] int64: the
    samples' positions in the whole set).
  """
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1")
  multiple = sampler.batch_multiple
  if batch_size < 1 or batch_size % multiple:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple "
                     f"of the data-parallel size {multiple}")
  conditional = sampler.num_classes > 0
  if labels is not None:
    labels = np.asarray(labels, np.int32).reshape(-1)
    if not conditional:
      raise ValueError("labels given but the sampler is unconditional")
    if labels.shape != (num_samples,) or labels.min() < 0 or (
        labels.max() > sampler.num_classes):
      raise ValueError(f"labels must be {num_samples} ints in 0.."
                       f"{sampler.num_classes} ({sampler.num_classes} = the "
                       f"null label)")
  all_batches = range(-(-num_samples // batch_size))
  batches = list(all_batches if batches is None else batches)
  if any(b not in all_batches for b in batches):
    raise ValueError(f"batches {batches} must lie in 0..{len(all_batches) - 1} "
                     f"({num_samples} samples in batches of {batch_size})")
  total = sum(min(batch_size, num_samples - b * batch_size) for b in batches)
  tokens, used, index = [], [], []
  for done, b in enumerate(batches):
    idx = np.arange(b * batch_size, (b + 1) * batch_size)
    lab = None
    if conditional:
      lab = (idx % sampler.num_classes if labels is None else
             labels[np.minimum(idx, num_samples - 1)]).astype(np.int32)
    keep = idx < num_samples
    out = sampler.sample(jax.random.fold_in(rng, b), batch_size, lab)
    tokens.append(out[keep])
    used.append((lab if conditional else np.full(batch_size, -1, np.int32))
                [keep])
    index.append(idx[keep])
    if progress is not None:
      progress(min((done + 1) * batch_size, total), total)
  if not batches:
    h, w, tp = sampler.grid
    return (np.zeros((0, h, w, tp), np.int32), np.zeros((0,), np.int32),
            np.zeros((0,), np.int64))
  return (np.concatenate(tokens), np.concatenate(used),
          np.concatenate(index).astype(np.int64))


def token_decoder(model: BLAE, params: Any, group: int, mesh: Mesh | None,
                  batch_size: int = 500) -> Callable[[np.ndarray], np.ndarray]:
  """``decode(tokens [N, h, w, Tp]) -> images [N, H, W, C]`` in [-1, 1].

  One jitted BL-AE decode over fixed-size batches split over the mesh's data
  axes (:func:`mesp_jax.base.sharding.batched_map`); every process passes the
  same tokens and gets every image back.
  """
  fn = jax.jit(lambda p, t: decode_tokens(model, p, t, group))

  def decode_fn(tokens: np.ndarray) -> np.ndarray:
    return sharding.batched_map(fn, np.asarray(tokens, np.int32), batch_size,
                                mesh, params)

  return decode_fn
