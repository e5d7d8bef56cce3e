"""Token grids written by stage ``blae_encode``, as a random-access source.

Format (version 1): per split, a manifest ``{dir}/tokens_{split}.json`` and
one pair of ``.npy`` shards per encoding process in ``{dir}/tokens_{split}/``:

  tokens-{p:05d}-of-{P:05d}.npy   int32 [n_p, h, w, C/group] packed tokens
  labels-{p:05d}-of-{P:05d}.npy   int32 [n_p]

Shard p holds the examples ``[p*N//P, (p+1)*N//P)`` of the split, so the
shards in order are the whole split. The manifest records ``format``,
``version``, ``split``, ``dataset``, ``grid`` [h, w], ``bits`` (C, bits per
position), ``group`` (bits per stored token; ``bits``: one token per
position, first channel most significant), ``dtype``, ``num_examples``,
``shards`` [{tokens, labels, start, count}] (paths relative to the manifest's
folder), ``blae_workdir`` (absolute) and ``checkpoint_step``.

:class:`TokenSource` memory-maps the shards and reads only the rows asked
for, regrouped to the caller's token size on the fly. The older single-file
``tokens_{split}.npz`` (tokens, labels, bits, blae_workdir, ...) is still
read everywhere; a split's manifest takes precedence over its npz.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile

import numpy as np

from mesp_jax.base import bits as bits_lib
from mesp_jax.base import io

FORMAT = "mesp_jax.tokens"
VERSION = 1
_RERUN = ("re-run stage 'blae_encode' into a fresh workdir (or the same one, "
          "which rewrites every shard and then the manifest)")


def repack(tokens: np.ndarray, bits: int, from_group: int, to_group: int
           ) -> np.ndarray:
  """Re-groups packed tokens [..., C/from_group] -> [..., C/to_group]."""
  if from_group == to_group:
    return np.asarray(tokens).astype(np.int32)
  if bits % to_group:
    raise ValueError(f"arvm.group={to_group} must divide the BL-AE's "
                     f"{bits} bits per position")
  b = bits_lib.unpack(tokens, from_group, np.int8, xp=np)  # [..., C] +-1
  return bits_lib.pack(b, to_group, xp=np)


# --------------------------------------------------------------------------
# Names and the shard layout.
# --------------------------------------------------------------------------
def manifest_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"tokens_{split}.json")


def legacy_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"tokens_{split}.npz")


def has_tokens(directory: str, split: str) -> bool:
  """True if ``directory`` holds the tokens of ``split`` (either format)."""
  return (os.path.exists(manifest_path(directory, split))
          or os.path.exists(legacy_path(directory, split)))


def tokens_path(directory: str, split: str) -> str:
  """The token file of ``split``: its manifest, else a legacy npz.

  With neither present, the manifest's path (opening it raises the
  FileNotFoundError that says to run stage 'blae_encode').
  """
  legacy = legacy_path(directory, split)
  manifest = manifest_path(directory, split)
  if not os.path.exists(manifest) and os.path.exists(legacy):
    return legacy
  return manifest


def shard_range(num_examples: int, process_index: int, process_count: int
                ) -> tuple[int, int]:
  """``[start, stop)`` of the examples that process p of P encodes."""
  return (process_index * num_examples // process_count,
          (process_index + 1) * num_examples // process_count)


def shard_files(split: str, process_index: int, process_count: int
                ) -> tuple[str, str]:
  """(tokens, labels) shard paths relative to the manifest's folder."""
  tail = f"{process_index:05d}-of-{process_count:05d}.npy"
  folder = f"tokens_{split}"
  return (os.path.join(folder, f"tokens-{tail}"),
          os.path.join(folder, f"labels-{tail}"))


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
  """``np.save`` through a temporary file in the same folder and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                             suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_shard(directory: str, split: str, process_index: int,
                process_count: int, tokens: np.ndarray, labels: np.ndarray
                ) -> tuple[str, str]:
  """Writes one process's shard pair atomically; returns their paths.

  Args:
    tokens: int32 [n_p, h, w, Tp] packed tokens of this process's share.
    labels: [n_p] labels.
  """
  tokens = np.ascontiguousarray(tokens, np.int32)
  labels = np.ascontiguousarray(labels, np.int32)
  if tokens.ndim != 4 or labels.shape != tokens.shape[:1]:
    raise ValueError(f"tokens must be [n, h, w, Tp] and labels [n], got "
                     f"{tokens.shape} and {labels.shape}")
  paths = tuple(os.path.join(directory, name) for name in
                shard_files(split, process_index, process_count))
  _atomic_save_npy(paths[0], tokens)
  _atomic_save_npy(paths[1], labels)
  return paths


def make_manifest(*, split: str, dataset: str, grid: tuple[int, int],
                  bits: int, num_examples: int, process_count: int,
                  blae_workdir: str, checkpoint_step: int,
                  group: int | None = None) -> dict:
  """The manifest of a split written as ``process_count`` shards."""
  group = bits if group is None else int(group)
  shards = []
  for p in range(process_count):
    start, stop = shard_range(num_examples, p, process_count)
    tok, lab = shard_files(split, p, process_count)
    shards.append({"tokens": tok, "labels": lab, "start": start,
                   "count": stop - start})
  return {"format": FORMAT, "version": VERSION, "split": split,
          "dataset": dataset, "grid": [int(grid[0]), int(grid[1])],
          "bits": int(bits), "group": group, "dtype": "int32",
          "num_examples": int(num_examples), "shards": shards,
          "blae_workdir": os.path.abspath(blae_workdir) if blae_workdir
          else "", "checkpoint_step": int(checkpoint_step)}


def write_manifest(path: str, manifest: dict, check: bool = True) -> None:
  """Writes ``manifest`` to ``path`` atomically (the caller picks the one
  process that writes); ``check`` first opens every shard it lists."""
  if check:
    _open_shards(path, manifest)
  io.atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode())


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------
def _missing(path: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"{path} not found; run stage 'blae_encode' on a trained BL-AE first "
      f"(or set config.inputs.tokens_dir to the folder holding "
      f"tokens_*.json / tokens_*.npz)")


def _read_manifest(path: str) -> dict:
  if not os.path.exists(path):
    raise _missing(path)
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or int(manifest.get("version", -1)) \
      > VERSION:
    raise ValueError(f"{path} is not a version <= {VERSION} {FORMAT!r} "
                     f"manifest (format={manifest.get('format')!r}, "
                     f"version={manifest.get('version')!r}); {_RERUN}")
  return manifest


def _open_npy(path: str, manifest_file: str, expected: tuple[int, ...]
              ) -> np.memmap:
  """Memory-maps one shard and checks its shape and dtype."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"shard {path} listed by {manifest_file} is missing: the token set "
        f"is incomplete; {_RERUN}")
  try:
    array = np.load(path, mmap_mode="r")
  except ValueError as e:  # e.g. a truncated file
    raise ValueError(f"shard {path} listed by {manifest_file} is unreadable "
                     f"({e}); {_RERUN}") from e
  if array.shape != expected or array.dtype != np.int32:
    raise ValueError(
        f"shard {path} holds {array.dtype} {list(array.shape)} but "
        f"{manifest_file} expects int32 {list(expected)}: it comes from "
        f"another encoding run; {_RERUN}")
  return array


def _open_shards(path: str, manifest: dict
                 ) -> tuple[list[np.memmap], list[np.memmap], np.ndarray]:
  """(token memmaps, label memmaps, starts [S + 1]) of a manifest."""
  folder = os.path.dirname(os.path.abspath(path))
  h, w = manifest["grid"]
  tp = int(manifest["bits"]) // int(manifest["group"])
  tokens, labels, starts = [], [], [0]
  for shard in manifest["shards"]:
    start, count = int(shard["start"]), int(shard["count"])
    if start != starts[-1]:
      raise ValueError(f"{path}: shard {shard['tokens']} starts at {start}, "
                       f"not {starts[-1]}; {_RERUN}")
    tokens.append(_open_npy(os.path.join(folder, shard["tokens"]), path,
                            (count, h, w, tp)))
    labels.append(_open_npy(os.path.join(folder, shard["labels"]), path,
                            (count,)))
    starts.append(start + count)
  if starts[-1] != int(manifest["num_examples"]):
    raise ValueError(f"{path}: the shards hold {starts[-1]} examples, not "
                     f"num_examples={manifest['num_examples']}; {_RERUN}")
  return tokens, labels, np.asarray(starts, np.int64)


def _npz_shape(path: str, key: str) -> tuple[int, ...]:
  """The shape of array ``key`` of an npz, from its header alone."""
  with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
    version = np.lib.format.read_magic(f)
    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    return tuple(header(f)[0])


def read_info(path: str) -> dict:
  """A token file's metadata without its tokens (either format): bits,
  group, grid, num_examples, checkpoint_step, blae_workdir, dataset, split
  (the last four as stored; -1 / '' when absent)."""
  if path.endswith(".npz"):
    if not os.path.exists(path):
      raise _missing(path)
    shape = _npz_shape(path, "tokens")  # [N, h, w, Tp]
    with np.load(path) as f:  # lazy: reads only the arrays asked for
      get = (lambda k, d: f[k] if k in f.files else d)  # noqa: E731
      bits = int(f["bits"])
      return {"bits": bits, "group": bits // shape[-1],
              "grid": [int(shape[1]), int(shape[2])],
              "num_examples": int(shape[0]),
              "checkpoint_step": int(get("checkpoint_step", -1)),
              "blae_workdir": str(get("blae_workdir", "")),
              "dataset": str(get("dataset", "")),
              "split": str(get("split", ""))}
  m = _read_manifest(path)
  return {k: m[k] for k in ("bits", "group", "grid", "num_examples",
                            "checkpoint_step", "blae_workdir", "dataset",
                            "split")}


def load_tokens(path: str) -> dict:
  """Reads a whole token file into memory (either format).

  Returns:
    ``tokens`` int32 [N, h, w, Tp] (as stored: Tp = 1 from 'blae_encode'),
    ``labels`` [N], ``bits`` (int), ``blae_workdir`` (str) and whatever else
    the file records (``grid``, ``checkpoint_step``, ``dataset``, ``split``,
    and ``group`` for a manifest).
  """
  if path.endswith(".npz"):
    if not os.path.exists(path):
      raise _missing(path)
    with np.load(path) as f:
      out = {k: f[k] for k in f.files}
    out["bits"] = int(out["bits"])
    out["blae_workdir"] = str(out.get("blae_workdir", ""))
    return out
  manifest = _read_manifest(path)
  tokens, labels, _ = _open_shards(path, manifest)
  out = {k: v for k, v in manifest.items()
         if k not in ("shards", "format", "version", "dtype")}
  out["tokens"] = np.concatenate([np.asarray(t) for t in tokens])
  out["labels"] = np.concatenate([np.asarray(lab) for lab in labels])
  out["grid"] = np.asarray(manifest["grid"])
  return out


class TokenSource:
  """Random-access source of ``{'tokens': [n, h, w, Tp], 'label': [n]}``.

  Args:
    path: a manifest ``tokens_{split}.json`` (its shards are memory-mapped;
      :meth:`read` touches only the rows asked for) or a legacy
      ``tokens_{split}.npz`` (loaded whole). :func:`tokens_path` finds a
      split's file in a folder.
    group: bits per token of what :meth:`read` returns (divides ``bits``).

  Attributes:
    bits, group, grid (h, w), labels (int32 [N], in memory), blae_workdir,
    name, path; ``shards``: the token arrays (np.memmap for a manifest).
  """

  def __init__(self, path: str, group: int):
    self.path = path
    self.name = os.path.basename(path)
    self.group = int(group)
    if path.endswith(".npz"):
      data = load_tokens(path)
      self.bits = data["bits"]
      self.stored_group = self.bits // data["tokens"].shape[-1]
      self.shards = [data["tokens"].astype(np.int32)]
      self.labels = data["labels"].astype(np.int32)
      self.blae_workdir = data["blae_workdir"]
      self._starts = np.asarray([0, len(self.labels)], np.int64)
    else:
      manifest = _read_manifest(path)
      self.bits = int(manifest["bits"])
      self.stored_group = int(manifest["group"])
      self.shards, labels, self._starts = _open_shards(path, manifest)
      self.labels = (np.concatenate([np.asarray(x) for x in labels])
                     if labels else np.zeros((0,), np.int32))
      self.blae_workdir = manifest.get("blae_workdir", "")
    if self.bits % self.group:
      raise ValueError(f"arvm.group={self.group} must divide the BL-AE's "
                       f"{self.bits} bits per position ({path})")
    self.grid = tuple(int(d) for d in self.shards[0].shape[1:3])
    self.tokens_per_position = self.bits // self.group

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getstate__(self) -> dict:  # workers re-open the memmaps, not copy
    return {"path": self.path, "group": self.group}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["path"], state["group"])

  def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global indices [n] -> (shard [n], row within the shard [n])."""
    idx = np.asarray(indices, np.int64)
    n = len(self)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      raise IndexError(f"{self.name}: indices must lie in [0, {n}), got "
                       f"[{idx.min()}, {idx.max()}]")
    shard = np.searchsorted(self._starts, idx, side="right") - 1
    return shard, idx - self._starts[shard]

  def read_stored(self, indices: np.ndarray) -> np.ndarray:
    """The rows ``indices`` [n] as stored: int32 [n, h, w, C/stored_group]."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    shard, row = self.locate(idx)
    tp = self.bits // self.stored_group
    out = np.empty((idx.size, *self.grid, tp), np.int32)
    for s in np.unique(shard):
      sel = shard == s
      out[sel] = self.shards[s][row[sel]]  # reads only these rows
    return out

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """``{'tokens': int32 [n, h, w, C/group], 'label': int32 [n]}``."""
    idx = np.asarray(indices, np.int64)
    stored = self.read_stored(idx)  # [n, h, w, C/stored_group]
    tokens = repack(stored, self.bits, self.stored_group, self.group)
    return {"tokens": tokens.reshape(*idx.shape, *tokens.shape[1:]),
            "label": self.labels[idx]}


@dataclasses.dataclass(frozen=True)
class Bank:
  """Training latents at the kernel's grouping.

  Attributes:
    tokens: [N, h, w, Tp] int32 tokens of ``group`` bits.
    bits: bits per latent position (C).
    group: bits per token g (divides C).
    blae_workdir: the BL-AE that encoded them.
    path: the manifest (or legacy npz) they came from.
  """
  tokens: np.ndarray
  bits: int
  group: int
  blae_workdir: str
  path: str


def load_bank(config, limit: int = 0) -> Bank:
  """Reads the tokens of ``tokens.train_split`` at ``kernel.group`` bits.

  The split's manifest ``tokens_{split}.json`` is read if present, else a
  legacy ``tokens_{split}.npz``.

  Args:
    config: with ``inputs.{tokens_dir, blae_workdir}``,
      ``tokens.train_split`` and ``kernel.group``.
    limit: keep only the first ``limit`` entries (0 = all).
  """
  tokens_dir = config.inputs.tokens_dir
  if not tokens_dir:
    raise ValueError("config.inputs.tokens_dir is empty: point it at the "
                     "folder of a 'blae_encode' run (it holds "
                     "tokens_train.json)")
  split = config.tokens.get("train_split", "train")
  path = tokens_path(tokens_dir, split)
  group = int(config.kernel.group)
  bits = read_info(path)["bits"]
  if bits % group:
    raise ValueError(f"config.kernel.group={group} must divide the BL-AE's "
                     f"{bits} bits per position")
  source = TokenSource(path, group)
  n = min(limit, len(source)) if limit else len(source)
  tokens = source.read(np.arange(n))["tokens"]  # [N, h, w, Tp]
  blae_dir = config.inputs.get("blae_workdir") or source.blae_workdir
  if not blae_dir:
    raise ValueError(f"{path} names no BL-AE workdir; set "
                     f"config.inputs.blae_workdir")
  return Bank(tokens=tokens.astype(np.int32), bits=bits, group=group,
              blae_workdir=blae_dir, path=path)
