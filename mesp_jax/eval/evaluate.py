"""Sample quality and memorisation of a set of images (stage ``evaluate``).

Input: images [N, H, W, C] in [-1, 1] (``images`` of a samples ``.npz``)
and a trained classifier (stage ``train_feature_net``: its reference
statistics; its data config is the data set evaluated against).

Output of :func:`evaluate_images` (the stage writes it to ``eval.json``):

* ``fd_{dataset}_classifier``: the Frechet distance between the samples and
  the train split in the project classifier's feature space (plus ``_vs_test``
  against the test split); ``kid_{dataset}_classifier`` (mean and std over
  subsets, against the stored train features); ``precision_/recall_...``
  (Kynkaanniemi et al., k = 3). These are *not* FID numbers and are never
  called so;
* ``reference_test_vs_train``: the same metrics for the real test split
  against the train split, the floor a perfect generator would reach, once
  with all test images and once with a random test subset of the samples'
  size (the Frechet distance is biased upwards for small sets);
* ``fid``, ``kid_inception``, ``inception_score``: only when
  ``config.evaluate.inception_weights`` names the standard FID Inception
  weights; otherwise null with a note in ``notes`` (never a substitute
  number);
* ``memorization``: copy rate (nearest training image at PSNR >= 25 dB) via
  :mod:`mesp_jax.eval.memorization` when ``config.evaluate.copy_rate`` is
  set, and the classifier distance of the
  non-copies (the authors' protocol: drop copies, then measure).
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from mesp_jax.base.image import to_float_images
from mesp_jax.data import source_from_config
from mesp_jax.data.sample_set import SampleSet
from mesp_jax.eval import fid as fid_lib
from mesp_jax.eval import memorization as mem
from mesp_jax.eval import reference
from mesp_jax.models.feature_net import classifier_features, feature_net_name

INCEPTION_NAME = "inception_v3_fid"


def load_samples(path: str, image_shape=None) -> np.ndarray:
  """``images`` of a samples npz (or shard manifest) as float32 [N, H, W, C]
  in [-1, 1].

  uint8 images are mapped from 0..255. Float images must lie in [-1, 1]
  (round-off up to 1e-2 outside is clipped).

  Raises:
    FileNotFoundError / ValueError with what is wrong and what was expected.
  """
  if not path:
    raise ValueError("config.inputs.samples is empty: give the path of an "
                     ".npz holding 'images' [N, H, W, C] in [-1, 1]")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.inputs.samples={path!r} does not exist")
  if path.endswith(".json"):  # per-process shards of stage sample
    images = SampleSet.load(path).images
  else:
    with np.load(path, allow_pickle=False) as f:
      if "images" not in f.files:
        raise ValueError(f"{path} has no 'images' array (found {f.files}); "
                         f"the samplers write 'images' [N, H, W, C] in "
                         f"[-1, 1]")
      images = f["images"]
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{path}: images must be [N, H, W, 1 or 3], got "
                     f"{images.shape}")
  if images.dtype == np.uint8:
    images = to_float_images(images)
  images = np.asarray(images, np.float32)
  if not np.all(np.isfinite(images)):
    raise ValueError(f"{path}: images contain NaN or inf")
  lo, hi = float(images.min()), float(images.max())
  if lo < -1.01 or hi > 1.01:
    raise ValueError(f"{path}: images span [{lo:.3g}, {hi:.3g}]; expected "
                     f"[-1, 1] (uint8 0..255 is also accepted)")
  if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
    raise ValueError(f"{path}: images are {tuple(images.shape[1:])} but the "
                     f"feature net was trained on {tuple(image_shape)}")
  return np.clip(images, -1.0, 1.0)


def feature_metrics(fake: np.ndarray, ref_train: fid_lib.ReferenceStats,
                    ref_test: fid_lib.ReferenceStats | None, name: str,
                    cfg: ml_collections.ConfigDict) -> dict[str, float]:
  """FD (vs train and test statistics), KID and P&R of features [N, D].

  KID and precision/recall use the train reference's stored feature rows.
  """
  kid_name = name.replace("fd_", "kid_", 1)
  tail = name[len("fd_"):]
  out = {name: ref_train.frechet_distance(fake)}
  if ref_test is not None:
    out[f"{name}_vs_test"] = ref_test.frechet_distance(fake)
  real = ref_train.features
  if real is not None and real.shape[0] > cfg.pr_k and fake.shape[0] > (
      cfg.pr_k):
    mean, std = fid_lib.kid(real, fake, num_subsets=int(cfg.kid_subsets),
                            subset_size=int(cfg.kid_subset_size),
                            rng=int(cfg.seed))
    out[kid_name], out[f"{kid_name}_std"] = mean, std
    precision, recall = fid_lib.precision_recall(real, fake, k=int(cfg.pr_k))
    out[f"precision_{tail}"], out[f"recall_{tail}"] = precision, recall
  return out


def reference_line(ref_train: fid_lib.ReferenceStats,
                   ref_test: fid_lib.ReferenceStats, num_samples: int,
                   name: str, cfg: ml_collections.ConfigDict) -> dict:
  """The metrics of the real test split against the train split."""
  out = {"num_test": ref_test.num_samples,
         name: fid_lib.frechet_distance(ref_test.mu, ref_test.sigma,
                                        ref_train.mu, ref_train.sigma)}
  test = ref_test.features
  if test is None:
    return out
  full = feature_metrics(test, ref_train, None, name, cfg)
  full.pop(name)  # the one above uses every test image, not the stored rows
  out.update(full)
  if 2 <= num_samples < test.shape[0]:
    rng = np.random.default_rng(int(cfg.seed))
    subset = test[rng.choice(test.shape[0], num_samples, replace=False)]
    out["size_matched"] = dict(
        num_test=num_samples,
        **feature_metrics(subset, ref_train, None, name, cfg))
  return out


def _test_accuracy(fn_workdir: str) -> float | None:
  """Last eval accuracy in the feature net's metrics.jsonl, if any."""
  path = os.path.join(fn_workdir, "metrics.jsonl")
  acc = None
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if rec.get("split") == "eval" and "accuracy" in rec:
          acc = float(rec["accuracy"])
  return acc


def inception_metrics(samples: np.ndarray, data_cfg, cfg, cache_dir: str,
                      mesh=None) -> dict:
  """FID / KID / IS with the real FID Inception weights from a file."""
  from mesp_jax.eval import inception as inc  # heavy; only when asked
  from mesp_jax.eval import inception_weights as inc_weights
  path = cfg.inception_weights
  variables = inc_weights.load_inception_params(path, download=False)
  weights_id = inc_weights.sha256_of_file(path)[:12]
  batch = int(cfg.inception_batch_size)
  fake, logits = inc.fid_features(variables, samples, batch_size=batch,
                                  return_logits=True, mesh=mesh)
  limit = int(cfg.inception_reference_examples) or None

  def compute():
    source = source_from_config(data_cfg, "train")
    n = len(source) if limit is None else min(limit, len(source))
    feats = []
    for start in range(0, n, 1000):
      record = source.read(np.arange(start, min(start + 1000, n)))
      feats.append(inc.fid_features(
          variables, to_float_images(record["image"]), batch_size=batch,
          mesh=mesh))
    return np.concatenate(feats)

  ref = fid_lib.ReferenceStats.load_or_compute(
      cache_dir, data_cfg.name, "train", f"{INCEPTION_NAME}_{weights_id}",
      compute, max_features=10_000)
  out = {"fid": ref.frechet_distance(fake),
         "fid_reference_images": ref.num_samples,
         "inception_weights": os.path.abspath(path),
         "inception_weights_sha256_prefix": weights_id}
  if ref.features is not None:
    out["kid_inception"], out["kid_inception_std"] = fid_lib.kid(
        ref.features, fake, num_subsets=int(cfg.kid_subsets),
        subset_size=int(cfg.kid_subset_size), rng=int(cfg.seed))
  splits = min(10, samples.shape[0])
  out["inception_score"], out["inception_score_std"] = (
      fid_lib.inception_score(logits, splits=splits))
  return out


def evaluate_images(samples: np.ndarray, config: ml_collections.ConfigDict,
                    feature_net: tuple, mesh=None) -> dict:
  """All metrics of ``samples`` [N, H, W, C] in [-1, 1] (see module doc).

  ``feature_net``: ``(model, params, config, step)`` of the classifier in
  ``config.inputs.feature_net_workdir``
  (:func:`mesp_jax.train.feature_net.load_feature_net`).
  """
  cfg = config.evaluate
  fn_dir = config.inputs.feature_net_workdir
  model, params, fn_config, step = feature_net
  data_cfg = fn_config.data
  refs = reference.reference_stats(fn_config, fn_dir, model, params, step)
  if "train" not in refs:
    raise ValueError(f"{fn_dir}: the feature net's reference_splits "
                     f"{tuple(refs)} lack 'train'")
  name = feature_net_name(data_cfg.name)
  n = samples.shape[0]
  if n < 2:
    raise ValueError(f"need at least 2 samples, got {n}")
  fake = classifier_features(model, params, samples,
                             batch_size=int(cfg.batch_size))  # [N, D]
  result: dict = {
      "samples": (os.path.abspath(config.inputs.samples)
                  if config.inputs.get("samples") else None),
      "num_samples": int(n), "image_shape": list(samples.shape[1:]),
      "dataset": data_cfg.name,
      "feature_net": {"name": name, "workdir": os.path.abspath(fn_dir),
                      "checkpoint_step": int(step),
                      "test_accuracy": _test_accuracy(fn_dir),
                      "feature_dim": int(fake.shape[1])},
      "notes": [f"{name} is a Frechet distance in the features of the "
                f"project's own {data_cfg.name} classifier (reference: "
                f"{refs['train'].num_samples} train images); it is not FID "
                f"and not comparable with published FIDs."],
  }
  result.update(feature_metrics(fake, refs["train"], refs.get("test"), name,
                                cfg))
  if "test" in refs:
    result["reference_test_vs_train"] = reference_line(
        refs["train"], refs["test"], n, name, cfg)

  if cfg.get("inception_weights"):
    result.update(inception_metrics(samples, data_cfg, cfg,
                                    cfg.get("inception_cache_dir") or fn_dir,
                                    mesh))
  else:
    result.update(fid=None, kid_inception=None, inception_score=None)
    result["notes"].append(
        "fid / kid_inception / inception_score skipped: no "
        "config.evaluate.inception_weights given (the FID Inception-v3 "
        "weights cannot be fetched offline; see "
        "mesp_jax/eval/inception_weights.py for the accepted files).")

  if not cfg.copy_rate:
    result["memorization"] = None
    result["notes"].append("copy rate skipped: config.evaluate.copy_rate is "
                           "False")
  else:
    result["memorization"] = memorization(samples, fake, refs, data_cfg, cfg,
                                          name, mesh)
  return result


def memorization(samples, fake_features, refs, data_cfg, cfg, name: str,
                 mesh) -> dict:
  """Copy rate against the train split, and the distance of the non-copies."""
  source = source_from_config(data_cfg, "train")
  limit = int(cfg.copy_rate_train_examples) or None
  n_train = len(source) if limit is None else min(limit, len(source))
  train = to_float_images(source.read(np.arange(n_train))["image"])
  report = mem.memorization_report(samples, train,
                                   threshold_db=float(cfg.copy_threshold_db),
                                   mesh=mesh)
  is_copy = np.asarray(report["is_copy"], bool)
  out = {"copy_rate": float(report["copy_rate"]),
         "num_copies": int(is_copy.sum()),
         "threshold_db": float(report["threshold_db"]),
         "num_train_images": int(n_train),
         "psnr_quantiles": report["psnr_quantiles"]}
  keep = fake_features[~is_copy]
  if keep.shape[0] >= 2:
    out[f"{name}_non_copies"] = refs["train"].frechet_distance(keep)
  else:
    out[f"{name}_non_copies"] = None
  out["num_non_copies"] = int(keep.shape[0])
  return out
