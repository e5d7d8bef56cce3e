"""Memorisation: exact nearest neighbours, PSNR and copy rates.

The local correlation hypothesis (LCH) says generation comes from local
dependence; with a global observation range the ARVM copies its training set.
A sample counts as a copy when its nearest training image (L2 in pixels) is
within ``PSNR >= 25 dB`` (pixels on 0..255); in latent space, when its nearest
training latent differs in at most ``latent_threshold`` of the bits.

The searches are exact and scale: the references are split over every device
of a mesh (``shard_map``), processed in chunks of ``chunk_size`` per device,
and the per-device winners are combined by a cross-device argmin (smallest
distance, ties to the smallest index).

* L2: approximate squared distances ``||q||^2 - 2 q.r + ||r||^2`` by matmul
  after centring both sets on the references' mean (small magnitudes, so the
  float32 cancellation error is small), then the ``recheck`` best candidates
  of each chunk are re-scored exactly as ``sum((q - r)^2)``.
* L1: ``sum |q - r|`` directly, one query at a time within a chunk.
* Hamming on +-1 bits: ``(D - <a, b>) / 2`` by a bf16 matmul with float32
  accumulation (exact integers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mesp_jax.base import bits as bits_lib
from mesp_jax.base.image import psnr
from mesp_jax.base.sharding import (
  DATA_AXES,
  SHARD_MAP_CHECK_KW,
  make_mesh,
  shard_map,
)

METRICS = ("l2", "l1", "hamming", "hamming_tokens")
_INT_MAX = np.iinfo(np.int32).max

PSNR_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


# ---------------------------------------------------------------------------
# Exact nearest-neighbour search.
# ---------------------------------------------------------------------------


def _default_mesh() -> Mesh:
  return make_mesh(devices=jax.devices()[:1])


def _place(x: np.ndarray, mesh: Mesh, spec: P) -> jax.Array:
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                      lambda i: x[i])


def _local_search(queries, refs, ref_index, *, metric: str, recheck: int,
                  group: int):
  """One device: exact best (distance, index) per query over its chunks.

  Args:
    queries: [Q, F] replicated.
    refs: [nc, c, F] this device's references.
    ref_index: [nc, c] global indices, -1 for padding.
  """
  nc, c, _ = refs.shape
  q_count = queries.shape[0]
  hi = jax.lax.Precision.HIGHEST
  if metric == "l2":
    q_sq = jnp.sum(queries * queries, axis=1)  # [Q]
  elif metric == "hamming":
    q_bits = queries.astype(jnp.bfloat16)
  elif metric == "hamming_tokens":
    q_bits = bits_lib.unpack(queries, group, jnp.bfloat16)  # [Q, T g]

  def chunk_best(r, index):
    """Best exact (distance [Q], index [Q]) within one chunk."""
    valid = index >= 0  # [c]
    if metric == "l2":
      r_sq = jnp.sum(r * r, axis=1)  # [c]
      approx = (q_sq[:, None] - 2.0 * jnp.matmul(queries, r.T, precision=hi)
                + r_sq[None, :])  # [Q, c]
      approx = jnp.where(valid[None, :], approx, jnp.inf)
      k = min(recheck, c)
      _, cand = jax.lax.top_k(-approx, k)  # [Q, k]
      diff = queries[:, None, :] - r[cand]  # [Q, k, F]
      dist = jnp.sum(diff * diff, axis=-1)  # [Q, k] exact squared distance
      dist = jnp.where(valid[cand], dist, jnp.inf)
      cand_index = index[cand]
    else:
      if metric == "l1":
        dist = jax.lax.map(lambda q: jnp.sum(jnp.abs(q[None, :] - r), -1),
                           queries)  # [Q, c]
      else:
        r_bits = (r.astype(jnp.bfloat16) if metric == "hamming" else
                  bits_lib.unpack(r, group, jnp.bfloat16))  # [c, D]
        dot = jnp.matmul(q_bits, r_bits.T, preferred_element_type=jnp.float32)
        dist = 0.5 * (r_bits.shape[1] - dot)  # [Q, c] exact integers
      dist = jnp.where(valid[None, :], dist, jnp.inf)
      cand_index = jnp.broadcast_to(index[None, :], dist.shape)
    best = jnp.min(dist, axis=1)  # [Q]
    best_index = jnp.min(jnp.where(dist == best[:, None], cand_index, _INT_MAX),
                         axis=1)
    return best, best_index

  def body(carry, inputs):
    best, best_index = carry
    d, i = chunk_best(*inputs)
    better = d < best  # chunks come in increasing index order
    return (jnp.where(better, d, best), jnp.where(better, i, best_index)), None

  init = (jnp.full((q_count,), jnp.inf, jnp.float32),
          jnp.full((q_count,), _INT_MAX, jnp.int32))
  (best, best_index), _ = jax.lax.scan(body, init, (refs, ref_index))
  # Cross-device argmin: smallest distance, then smallest index.
  best_all = jax.lax.pmin(best, DATA_AXES)
  best_index = jax.lax.pmin(
      jnp.where(best == best_all, best_index, _INT_MAX), DATA_AXES)
  return best_all, best_index


@functools.lru_cache(maxsize=32)
def _search_program(mesh: Mesh, metric: str, recheck: int, group: int):
  fn = functools.partial(_local_search, metric=metric, recheck=recheck,
                         group=group)
  mapped = shard_map(fn, mesh=mesh, in_specs=(P(), P(DATA_AXES), P(DATA_AXES)),
                      out_specs=(P(), P()), **{SHARD_MAP_CHECK_KW: False})
  return jax.jit(mapped)


def _search(queries: np.ndarray, refs: np.ndarray, *, metric: str,
            chunk_size: int, mesh: Mesh | None, recheck: int = 8,
            group: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Pads, chunks and shards ``refs``; returns (indices [Q], distances [Q])."""
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  if queries.ndim != 2 or refs.ndim != 2 or queries.shape[1] != refs.shape[1]:
    raise ValueError(f"queries [Q, D] and refs [N, D] must agree, got "
                     f"{queries.shape} and {refs.shape}")
  if refs.shape[0] < 1:
    raise ValueError("no references")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  mesh = _default_mesh() if mesh is None else mesh
  num = refs.shape[0]
  per_dev = -(-num // mesh.size)
  nc = -(-per_dev // chunk_size)
  c = -(-per_dev // nc)
  padded = mesh.size * nc * c
  refs = np.concatenate(
      [refs, np.zeros((padded - num, refs.shape[1]), refs.dtype)])
  index = np.where(np.arange(padded) < num, np.arange(padded), -1)
  program = _search_program(mesh, metric, recheck, group)
  dist, idx = program(
      _place(queries, mesh, P()),
      _place(refs.reshape(mesh.size * nc, c, -1), mesh, P(DATA_AXES)),
      _place(index.astype(np.int32).reshape(mesh.size * nc, c), mesh,
             P(DATA_AXES)))
  dist = np.asarray(dist.addressable_data(0))
  idx = np.asarray(idx.addressable_data(0))
  return idx, dist


def nearest_neighbours(queries: np.ndarray | jax.Array,
                       refs: np.ndarray | jax.Array, metric: str = "l2",
                       chunk_size: int = 1024, mesh: Mesh | None = None,
                       recheck: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Exact nearest reference of every query.

  Args:
    queries: [Q, D] float.
    refs: [N, D] float (the training set, flattened).
    metric: 'l2' (Euclidean), 'l1', or 'hamming' (inputs are +-1 vectors).
    chunk_size: references per device processed at once. Peak temporaries are
      about ``Q * chunk_size`` floats plus ``chunk_size * D`` for the chunk
      (L1: ``chunk_size * D`` per query, queries in sequence).
    mesh: ('data', 'fsdp') mesh; references are split over all its devices.
      None: one device.
    recheck: L2 candidates per chunk re-scored exactly.

  Returns:
    (indices [Q] int32, distances [Q] float32): the Euclidean distance for
    'l2', the sum of absolute differences for 'l1', the count of differing
    coordinates for 'hamming'. Ties go to the smallest index.
  """
  if metric not in ("l2", "l1", "hamming"):
    raise ValueError(f"metric must be 'l2', 'l1' or 'hamming', got {metric!r}")
  q = np.asarray(queries, np.float32)
  r = np.asarray(refs, np.float32)
  if metric == "l2":  # centring keeps the matmul formulation accurate
    centre = r.mean(axis=0, dtype=np.float64).astype(np.float32)
    q, r = q - centre, r - centre
  idx, dist = _search(q, r, metric=metric, chunk_size=chunk_size, mesh=mesh,
                      recheck=recheck)
  if metric == "l2":
    dist = np.sqrt(dist)
  return idx, dist.astype(np.float32)


def nearest_latents(sample_tokens: np.ndarray | jax.Array,
                    bank_tokens: np.ndarray | jax.Array, group: int,
                    chunk_size: int = 4096, mesh: Mesh | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Nearest training latent of every sample by exact Hamming distance.

  Args:
    sample_tokens: [S, ...] tokens of g bits (e.g. [S, H, W, Tp]).
    bank_tokens: [N, ...] tokens of the same shape per item.
    group: bits per token g.
    chunk_size: bank entries per device processed at once.
    mesh: optional mesh to split the bank over.

  Returns:
    (indices [S] int32, Hamming distances in bits [S] int32).
  """
  s = np.asarray(sample_tokens)
  b = np.asarray(bank_tokens)
  if s.shape[1:] != b.shape[1:]:
    raise ValueError(f"sample tokens {s.shape} and bank tokens {b.shape} "
                     f"differ per item")
  s = s.reshape(s.shape[0], -1).astype(np.int32)
  b = b.reshape(b.shape[0], -1).astype(np.int32)
  if s.shape[1] * group >= 2**24:
    raise ValueError("too many bits per latent for exact float32 counts")
  idx, dist = _search(s, b, metric="hamming_tokens", chunk_size=chunk_size,
                      mesh=mesh, group=group)
  return idx, np.rint(dist).astype(np.int32)


# ---------------------------------------------------------------------------
# PSNR and copy rates.
# ---------------------------------------------------------------------------


def copy_rate(psnr_values: np.ndarray, threshold: float = 25.0) -> float:
  """Share of samples whose nearest training image has PSNR >= threshold."""
  values = np.asarray(psnr_values)
  return float(np.mean(values >= threshold)) if values.size else 0.0


def non_copies(psnr_values: np.ndarray, threshold: float = 25.0
               ) -> np.ndarray:
  """The authors' protocol: [S] True for the samples to keep, those whose
  nearest training image lies below ``threshold`` dB (not copies). Their
  quality is then scored without the copies, with the count reported."""
  return np.asarray(psnr_values) < threshold


def latent_copy_rate(hamming: np.ndarray, total_bits: int,
                     threshold: float = 0.01) -> float:
  """Share of samples within ``threshold * total_bits`` bits of a latent."""
  values = np.asarray(hamming)
  if not values.size:
    return 0.0
  return float(np.mean(values <= threshold * total_bits))


def psnr_quantiles(psnr_values: np.ndarray,
                   quantiles=PSNR_QUANTILES) -> dict[str, float]:
  """{'q0.50': median, ...} of PSNR values (may include +inf).

  Uses the 'lower' method (each quantile is an observed value), so identical
  copies (+inf) never turn an interpolation into nan.
  """
  values = np.asarray(psnr_values, np.float64)
  return {f"q{q:.2f}": float(np.quantile(values, q, method="lower"))
          for q in quantiles}


def _flat(x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x.reshape(x.shape[0], -1)


def memorization_report(samples: np.ndarray, train_images: np.ndarray,
                        train_recons: np.ndarray | None = None,
                        sample_tokens: np.ndarray | None = None,
                        bank_tokens: np.ndarray | None = None,
                        group: int | None = None, threshold_db: float = 25.0,
                        latent_threshold: float = 0.01,
                        chunk_size: int = 1024,
                        mesh: Mesh | None = None) -> dict:
  """Copy rates of generated samples against the training set.

  Args:
    samples: [S, H, W, C] generated images in [-1, 1].
    train_images: [N, H, W, C] training images in [-1, 1].
    train_recons: optional [N, H, W, C] BL-AE reconstructions of the training
      images (a sample can at best copy a reconstruction).
    sample_tokens, bank_tokens, group: optional latent tokens of the samples
      and the training set, for the latent copy rate.
    threshold_db: PSNR at or above which a sample is a copy.
    latent_threshold: share of bits at or below which a latent is a copy.
    chunk_size, mesh: as in :func:`nearest_neighbours`.

  Returns:
    dict with 'num_samples', 'copy_rate' (pixels), 'is_copy' [S] bool,
    'nearest' [S], 'psnr' [S], 'psnr_quantiles'; with reconstructions
    'copy_rate_recon', 'nearest_recon', 'psnr_recon', 'psnr_recon_quantiles';
    with tokens 'copy_rate_latent', 'nearest_latent', 'hamming' [S] (bits),
    'hamming_fraction' [S].
  """
  samples = np.asarray(samples, np.float32)
  train_images = np.asarray(train_images, np.float32)
  nearest, _ = nearest_neighbours(_flat(samples), _flat(train_images),
                                  "l2", chunk_size=chunk_size, mesh=mesh)
  values = psnr(samples, train_images[nearest])
  report = {
      "num_samples": int(samples.shape[0]),
      "threshold_db": float(threshold_db),
      "copy_rate": copy_rate(values, threshold_db),
      "is_copy": values >= threshold_db,
      "nearest": nearest,
      "psnr": values,
      "psnr_quantiles": psnr_quantiles(values),
  }
  if train_recons is not None:
    recons = np.asarray(train_recons, np.float32)
    near_r, _ = nearest_neighbours(_flat(samples), _flat(recons), "l2",
                                   chunk_size=chunk_size, mesh=mesh)
    values_r = psnr(samples, recons[near_r])
    report.update(copy_rate_recon=copy_rate(values_r, threshold_db),
                  nearest_recon=near_r, psnr_recon=values_r,
                  psnr_recon_quantiles=psnr_quantiles(values_r))
  if sample_tokens is not None or bank_tokens is not None:
    if sample_tokens is None or bank_tokens is None or group is None:
      raise ValueError("the latent copy rate needs sample_tokens, bank_tokens "
                       "and group")
    near_l, ham = nearest_latents(sample_tokens, bank_tokens, group,
                                  mesh=mesh)
    total_bits = int(np.prod(np.asarray(sample_tokens).shape[1:])) * group
    report.update(
        copy_rate_latent=latent_copy_rate(ham, total_bits, latent_threshold),
        latent_threshold=float(latent_threshold), nearest_latent=near_l,
        hamming=ham, hamming_fraction=ham / total_bits)
  return report


def evaluate_samples(images: np.ndarray, tokens: np.ndarray, *,
                     train_images: np.ndarray, train_recons: np.ndarray,
                     bank_tokens: np.ndarray, group: int,
                     distance, threshold_db: float,
                     latent_threshold: float, chunk_size: int,
                     mesh: Mesh | None) -> tuple[dict, dict]:
  """The copy-rate summary of one sample set, with its Frechet distance.

  Runs :func:`memorization_report` (pixels, reconstructions, latents) and
  summarises it: the three copy rates, the share of exact latent copies, the
  PSNR and Hamming-fraction quantiles, and ``distance`` of all samples, of
  the authors' non-copies (:func:`non_copies`: no training image within
  ``threshold_db``; the ``_non_pixel_copies`` keys) and of the stricter
  non-copies (neither a pixel nor a reconstruction copy; ``_non_copies``).
  With a ``precision_recall(images)`` method on ``distance``, the precision
  and recall of all samples too.

  Args:
    images: [S, H, W, C] decoded samples in [-1, 1].
    tokens: [S, h, w, Tp] their tokens (``group`` bits each).
    train_images, train_recons: [N, H, W, C] training images and their BL-AE
      reconstructions (index n = bank entry n).
    bank_tokens: [N, h, w, Tp].
    group: bits per token.
    distance: any object with a ``name`` (str, the summary key) and a
      ``distance(images) -> float | None`` method, e.g.
      :class:`mesp_jax.experiments.gamma_sweep.DistanceSpace`.
    threshold_db, latent_threshold, chunk_size, mesh: as in
      :func:`memorization_report`.

  Returns:
    (summary dict for the JSON, the full memorisation report).
  """
  report = memorization_report(
      images, train_images, train_recons=train_recons, sample_tokens=tokens,
      bank_tokens=bank_tokens, group=group, threshold_db=threshold_db,
      latent_threshold=latent_threshold, chunk_size=chunk_size, mesh=mesh)
  authors = non_copies(report["psnr"], threshold_db)
  keep = authors & non_copies(report["psnr_recon"], threshold_db)
  exact = np.mean(report["hamming"] == 0)
  summary = {
      "num_samples": int(images.shape[0]),
      "copy_rate": report["copy_rate"],
      "copy_rate_recon": report["copy_rate_recon"],
      "copy_rate_latent": report["copy_rate_latent"],
      "exact_latent_copy_rate": float(exact),
      "psnr_quantiles": report["psnr_quantiles"],
      "psnr_recon_quantiles": report["psnr_recon_quantiles"],
      "hamming_fraction_quantiles": psnr_quantiles(
          report["hamming_fraction"]),
      distance.name: distance.distance(images),
      f"{distance.name}_non_pixel_copies": distance.distance(images[authors]),
      "num_non_pixel_copies": int(authors.sum()),
      f"{distance.name}_non_copies": distance.distance(images[keep]),
      "num_non_copies": int(keep.sum()),
  }
  if hasattr(distance, "precision_recall"):
    summary["precision"], summary["recall"] = distance.precision_recall(images)
  return summary, report


def _to_uint8_rgb(x: np.ndarray) -> np.ndarray:
  """[B, H, W, C] in [-1, 1] -> [B, H, W, 3] uint8."""
  x = np.asarray(x, np.float32)
  if x.ndim == 3:
    x = x[..., None]
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f"images need 1 or 3 channels, got {x.shape[-1]}")
  return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def triplet_grid(samples: np.ndarray, nearest: np.ndarray,
                 max_rows: int = 16, pad: int = 2) -> np.ndarray:
  """A PNG-ready [rows * (H + pad) + pad, 3 * (W + pad) + pad, 3] uint8 grid.

  Each row shows a sample, its nearest training image and their absolute
  difference (|a - b| in [0, 2] shown on 0..255), on a white background.

  Args:
    samples: [S, H, W, C] images in [-1, 1] (C = 1 or 3).
    nearest: [S, H, W, C] the matching nearest training images.
    max_rows: show at most this many samples.
    pad: pixels between tiles.
  """
  samples = np.asarray(samples, np.float32)[:max_rows]
  nearest = np.asarray(nearest, np.float32)[:max_rows]
  if samples.shape != nearest.shape:
    raise ValueError(f"shapes differ: {samples.shape} vs {nearest.shape}")
  diff = np.abs(samples - nearest) - 1.0  # |a - b| in [0, 2] -> [-1, 1]
  tiles = [_to_uint8_rgb(x) for x in (samples, nearest, diff)]
  rows, height, width = tiles[0].shape[:3]
  grid = np.full((rows * (height + pad) + pad, 3 * (width + pad) + pad, 3),
                 255, np.uint8)
  for r in range(rows):
    for col, tile in enumerate(tiles):
      y = pad + r * (height + pad)
      x = pad + col * (width + pad)
      grid[y:y + height, x:x + width] = tile[r]
  return grid
