"""The library of the gamma sweep: the local dependence test.

The paper's claim (docs/method.md, section 'LCH and the copy criterion'):
generation comes from local dependence; as the observation range gamma of the
gamma-ARVM grows the model moves toward memorisation, and with global context
on BL-AE latents it copies training images. The stage that runs the sweep is
:mod:`mesp_jax.stages.gamma_sweep`; this module holds its pieces:

* :func:`parse_workdir_map`: the 'gamma=workdir' pairs of
  ``config.sweep.arvm_workdirs``;
* :func:`read_images` and :func:`bank_recons`: the training images of a
  split and the BL-AE reconstructions of the bank (decoded bank tokens,
  cached in the workdir). A sampler can at best copy a reconstruction, so the
  copy rate against them does not depend on how well the BL-AE reconstructs;
* :class:`DistanceSpace` and :func:`make_distance`: a Frechet distance of
  sample sets against ``sweep.reference_split``, in the features of the
  project's classifier when a feature net workdir is given (named
  ``fd_{dataset}_classifier``), else on raw pixels (``fd_pixels``); never
  called FID. The low-rank computation is
  :func:`mesp_jax.eval.fid.frechet_distance_to_samples`;
* :func:`kernel_bits_per_token`: the kernel ARVM's test bits per token,
  the held-out likelihood that sits beside each neural ARVM's;
* :func:`write_sample_set`: ``samples.npz``, ``samples.png``,
  ``triplets.png`` (sample | nearest training image | difference) and
  ``triplets_recon.png`` (sample | nearest reconstruction | difference) of
  one sample set.

The copy rates and quantiles of a sample set are
:func:`mesp_jax.eval.memorization.evaluate_samples`; the sweep's figure is
:func:`mesp_jax.experiments.plots.plot_sweep`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping

import ml_collections
import numpy as np

from mesp_jax.base import io
from mesp_jax.base.gamma import gamma_label, parse_gamma
from mesp_jax.base.image import to_float_images
from mesp_jax.data import source_from_config
from mesp_jax.data.sample_set import SampleSet
from mesp_jax.data.tokens import Bank
from mesp_jax.eval import fid as fid_lib
from mesp_jax.eval import memorization as mem
from mesp_jax.sample import kernel as kernel_lib

PIXEL_DISTANCE = "fd_pixels"
PR_K = 3  # neighbourhood size of precision and recall (Kynkaanniemi et al.)
ORDERS = ("raster", "random")


# ---------------------------------------------------------------------------
# Held-out likelihood of the kernel ARVM.
# ---------------------------------------------------------------------------


def kernel_bits_per_token(kbank: kernel_lib.KernelBank, tokens: np.ndarray, *,
                          sigma_s: float, gamma, order: str, rng,
                          batch_size: int) -> float:
  """Mean ``-log2 p(z_t | context)`` of the kernel ARVM on held-out latents.

  Every token of ``tokens`` is scored under the histogram the kernel ARVM
  (bank ``kbank``) forms from that latent's own earlier tokens in its
  window (teacher forcing, :func:`mesp_jax.sample.kernel.kernel_histograms`),
  the quantity a neural ARVM reports as test bits per token. A model that
  looks up its bank pays for held-out latents: the smaller sigma_s and the
  larger gamma, the more confidently it predicts the nearest bank entry's
  token, and the more bits a token that differs costs (up to
  ``-log2(p_flip^g)``; above g bits per token is worse than uniform).

  Args:
    kbank: the prepared bank (:func:`mesp_jax.sample.kernel.prepare_bank`).
    tokens: [S, H, W, Tp] held-out latents, grouped like the bank.
    sigma_s, gamma, order: the kernel ARVM's settings; ``rng`` (a key) fixes
      the positions of order='random'.
    batch_size: latents per compiled call; the last batch is padded with
      copies of its first latent (one program for every batch).

  Returns:
    bits per token, a float.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 4 or tokens.shape[1:] != tuple(kbank.grid):
    raise ValueError(f"held-out tokens {tokens.shape} do not match the "
                     f"bank's grid {kbank.grid}")
  if not len(tokens):
    raise ValueError("no held-out tokens to score")
  total = 0.0
  for start in range(0, len(tokens), batch_size):
    part = tokens[start:start + batch_size]
    num = len(part)
    if num < batch_size and start:  # a short last batch of several
      part = np.concatenate(
          [part, np.repeat(part[:1], batch_size - num, axis=0)])
    hists = np.asarray(kernel_lib.kernel_histograms(
        kbank, part, group=kbank.group, sigma_s=sigma_s, gamma=gamma,
        order=order, rng=rng))[:num]  # [n, H, W, Tp, 2^g]
    prob = np.take_along_axis(hists, part[:num, ..., None], axis=-1)
    total += float(-np.log2(np.maximum(
        prob.astype(np.float64), np.finfo(np.float32).tiny)).sum())
  return total / tokens.size


# ---------------------------------------------------------------------------
# Small parsers.
# ---------------------------------------------------------------------------


def parse_workdir_map(spec: str | Mapping | None) -> dict[str, str]:
  """'3=/runs/a,global=/runs/b' or {3: '/runs/a'} -> {'3': ..., 'global': ...}.

  Keys are gamma labels (see :func:`gamma_label`).
  """
  if not spec:
    return {}
  if isinstance(spec, str):
    pairs = []
    for item in spec.split(","):
      if not item.strip():
        continue
      key, sep, path = item.partition("=")
      if not sep or not path.strip():
        raise ValueError(f"config.sweep.arvm_workdirs item {item!r} is not "
                         f"'gamma=workdir'")
      pairs.append((key.strip(), path.strip()))
  else:
    pairs = list(dict(spec).items())
  return {gamma_label(parse_gamma(k)): str(v) for k, v in pairs}


# ---------------------------------------------------------------------------
# Loading: bank tokens, BL-AE, images.
# ---------------------------------------------------------------------------


def read_images(data_cfg: ml_collections.ConfigDict, split: str,
                limit: int = 0) -> np.ndarray:
  """The first ``limit`` (0 = all) images of a split, [N, H, W, C] in [-1, 1]."""
  source = source_from_config(data_cfg, split)
  n = len(source) if not limit else min(limit, len(source))
  return to_float_images(source.read(np.arange(n))["image"])


def bank_recons(bank: Bank, decode: Callable, blae_step: int,
                cache_dir: str) -> tuple[np.ndarray, bool]:
  """BL-AE reconstructions of the bank (decoded tokens), cached on disk.

  The cache ``recons_bank.npz`` is reused only if it was made from the same
  BL-AE workdir and checkpoint step and the same tokens (sha1).

  Returns:
    ([N, H, W, C] float32 in [-1, 1], whether the cache was used).
  """
  digest = hashlib.sha1(np.ascontiguousarray(bank.tokens).tobytes())
  key = f"{os.path.abspath(bank.blae_workdir)}@{blae_step}:{digest.hexdigest()}"
  path = os.path.join(cache_dir, "recons_bank.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      if str(f["key"]) == key:
        return f["recons"], True
  recons = decode(bank.tokens)
  io.save_npz(path, recons=recons, key=np.asarray(key))
  return recons, False


# ---------------------------------------------------------------------------
# Distances.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistanceSpace:
  """A feature map and the reference statistics of one split.

  Attributes:
    name: the metric name ('fd_pixels' or 'fd_{dataset}_classifier').
    features: images [B, H, W, C] -> [B, D] features.
    mu, sigma: [D], [D, D] statistics of the reference split.
    split, num_reference: what the statistics describe.
    note: how to read the number.
    reference_features: [R, D] features of the first reference images, the
      real manifold of :meth:`precision_recall` (None: not computed).
  """
  name: str
  features: Callable[[np.ndarray], np.ndarray]
  mu: np.ndarray
  sigma: np.ndarray
  split: str
  num_reference: int
  note: str
  reference_features: np.ndarray | None = None

  def distance(self, images: np.ndarray) -> float | None:
    """Frechet distance of ``images`` [S, ...] (None for fewer than 2)."""
    if images.shape[0] < 2:
      return None
    return fid_lib.frechet_distance_to_samples(self.mu, self.sigma,
                                               self.features(images))

  def precision_recall(self, images: np.ndarray
                       ) -> tuple[float | None, float | None]:
    """Improved precision and recall (k = :data:`PR_K`) of ``images``
    against the reference features in this space; (None, None) when either
    set has ``PR_K`` points or fewer."""
    ref = self.reference_features
    if ref is None or min(len(ref), images.shape[0]) <= PR_K:
      return None, None
    return fid_lib.precision_recall(ref, self.features(images), k=PR_K)


def pixel_features(images: np.ndarray) -> np.ndarray:
  """[B, H, W, C] -> [B, H * W * C] float64 raw pixels in [-1, 1]."""
  images = np.asarray(images, np.float64)
  return images.reshape(images.shape[0], -1)


def make_distance(reference: np.ndarray, split: str, feature_net_workdir: str,
                  dataset: str, cache_dir: str,
                  pr_examples: int = 2000) -> DistanceSpace:
  """Pixel space, or the feature net of ``feature_net_workdir`` if given.

  Classifier statistics of the reference split are cached in ``cache_dir``
  under a name that includes the feature net's checkpoint step. The first
  ``pr_examples`` reference images (0: none) are the real manifold of
  precision and recall.
  """
  pr_images = reference[:pr_examples]
  if not feature_net_workdir:
    mu, sigma = fid_lib.feature_stats(pixel_features(reference))
    return DistanceSpace(
        name=PIXEL_DISTANCE, features=pixel_features, mu=mu, sigma=sigma,
        split=split, num_reference=int(reference.shape[0]),
        note=(f"{PIXEL_DISTANCE}: Frechet distance on raw pixels in [-1, 1] "
              f"against the {split} split; not FID (no feature net given)."),
        reference_features=pixel_features(pr_images) if pr_examples else None)
  from mesp_jax.models.feature_net import classifier_features, feature_net_name
  from mesp_jax.train.feature_net import load_feature_net
  model, params, fn_config, step = load_feature_net(feature_net_workdir)
  name = feature_net_name(fn_config.data.name)
  if fn_config.data.name != dataset:
    raise ValueError(f"the feature net in {feature_net_workdir} was trained "
                     f"on {fn_config.data.name!r}, the bank is {dataset!r}")

  def features(images):
    return classifier_features(model, params, images)

  stats = fid_lib.ReferenceStats.load_or_compute(
      cache_dir, dataset, f"{split}-{reference.shape[0]}",
      f"{name}-step{step}", lambda: features(reference), max_features=0)
  return DistanceSpace(
      name=name, features=features, mu=stats.mu, sigma=stats.sigma,
      split=split, num_reference=int(reference.shape[0]),
      reference_features=features(pr_images) if pr_examples else None,
      note=(f"{name}: Frechet distance in the features of the project's own "
            f"{dataset} classifier ({os.path.abspath(feature_net_workdir)}, "
            f"step {step}) against the {split} split; not FID."))


# ---------------------------------------------------------------------------
# Writing one sample set.
# ---------------------------------------------------------------------------


def write_sample_set(out_dir: str, sample_set: SampleSet, report: dict,
                     train_images: np.ndarray, train_recons: np.ndarray,
                     grid_samples: int, triplet_rows: int) -> None:
  """samples.npz (with the nearest neighbours), samples.png and the two
  triplet grids of one sample set."""
  sample_set.extra.update(
      nearest=report["nearest"], psnr=report["psnr"],
      nearest_recon=report["nearest_recon"], psnr_recon=report["psnr_recon"],
      nearest_latent=report["nearest_latent"], hamming=report["hamming"])
  sample_set.save(os.path.join(out_dir, "samples.npz"))
  images = sample_set.images
  io.save_grid(os.path.join(out_dir, "samples.png"), images[:grid_samples],
               ncol=8)
  io.save_png(os.path.join(out_dir, "triplets.png"), mem.triplet_grid(
      images, train_images[report["nearest"]], max_rows=triplet_rows))
  io.save_png(os.path.join(out_dir, "triplets_recon.png"), mem.triplet_grid(
      images, train_recons[report["nearest_recon"]], max_rows=triplet_rows))
