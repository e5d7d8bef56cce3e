"""Stages ``kernel_sample`` and ``gamma_sweep``: the local dependence test.

The paper's claim (DESIGN.md, LCH/LDH): generation comes from local
dependence; as the observation range gamma of the gamma-ARVM grows the model
moves toward memorisation, and with global context on BL-AE latents it copies
training images.

``kernel_sample`` draws ``config.kernel.num_samples`` token grids from the
kernel (non-parametric) gamma-ARVM (:mod:`mesp_jax.sample.kernel`), whose
model is the bank of training latents (``tokens_{train_split}.npz`` in
``config.tokens.dir``), decodes them with the BL-AE that made the tokens and
writes ``samples.png`` and ``samples.npz`` (``tokens`` [S, h, w, Tp] at
``kernel.group`` bits per token, ``images`` [S, H, W, C] in [-1, 1],
``labels`` = -1), like the neural sampler (stage ``sample``).

``gamma_sweep`` does that for every gamma in ``config.sweep.gammas`` (and, for
gammas given a neural ARVM workdir in ``config.sweep.arvm_workdirs``, with
that ARVM too) and measures memorisation and quality of each sample set:

* ``copy_rate``: share of samples whose nearest training image (pixel L2) is
  at PSNR >= ``threshold_db`` on 0..255 (the authors' criterion);
* ``copy_rate_recon``: the same against the BL-AE reconstructions of the
  training images (decoded bank tokens, cached in the workdir). A sampler can
  at best copy a reconstruction, so this is the copy rate that does not
  depend on how well the BL-AE reconstructs;
* ``copy_rate_latent``: share of samples within ``latent_threshold`` of the
  bits (Hamming) of a bank latent;
* PSNR quantiles of both nearest-neighbour searches and of the latent
  Hamming fraction;
* a Frechet distance of the samples against ``sweep.reference_split``: in
  the features of the project's classifier when ``sweep.feature_net_workdir``
  is given (named ``fd_{dataset}_classifier``), else on raw pixels
  (``fd_pixels``); never called FID. Reference lines at the same sample size:
  real training images and BL-AE reconstructions against the same split.

Outputs in the workdir: ``gamma_sweep.json``, ``gamma_sweep.png`` (copy
rates and distance against gamma, 'global' as the last tick) and per model
and gamma ``{model}_gamma_{gamma}/`` with ``samples.png``, ``samples.npz``,
``triplets.png`` (sample | nearest training image | difference) and
``triplets_recon.png`` (sample | nearest reconstruction | difference).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io as _io
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mesp_jax import io
from mesp_jax.config_utils import check_choice, check_positive
from mesp_jax.data import source_from_config
from mesp_jax.data.loader import to_float_images
from mesp_jax.data.tokens import load_tokens, repack
from mesp_jax.eval import fid as fid_lib
from mesp_jax.eval import memorization as mem
from mesp_jax.models.blae import decode_tokens
from mesp_jax.sample import kernel as kernel_lib
from mesp_jax.train import loop, sharding

GLOBAL = "global"
PIXEL_DISTANCE = "fd_pixels"
ORDERS = ("raster", "random")
# Copy rates drawn in the plot: (result key, legend label).
PLOT_RATES = (("copy_rate_latent", "latent (<= 1 % bits)"),
              ("copy_rate_recon", "vs BL-AE reconstructions"),
              ("copy_rate", "vs training images"))

Gamma = int | None  # None = global


# ---------------------------------------------------------------------------
# Small parsers.
# ---------------------------------------------------------------------------


def gamma_label(gamma: Gamma) -> str:
  """None -> 'global', 3 -> '3'."""
  return GLOBAL if gamma is None else str(gamma)


def parse_gammas(spec: str | Sequence) -> list[Gamma]:
  """'0,1,2,global' or a sequence -> [0, 1, 2, None] (order kept).

  Raises:
    ValueError: empty list, a bad value or a duplicate.
  """
  items = ([s.strip() for s in spec.split(",") if s.strip()]
           if isinstance(spec, str) else list(spec))
  if not items:
    raise ValueError("config.sweep.gammas is empty; give e.g. "
                     "'0,1,2,3,5,global'")
  gammas = [kernel_lib.parse_gamma(g) for g in items]
  labels = [gamma_label(g) for g in gammas]
  if len(set(labels)) != len(labels):
    raise ValueError(f"config.sweep.gammas has duplicates: {labels}")
  return gammas


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
  return {gamma_label(kernel_lib.parse_gamma(k)): str(v) for k, v in pairs}


# ---------------------------------------------------------------------------
# Loading: bank tokens, BL-AE, images.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bank:
  """Training latents at the kernel's grouping.

  Attributes:
    tokens: [N, h, w, Tp] int32 tokens of ``group`` bits.
    bits: bits per latent position (C).
    group: bits per token g (divides C).
    blae_workdir: the BL-AE that encoded them.
    path: the npz they came from.
  """
  tokens: np.ndarray
  bits: int
  group: int
  blae_workdir: str
  path: str


def load_bank(config: ml_collections.ConfigDict, limit: int = 0) -> Bank:
  """Reads ``tokens_{train_split}.npz`` and regroups it to ``kernel.group``.

  Args:
    config: with ``tokens.{dir, train_split, blae_workdir}`` and
      ``kernel.group``.
    limit: keep only the first ``limit`` entries (0 = all).
  """
  tcfg = config.tokens
  if not tcfg.dir:
    raise ValueError("config.tokens.dir is empty: point it at the folder of a "
                     "'blae_encode' run (it holds tokens_train.npz)")
  path = os.path.join(tcfg.dir, f"tokens_{tcfg.get('train_split', 'train')}"
                      f".npz")
  data = load_tokens(path)
  group = int(config.kernel.group)
  if data["bits"] % group:
    raise ValueError(f"config.kernel.group={group} must divide the BL-AE's "
                     f"{data['bits']} bits per position")
  raw = data["tokens"][:limit] if limit else data["tokens"]
  tokens = repack(raw, data["bits"], data["bits"], group)  # [N, h, w, Tp]
  blae_dir = tcfg.get("blae_workdir") or data["blae_workdir"]
  if not blae_dir:
    raise ValueError(f"{path} names no BL-AE workdir; set "
                     f"config.tokens.blae_workdir")
  return Bank(tokens=tokens.astype(np.int32), bits=data["bits"], group=group,
              blae_workdir=blae_dir, path=path)


def host_array(x: jax.Array) -> np.ndarray:
  """A replicated or sharded global array as one host numpy array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def make_decoder(model, params, group: int, mesh: Mesh,
                 batch_size: int = 500) -> Callable[[np.ndarray], np.ndarray]:
  """Returns ``decode(tokens [B, h, w, Tp]) -> images [B, H, W, C]`` (numpy).

  Batches of at most ``batch_size`` (rounded to the data-parallel size) are
  split over the mesh; every process passes the same full token array and
  gets all images back.
  """
  dp = sharding.data_parallel_size(mesh)
  spec = sharding.batch_sharding(mesh)
  fn = jax.jit(lambda p, t: decode_tokens(model, p, t, group))

  def place(chunk: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(chunk.shape, spec,
                                        lambda i: chunk[i])

  def decode(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens, np.int32)
    n = tokens.shape[0]
    batch = min(max(dp, batch_size // dp * dp), -(-n // dp) * dp)
    out = []
    for start in range(0, n, batch):
      chunk = tokens[start:start + batch]
      real = chunk.shape[0]
      if real < batch:  # one compiled shape per batch size
        chunk = np.concatenate(
            [chunk, np.zeros((batch - real,) + chunk.shape[1:], np.int32)])
      out.append(host_array(fn(params, place(chunk)))[:real])
    return np.concatenate(out)

  return decode


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
  """
  name: str
  features: Callable[[np.ndarray], np.ndarray]
  mu: np.ndarray
  sigma: np.ndarray
  split: str
  num_reference: int
  note: str

  def distance(self, images: np.ndarray) -> float | None:
    """Frechet distance of ``images`` [S, ...] (None for fewer than 2)."""
    if images.shape[0] < 2:
      return None
    return frechet_distance_to_samples(self.mu, self.sigma,
                                       self.features(images))


def frechet_distance_to_samples(mu: np.ndarray, sigma: np.ndarray,
                                features: np.ndarray) -> float:
  """Frechet distance between N(mu, sigma) and the Gaussian fit of features.

  Equal to ``fid.frechet_distance(mu, sigma, *fid.feature_stats(features))``
  but, for S - 1 < D samples, computed through the rank of the sample
  covariance: with ``s2 = A A^T``, ``A = (f - mean)^T / sqrt(S - 1)`` [D, S],
  the non-zero eigenvalues of ``sigma s2`` (whose square roots sum to
  ``tr((sigma s2)^{1/2})``) are those of the PSD [S, S] matrix
  ``A^T sigma A``. That costs O(D^2 S + S^3) instead of two D x D eigen
  decompositions (seconds each for D = 1024 pixels on a busy CPU).

  Args:
    mu: [D] reference mean.
    sigma: [D, D] reference covariance (symmetric PSD).
    features: [S, D], S >= 2.
  """
  f = np.asarray(features, np.float64)
  num, dim = f.shape
  if num - 1 >= dim:
    return fid_lib.frechet_distance(mu, sigma, *fid_lib.feature_stats(f))
  mean = f.mean(axis=0)  # [D]
  a = (f - mean).T / np.sqrt(num - 1)  # [D, S]
  sig = 0.5 * (sigma + sigma.T)
  m = a.T @ sig @ a  # [S, S]
  eig = np.linalg.eigvalsh(0.5 * (m + m.T))
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = np.asarray(mu, np.float64) - mean
  return float(diff @ diff + np.trace(sig) + np.sum(a * a) - 2.0 * tr_covmean)


def pixel_features(images: np.ndarray) -> np.ndarray:
  """[B, H, W, C] -> [B, H * W * C] float64 raw pixels in [-1, 1]."""
  images = np.asarray(images, np.float64)
  return images.reshape(images.shape[0], -1)


def make_distance(reference: np.ndarray, split: str, feature_net_workdir: str,
                  dataset: str, cache_dir: str) -> DistanceSpace:
  """Pixel space, or the feature net of ``feature_net_workdir`` if given.

  Classifier statistics of the reference split are cached in ``cache_dir``
  under a name that includes the feature net's checkpoint step.
  """
  if not feature_net_workdir:
    mu, sigma = fid_lib.feature_stats(pixel_features(reference))
    return DistanceSpace(
        name=PIXEL_DISTANCE, features=pixel_features, mu=mu, sigma=sigma,
        split=split, num_reference=int(reference.shape[0]),
        note=(f"{PIXEL_DISTANCE}: Frechet distance on raw pixels in [-1, 1] "
              f"against the {split} split; not FID (no feature net given)."))
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
      note=(f"{name}: Frechet distance in the features of the project's own "
            f"{dataset} classifier ({os.path.abspath(feature_net_workdir)}, "
            f"step {step}) against the {split} split; not FID."))


# ---------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------


def kernel_tokens(bank: kernel_lib.KernelBank, *, gamma: Gamma,
                  sigma_s: float, num_samples: int, batch_size: int,
                  rng: jax.Array, order: str = "raster",
                  temperature: float = 1.0) -> np.ndarray:
  """``num_samples`` token grids [S, h, w, Tp] from the kernel gamma-ARVM.

  Batch ``b`` uses the key ``fold_in(rng, b)``, so a sample set depends only
  on (rng, batch_size), not on the gamma sweep around it.
  """
  out = []
  for b, start in enumerate(range(0, num_samples, batch_size)):
    n = min(batch_size, num_samples - start)
    toks = kernel_lib.kernel_sample(
        bank, group=bank.group, sigma_s=sigma_s, gamma=gamma,
        num_samples=n, rng=jax.random.fold_in(rng, b), order=order,
        temperature=temperature)
    out.append(host_array(toks))
  return np.concatenate(out).astype(np.int32)


def neural_tokens(arvm_workdir: str, gamma: Gamma, bank: Bank,
                  ncfg: ml_collections.ConfigDict, num_samples: int,
                  rng: jax.Array, mesh: Mesh) -> np.ndarray:
  """``num_samples`` token grids from a trained neural ARVM, at bank.group.

  Raises:
    ValueError: the ARVM was trained for another gamma or token grid.
  """
  from mesp_jax.sample import decode as decode_lib
  from mesp_jax.train.arvm import load_arvm
  model, params, _, _, _ = load_arvm(arvm_workdir, mesh)
  if kernel_lib.parse_gamma(model.gamma) != gamma:
    raise ValueError(f"config.sweep.arvm_workdirs: {arvm_workdir} holds an "
                     f"ARVM for gamma={model.gamma}, listed under gamma="
                     f"{gamma_label(gamma)}")
  dp = sharding.data_parallel_size(mesh)
  batch = max(dp, int(ncfg.batch_size) // dp * dp)
  conditional = model.num_classes > 0
  out = []
  for b, start in enumerate(range(0, num_samples, batch)):
    labels = ((np.arange(start, start + batch) % model.num_classes)
              .astype(np.int32) if conditional else None)
    toks = decode_lib.sample_tokens(
        model, params, jax.random.fold_in(rng, b), batch, labels,
        temperature=float(ncfg.temperature), top_k=int(ncfg.top_k),
        top_p=float(ncfg.top_p), cfg_scale=float(ncfg.cfg_scale),
        cache=ncfg.cache, mesh=mesh)
    out.append(host_array(toks))
  toks = np.concatenate(out)[:num_samples]  # [S, h, w, C / model.group]
  toks = repack(toks, bank.bits, int(model.group), bank.group)
  if toks.shape[1:] != bank.tokens.shape[1:]:
    raise ValueError(f"{arvm_workdir}: token grid {toks.shape[1:]} does not "
                     f"match the bank's {bank.tokens.shape[1:]}")
  return toks


# ---------------------------------------------------------------------------
# Evaluation of one sample set.
# ---------------------------------------------------------------------------


def json_safe(x):
  """Replaces non-finite floats (e.g. the PSNR of an exact copy) by 'inf',
  '-inf' or 'nan' strings, recursively, so the JSON stays standard."""
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, (float, np.floating)) and not np.isfinite(x):
    return str(float(x))
  return x


def _quantiles(values: np.ndarray) -> dict[str, float]:
  return {f"q{q:.2f}": float(np.quantile(values, q, method="lower"))
          for q in mem.PSNR_QUANTILES}


def evaluate_samples(images: np.ndarray, tokens: np.ndarray, *,
                     train_images: np.ndarray, train_recons: np.ndarray,
                     bank_tokens: np.ndarray, group: int,
                     distance: DistanceSpace, threshold_db: float,
                     latent_threshold: float, chunk_size: int,
                     mesh: Mesh | None) -> tuple[dict, dict]:
  """Copy rates, quantiles and the Frechet distance of one sample set.

  Args:
    images: [S, H, W, C] decoded samples in [-1, 1].
    tokens: [S, h, w, Tp] their tokens (``group`` bits each).
    train_images, train_recons: [N, H, W, C] training images and their BL-AE
      reconstructions (index n = bank entry n).
    bank_tokens: [N, h, w, Tp].

  Returns:
    (summary dict for the JSON, the full memorisation report).
  """
  report = mem.memorization_report(
      images, train_images, train_recons=train_recons, sample_tokens=tokens,
      bank_tokens=bank_tokens, group=group, threshold_db=threshold_db,
      latent_threshold=latent_threshold, chunk_size=chunk_size, mesh=mesh)
  is_recon_copy = report["psnr_recon"] >= threshold_db
  keep = ~(report["is_copy"] | is_recon_copy)
  exact = np.mean(report["hamming"] == 0)
  summary = {
      "num_samples": int(images.shape[0]),
      "copy_rate": report["copy_rate"],
      "copy_rate_recon": report["copy_rate_recon"],
      "copy_rate_latent": report["copy_rate_latent"],
      "exact_latent_copy_rate": float(exact),
      "psnr_quantiles": report["psnr_quantiles"],
      "psnr_recon_quantiles": report["psnr_recon_quantiles"],
      "hamming_fraction_quantiles": _quantiles(report["hamming_fraction"]),
      distance.name: distance.distance(images),
      f"{distance.name}_non_copies": distance.distance(images[keep]),
      "num_non_copies": int(keep.sum()),
  }
  return summary, report


def _write_sample_set(out_dir: str, images: np.ndarray, tokens: np.ndarray,
                      report: dict, train_images: np.ndarray,
                      train_recons: np.ndarray, extra: dict,
                      grid_samples: int, triplet_rows: int) -> None:
  """samples.png/.npz and the two triplet grids of one sample set."""
  io.save_npz(os.path.join(out_dir, "samples.npz"), tokens=tokens,
              images=images, labels=np.full(images.shape[0], -1, np.int32),
              nearest=report["nearest"], psnr=report["psnr"],
              nearest_recon=report["nearest_recon"],
              psnr_recon=report["psnr_recon"],
              nearest_latent=report["nearest_latent"],
              hamming=report["hamming"], **extra)
  io.save_grid(os.path.join(out_dir, "samples.png"), images[:grid_samples],
               ncol=8)
  io.save_png(os.path.join(out_dir, "triplets.png"), mem.triplet_grid(
      images, train_images[report["nearest"]], max_rows=triplet_rows))
  io.save_png(os.path.join(out_dir, "triplets_recon.png"), mem.triplet_grid(
      images, train_recons[report["nearest_recon"]], max_rows=triplet_rows))


# ---------------------------------------------------------------------------
# The plot.
# ---------------------------------------------------------------------------


def gamma_positions(labels: Sequence[str]) -> dict[str, float]:
  """x position of each gamma label: its value; 'global' after the largest."""
  finite = sorted(int(x) for x in labels if x != GLOBAL)
  pos = {str(g): float(g) for g in finite}
  if GLOBAL in labels:
    pos[GLOBAL] = float(finite[-1] + 2 if finite else 0)
  return pos


def plot_sweep(results: Sequence[dict], distance_name: str,
               reference: dict, title: str) -> bytes:
  """PNG bytes: copy rates (left) and the distance (right) against gamma."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = list(dict.fromkeys(r["gamma"] for r in results))
  pos = gamma_positions(labels)
  ticks = sorted(pos, key=pos.get)
  fig, (ax_c, ax_d) = plt.subplots(1, 2, figsize=(11, 4.2))
  colours = dict(zip([k for k, _ in PLOT_RATES], ["C0", "C1", "C2"],
                     strict=True))
  styles = {"kernel": ("-", "o"), "neural": ("--", "s")}
  for model in dict.fromkeys(r["model"] for r in results):
    rows = sorted((r for r in results if r["model"] == model),
                  key=lambda r: pos[r["gamma"]])
    xs = [pos[r["gamma"]] for r in rows]
    line, marker = styles.get(model, (":", "^"))
    for key, name in PLOT_RATES:
      ax_c.plot(xs, [r[key] for r in rows], line, marker=marker,
                color=colours[key], label=f"{model}: {name}")
    ax_d.plot(xs, [r[distance_name] for r in rows], line, marker=marker,
              color="k", label=f"{model} samples")
  for key, style in (("train_images", ":"), ("train_recons", "-.")):
    value = reference.get(key)
    if value is not None:
      ax_d.axhline(value, color="grey", linestyle=style,
                   label=f"{key.replace('_', ' ')} (same size)")
  for ax in (ax_c, ax_d):
    ax.set_xticks([pos[t] for t in ticks], ticks)
    ax.set_xlabel("observation range gamma")
    ax.grid(alpha=0.3)
    if GLOBAL in pos and len(pos) > 1:
      ax.axvline(pos[GLOBAL] - 1, color="grey", linewidth=0.6,
                 linestyle=":")
  ax_c.set_ylim(-0.03, 1.03)
  ax_c.set_ylabel("copy rate")
  ax_c.legend(fontsize=7, loc="center left")
  ax_d.set_ylabel(distance_name)
  ax_d.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  buf = _io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


# ---------------------------------------------------------------------------
# Config checks.
# ---------------------------------------------------------------------------


def validate_kernel(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad ``config.kernel`` field."""
  check_choice(config, "kernel.order", ORDERS)
  for field in ("kernel.group", "kernel.sigma_s", "kernel.num_samples",
                "kernel.batch_size", "kernel.chunk_size"):
    check_positive(config, field)
  check_positive(config, "kernel.temperature", allow_zero=True)
  kernel_lib.parse_gamma(config.kernel.gamma)


def validate_sweep(config: ml_collections.ConfigDict) -> None:
  validate_kernel(config)
  parse_gammas(config.sweep.gammas)
  parse_workdir_map(config.sweep.get("arvm_workdirs", ""))
  if config.kernel.num_samples < 2:
    raise ValueError("config.kernel.num_samples must be >= 2 (a Frechet "
                     "distance needs two samples)")
  check_positive(config, "sweep.threshold_db")
  check_positive(config, "sweep.latent_threshold", allow_zero=True)
  for field in ("sweep.train_examples", "sweep.reference_examples"):
    check_positive(config, field, allow_zero=True)


# ---------------------------------------------------------------------------
# Stage kernel_sample.
# ---------------------------------------------------------------------------


def _load_blae(bank: Bank, mesh: Mesh):
  from mesp_jax.train.blae import load_blae
  return load_blae(bank.blae_workdir, mesh)


def kernel_sample_stage(config: ml_collections.ConfigDict,
                        workdir: str) -> dict:
  """Stage ``kernel_sample``: samples.png + samples.npz from the kernel ARVM."""
  validate_kernel(config)
  kcfg = config.kernel
  mesh = loop.make_mesh_from_config(config)
  t0 = time.time()
  bank = load_bank(config)
  model, params, _, step = _load_blae(bank, mesh)
  decode = make_decoder(model, params, bank.group, mesh)
  kbank = kernel_lib.prepare_bank(bank.tokens, group=bank.group,
                                  chunk_size=int(kcfg.chunk_size), mesh=mesh)
  gamma = kernel_lib.parse_gamma(kcfg.gamma)
  t = time.time()
  tokens = kernel_tokens(
      kbank, gamma=gamma, sigma_s=float(kcfg.sigma_s),
      num_samples=int(kcfg.num_samples), batch_size=int(kcfg.batch_size),
      rng=jax.random.key(int(kcfg.seed)), order=kcfg.order,
      temperature=float(kcfg.temperature))  # [S, h, w, Tp]
  sample_s = time.time() - t
  images = decode(tokens)  # [S, H, W, C] in [-1, 1]
  os.makedirs(workdir, exist_ok=True)
  npz = os.path.join(workdir, "samples.npz")
  io.save_npz(npz, tokens=tokens, images=images,
              labels=np.full(tokens.shape[0], -1, np.int32),
              group=np.int32(bank.group), bits=np.int32(bank.bits),
              gamma=np.asarray(gamma_label(gamma)),
              sigma_s=np.float64(kcfg.sigma_s),
              blae_step=np.int32(step), bank_size=np.int64(len(bank.tokens)))
  png = os.path.join(workdir, "samples.png")
  io.save_grid(png, images[:64], ncol=8)
  if io.is_writer():
    print(f"[kernel_sample] gamma={gamma_label(gamma)} sigma_s={kcfg.sigma_s}"
          f" g={bank.group}: {tokens.shape[0]} samples from a bank of "
          f"{len(bank.tokens)} in {sample_s:.1f} s (total "
          f"{time.time() - t0:.1f} s) -> {png}, {npz}", flush=True)
  return {"png": png, "npz": npz, "num_samples": int(tokens.shape[0]),
          "sample_seconds": sample_s}


# ---------------------------------------------------------------------------
# Stage gamma_sweep.
# ---------------------------------------------------------------------------


def gamma_sweep_stage(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage ``gamma_sweep``: see the module docstring."""
  validate_sweep(config)
  kcfg, scfg = config.kernel, config.sweep
  gammas = parse_gammas(scfg.gammas)
  neural_dirs = parse_workdir_map(scfg.get("arvm_workdirs", ""))
  unknown = set(neural_dirs) - {gamma_label(g) for g in gammas}
  if unknown:
    raise ValueError(f"config.sweep.arvm_workdirs names gammas "
                     f"{sorted(unknown)} that are not in config.sweep.gammas")
  mesh = loop.make_mesh_from_config(config)
  os.makedirs(workdir, exist_ok=True)
  cache_dir = scfg.get("cache_dir") or workdir
  t0 = time.time()
  say = (lambda msg: print(f"[gamma_sweep] {msg}", flush=True)) if (
      io.is_writer()) else (lambda msg: None)

  # Bank, BL-AE, images, reconstructions, reference statistics.
  bank = load_bank(config, int(scfg.train_examples))
  num_bank = len(bank.tokens)
  model, params, blae_config, blae_step = _load_blae(bank, mesh)
  decode = make_decoder(model, params, bank.group, mesh,
                        int(scfg.decode_batch_size))
  data_cfg = blae_config.data
  train_split = config.tokens.get("train_split", "train")
  train_images = read_images(data_cfg, train_split, num_bank)
  if len(train_images) != num_bank:
    raise ValueError(f"{bank.path} holds {num_bank} latents but the "
                     f"{data_cfg.name} {train_split} split has "
                     f"{len(train_images)} images: the bank must be the "
                     f"encoding of that split, in order")
  t = time.time()
  train_recons, cached = bank_recons(bank, decode, blae_step, cache_dir)
  recon_psnr = mem.psnr(train_recons, train_images)
  say(f"bank {num_bank} latents {bank.tokens.shape[1:]} x {bank.group} bits "
      f"({bank.path}); BL-AE {bank.blae_workdir} step {blae_step}; "
      f"reconstructions {'from cache' if cached else 'decoded'} in "
      f"{time.time() - t:.1f} s, median PSNR {np.median(recon_psnr):.2f} dB")
  ref_split = scfg.reference_split
  reference = read_images(data_cfg, ref_split, int(scfg.reference_examples))
  distance = make_distance(reference, ref_split, scfg.feature_net_workdir,
                           data_cfg.name, cache_dir)
  num = int(kcfg.num_samples)
  pick = np.random.default_rng(int(kcfg.seed)).choice(
      num_bank, size=min(num, num_bank), replace=False)
  reference_lines = {
      "train_images": distance.distance(train_images[pick]),
      "train_recons": distance.distance(train_recons[pick]),
      "num_images": int(len(pick)),
  }
  say(f"{distance.name} of {len(pick)} training images / reconstructions vs "
      f"{ref_split} ({len(reference)}): {reference_lines['train_images']:.4g}"
      f" / {reference_lines['train_recons']:.4g}")

  # Sample and evaluate every (model, gamma).
  kbank = kernel_lib.prepare_bank(bank.tokens, group=bank.group,
                                  chunk_size=int(kcfg.chunk_size), mesh=mesh)
  grid_h, grid_w = bank.tokens.shape[1:3]
  rng = jax.random.key(int(kcfg.seed))
  runs = [("kernel", g) for g in gammas] + [
      ("neural", g) for g in gammas if gamma_label(g) in neural_dirs]
  results = []
  for model_name, gamma in runs:
    label = gamma_label(gamma)
    t = time.time()
    if model_name == "kernel":
      tokens = kernel_tokens(
          kbank, gamma=gamma, sigma_s=float(kcfg.sigma_s), num_samples=num,
          batch_size=int(kcfg.batch_size), rng=rng, order=kcfg.order,
          temperature=float(kcfg.temperature))
    else:
      tokens = neural_tokens(neural_dirs[label], gamma, bank, scfg.neural,
                             num, rng, mesh)
    sample_s = time.time() - t
    t = time.time()
    images = decode(tokens)
    decode_s = time.time() - t
    t = time.time()
    summary, report = evaluate_samples(
        images, tokens, train_images=train_images, train_recons=train_recons,
        bank_tokens=bank.tokens, group=bank.group, distance=distance,
        threshold_db=float(scfg.threshold_db),
        latent_threshold=float(scfg.latent_threshold),
        chunk_size=int(scfg.nn_chunk_size), mesh=mesh)
    eval_s = time.time() - t
    out_dir = os.path.join(workdir, f"{model_name}_gamma_{label}")
    _write_sample_set(out_dir, images, tokens, report, train_images,
                      train_recons, {"gamma": np.asarray(label)},
                      int(scfg.grid_samples), int(scfg.triplet_rows))
    row = {"model": model_name, "gamma": label,
           "covers_whole_grid": gamma is None or gamma >= max(grid_h,
                                                              grid_w) - 1,
           **summary,
           "seconds": {"sample": sample_s, "decode": decode_s,
                       "evaluate": eval_s},
           "dir": os.path.relpath(out_dir, workdir)}
    if model_name == "neural":
      row["arvm_workdir"] = os.path.abspath(neural_dirs[label])
    results.append(row)
    fd = summary[distance.name]
    say(f"{model_name} gamma={label}: {num} samples in {sample_s:.1f} s | "
        f"copy rate {summary['copy_rate']:.3f} (pixels) "
        f"{summary['copy_rate_recon']:.3f} (recon) "
        f"{summary['copy_rate_latent']:.3f} (latent) | median PSNR "
        f"{summary['psnr_quantiles']['q0.50']:.2f} dB | {distance.name} "
        f"{fd:.4g} | eval {eval_s:.1f} s")

  out = {
      "bank": {"path": os.path.abspath(bank.path), "size": num_bank,
               "grid": list(bank.tokens.shape[1:]), "bits": bank.bits,
               "group": bank.group,
               "blae_workdir": os.path.abspath(bank.blae_workdir),
               "blae_step": int(blae_step),
               "recon_psnr_median": float(np.median(recon_psnr)),
               "recon_psnr_quantiles": mem.psnr_quantiles(recon_psnr)},
      "kernel": {"sigma_s": float(kcfg.sigma_s),
                 "p_flip": kernel_lib.flip_probability(float(kcfg.sigma_s)),
                 "order": kcfg.order, "temperature": float(kcfg.temperature),
                 "seed": int(kcfg.seed)},
      "num_samples": num,
      "threshold_db": float(scfg.threshold_db),
      "latent_threshold": float(scfg.latent_threshold),
      "distance": {"name": distance.name, "split": distance.split,
                   "num_reference": distance.num_reference,
                   "note": distance.note},
      "reference": reference_lines,
      "results": results,
      "seconds": time.time() - t0,
      "config": config.to_dict(),
  }
  json_path = os.path.join(workdir, "gamma_sweep.json")
  io.write_json(json_path, json_safe(out))
  png_path = os.path.join(workdir, "gamma_sweep.png")
  if io.is_writer():
    title = (f"kernel gamma-ARVM (sigma_s={kcfg.sigma_s})"
             f"{' and neural ARVMs' if neural_dirs else ''}, bank {num_bank} "
             f"x {bank.tokens.shape[1]}x{bank.tokens.shape[2]}x{bank.bits} "
             f"bits, g={bank.group}, {num} samples per gamma")
    io.atomic_write_bytes(png_path, plot_sweep(results, distance.name,
                                               reference_lines, title))
  say(f"done in {time.time() - t0:.0f} s -> {json_path}, {png_path}")
  out.update(json=json_path, png=png_path)
  return out
