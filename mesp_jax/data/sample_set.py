"""``samples.npz``: one schema for every sampler, stage and evaluation.

A :class:`SampleSet` holds the tokens, the decoded images, the labels, what
drew them (sampler kind, gamma as text, bits per token) and where they came
from (source workdirs and checkpoint steps, the sampler's settings). Per-
sample evaluation arrays (nearest neighbours, PSNR, ...) ride along in
``extra``. Files written before this schema load too: their missing fields are
filled in and ``gamma='None'`` (the old neural spelling) reads as 'global'.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from mesp_jax.base import io
from mesp_jax.base.gamma import gamma_label

SCHEMA_VERSION = 2
_CORE = ("tokens", "images", "labels", "kind", "gamma", "group", "sources",
         "settings", "schema_version")
# Scalars the earlier schemas stored beside the arrays.
_LEGACY_SOURCES = ("arvm_step", "blae_step", "bank_size", "bits", "sigma_s")


@dataclasses.dataclass
class SampleSet:
  """A set of generated samples.

  Attributes:
    tokens: [N, h, w, Tp] int32 tokens of ``group`` bits.
    images: [N, H, W, C] float32 in [-1, 1] (the BL-AE decode of ``tokens``).
    labels: [N] int32 class labels; -1 = unconditional.
    kind: 'neural' or 'kernel' ('unknown' for old files that do not say).
    gamma: the observation range as text ('3', 'global').
    group: bits per token g.
    sources: where the samples came from (workdirs as absolute paths,
      checkpoint steps, the token bank).
    settings: the sampler's settings (seed, batch size, temperature, ...).
    extra: further per-sample arrays (e.g. ``nearest``, ``psnr``).
  """

  tokens: np.ndarray
  images: np.ndarray
  labels: np.ndarray
  kind: str
  gamma: str
  group: int
  sources: dict[str, Any] = dataclasses.field(default_factory=dict)
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.tokens = np.asarray(self.tokens, np.int32)
    self.images = np.asarray(self.images, np.float32)
    self.labels = np.asarray(self.labels, np.int32)
    self.gamma = gamma_label(self.gamma)
    n = self.tokens.shape[0]
    if self.tokens.ndim != 4:
      raise ValueError(f"tokens must be [N, h, w, Tp], got {self.tokens.shape}")
    if self.images.ndim != 4 or self.images.shape[0] != n:
      raise ValueError(f"images must be [{n}, H, W, C], got "
                       f"{self.images.shape}")
    if self.labels.shape != (n,):
      raise ValueError(f"labels must be [{n}], got {self.labels.shape}")

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  def save(self, path: str, *, shard: bool = False) -> None:
    """Atomic ``np.savez`` from process 0 (``shard``: from every process,
    each to its own ``path``)."""
    clash = set(self.extra) & set(_CORE)
    if clash:
      raise ValueError(f"extra arrays may not be named {sorted(clash)}")
    save = io.save_npz_shard if shard else io.save_npz
    save(path, tokens=self.tokens, images=self.images,
                labels=self.labels, kind=np.asarray(self.kind),
                gamma=np.asarray(self.gamma), group=np.int32(self.group),
                sources=np.asarray(json.dumps(self.sources, sort_keys=True)),
                settings=np.asarray(json.dumps(self.settings,
                                               sort_keys=True)),
                schema_version=np.int32(SCHEMA_VERSION), **self.extra)

  @classmethod
  def load(cls, path: str) -> SampleSet:
    """Reads a ``samples.npz`` of this or an earlier schema, or a manifest
    of per-process shards (:func:`write_manifest`; the shards are joined in
    sample order).

    Raises:
      FileNotFoundError / ValueError naming the file and what is wrong.
    """
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist")
    if path.endswith(".json"):
      return _load_manifest(path)
    try:
      with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
      raise ValueError(f"{path} is not a readable samples .npz ({e}); "
                       f"rerun the sampling stage that wrote it") from None
    missing = [k for k in ("tokens", "images") if k not in data]
    if missing:
      raise ValueError(f"{path} lacks {missing} (holds {sorted(data)}); it "
                       f"was not written by a sampling stage")
    n = data["tokens"].shape[0]
    if "schema_version" in data:
      sources = json.loads(str(data.pop("sources")))
      settings = json.loads(str(data.pop("settings")))
      kind = str(data.pop("kind"))
    else:  # schema 1: scalars beside the arrays
      sources = {k: data.pop(k).item() for k in _LEGACY_SOURCES if k in data}
      settings = {}
      kind = ("kernel" if "sigma_s" in sources else
              "neural" if "arvm_step" in sources else "unknown")
    gamma = str(data.pop("gamma", "global"))
    gamma = "global" if gamma in ("None", "none") else gamma
    group = int(data.pop("group", 0))
    labels = data.pop("labels", np.full(n, -1, np.int32))
    data.pop("schema_version", None)
    return cls(tokens=data.pop("tokens"), images=data.pop("images"),
               labels=labels, kind=kind, gamma=gamma, group=group,
               sources=sources, settings=settings, extra=data)


MANIFEST = "samples_manifest.json"


def shard_name(process_index: int, process_count: int) -> str:
  """File name of one process's shard of a sample set."""
  return f"samples-{process_index:05d}-of-{process_count:05d}.npz"


def write_manifest(path: str, shards: list[str], num_samples: int,
                   info: dict[str, Any]) -> None:
  """Process 0 lists the shards (names relative to ``path``'s folder) that
  together hold ``num_samples`` samples; :meth:`SampleSet.load` reads it."""
  io.write_json(path, {"schema_version": SCHEMA_VERSION, "shards": shards,
                       "num_samples": int(num_samples), **info})


def _load_manifest(path: str) -> SampleSet:
  try:
    with open(path) as f:
      manifest = json.load(f)
    shards = list(manifest["shards"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is not a sample manifest ({e}); rerun the "
                     f"sampling stage that wrote it") from None
  folder = os.path.dirname(path)
  parts = [SampleSet.load(os.path.join(folder, s)) for s in shards]
  if not parts:
    raise ValueError(f"{path} lists no shards")
  first = parts[0]
  if any("index" not in p.extra for p in parts):
    raise ValueError(f"{path}: a shard lacks the 'index' array")
  index = np.concatenate([p.extra["index"] for p in parts])
  order = np.argsort(index, kind="stable")
  expected = int(manifest.get("num_samples", len(index)))
  if len(index) != expected or not np.array_equal(index[order],
                                                  np.arange(expected)):
    raise ValueError(f"{path}: the shards hold samples {len(index)} of "
                     f"{expected}, not each exactly once; a shard is missing "
                     f"or stale: rerun the sampling stage")

  def join(get):
    return np.concatenate([get(p) for p in parts])[order]

  extra = {k: join(lambda p, k=k: p.extra[k]) for k in first.extra
           if k != "index"}
  return SampleSet(tokens=join(lambda p: p.tokens),
                   images=join(lambda p: p.images),
                   labels=join(lambda p: p.labels), kind=first.kind,
                   gamma=first.gamma, group=first.group,
                   sources=first.sources, settings=first.settings,
                   extra=extra)
