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

Every reader checks what it opens: a missing file raises
:class:`~mesp_jax.data.DataNotFoundError`, a damaged one (truncated, random
bytes, a missing key, another dtype or shape, token values outside
``[0, 2**group)``, negative labels) :class:`~mesp_jax.data.DataError`, both
naming the file and saying to re-run ``blae_encode``.
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
from mesp_jax.base.config import ConfigError
from mesp_jax.data.sources import DataError, DataNotFoundError

FORMAT = "mesp_jax.tokens"
VERSION = 1
_RERUN = ("re-run stage 'blae_encode' into a fresh workdir (or the same one, "
          "which rewrites every shard and then the manifest)")
_CHECK_ELEMENTS = 1 << 24  # values per chunk of the range check (64 MiB)


def repack(tokens: np.ndarray, bits: int, from_group: int, to_group: int
           ) -> np.ndarray:
  """Re-groups packed tokens [..., C/from_group] -> [..., C/to_group]."""
  if from_group == to_group:
    return np.asarray(tokens).astype(np.int32)
  if bits % to_group:
    raise ConfigError(f"arvm.group={to_group} must divide the BL-AE's "
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
def _missing(path: str) -> DataNotFoundError:
  return DataNotFoundError(
      f"{path} not found; run stage 'blae_encode' on a trained BL-AE first "
      f"(or set config.inputs.tokens_dir to the folder holding "
      f"tokens_*.json / tokens_*.npz)")


def _damaged(path: str, what: str) -> DataError:
  """The error for a token file that is there but unusable."""
  return DataError(f"{path} {what}; the token set is damaged or was not "
                   f"written by 'blae_encode': {_RERUN}")


def _reason(error: BaseException) -> str:
  """What a numpy / zip read error says, without numpy's advice to unpickle
  (a file that is neither .npy nor .npz is taken for a pickle)."""
  text = str(error)
  if "pickled" in text or "allow_pickle" in text:
    return "it holds neither the .npy nor the .npz format"
  return text


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_manifest(path: str, manifest) -> None:
  """Raises DataError unless ``manifest`` has every field, well typed."""
  if not isinstance(manifest, dict):
    raise _damaged(path, f"holds a JSON {type(manifest).__name__}, not a "
                   f"token manifest (an object)")
  missing = [k for k in ("grid", "bits", "group", "num_examples", "shards")
             if k not in manifest]
  if missing:
    raise _damaged(path, f"lacks the field(s) {missing}")
  grid, bits, group = manifest["grid"], manifest["bits"], manifest["group"]
  if not (isinstance(grid, list) and len(grid) == 2
          and all(_is_int(d) and d > 0 for d in grid)):
    raise _damaged(path, f"has grid={grid!r}, not [h, w] of positive ints")
  if not (_is_int(bits) and bits > 0 and _is_int(group) and group > 0
          and bits % group == 0):
    raise _damaged(path, f"has bits={bits!r} and group={group!r}: both must "
                   f"be positive ints and group must divide bits")
  if group > 30:
    raise _damaged(path, f"has group={group}: int32 tokens hold at most 30 "
                   f"bits each")
  if not (_is_int(manifest["num_examples"]) and manifest["num_examples"] >= 0):
    raise _damaged(path, f"has num_examples={manifest['num_examples']!r}, not "
                   f"an int >= 0")
  shards = manifest["shards"]
  ok = isinstance(shards, list) and bool(shards) and all(
      isinstance(x, dict) and isinstance(x.get("tokens"), str)
      and isinstance(x.get("labels"), str) and _is_int(x.get("start"))
      and _is_int(x.get("count")) and x["count"] >= 0 for x in shards)
  if not ok:
    raise _damaged(path, "has no valid 'shards' list (each entry: tokens, "
                   "labels, start, count)")


def _read_manifest(path: str) -> dict:
  if not os.path.exists(path):
    raise _missing(path)
  try:
    with open(path, "rb") as f:
      manifest = json.loads(f.read().decode("utf-8"))
  except (ValueError, OSError) as e:  # JSON or UTF-8 errors, unreadable
    raise _damaged(path, f"is not a readable JSON manifest ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
      or not _is_int(manifest.get("version")) or manifest["version"] > VERSION:
    got = manifest if not isinstance(manifest, dict) else {
        k: manifest.get(k) for k in ("format", "version")}
    raise DataError(f"{path} is not a version <= {VERSION} {FORMAT!r} "
                    f"manifest ({got}); {_RERUN}")
  _check_manifest(path, manifest)
  return manifest


def check_token_values(tokens: np.ndarray, group: int, path: str) -> None:
  """Raises DataError unless every token lies in ``[0, 2**group)``.

  Reads ``tokens`` (an array or memmap [n, ...]) in chunks of rows, so a
  memory-mapped shard is scanned once without being loaded whole.
  """
  n = len(tokens)
  if not n:
    return
  row = max(1, int(np.prod(tokens.shape[1:])))
  step = max(1, _CHECK_ELEMENTS // row)
  high = 1 << int(group)
  for start in range(0, n, step):
    chunk = np.asarray(tokens[start:start + step])
    lo, hi = int(chunk.min()), int(chunk.max())
    if lo < 0 or hi >= high:
      bad = start + int(np.argmax(((chunk < 0) | (chunk >= high)).reshape(
          len(chunk), -1).any(axis=1)))
      raise _damaged(path, f"holds token values in [{lo}, {hi}] (first bad "
                     f"row {bad}), but {group}-bit tokens lie in [0, "
                     f"{high - 1}]")


def check_labels(labels: np.ndarray, path: str) -> None:
  """Raises DataError if a label is negative (labels are class indices)."""
  if labels.size and int(labels.min()) < 0:
    raise _damaged(path, f"holds the label {int(labels.min())}; labels are "
                   f"class indices >= 0")


def _open_npy(path: str, manifest_file: str, expected: tuple[int, ...]
              ) -> np.memmap:
  """Memory-maps one shard and checks its shape and dtype."""
  if not os.path.exists(path):
    raise DataNotFoundError(
        f"shard {path} listed by {manifest_file} is missing: the token set "
        f"is incomplete; {_RERUN}")
  try:
    array = np.load(path, mmap_mode="r")
  except (ValueError, OSError, EOFError) as e:  # truncated, random bytes
    raise DataError(f"shard {path} listed by {manifest_file} is unreadable "
                    f"({_reason(e)}); {_RERUN}") from None
  if array.shape != expected or array.dtype != np.int32:
    raise DataError(
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
      raise DataError(f"{path}: shard {shard['tokens']} starts at {start}, "
                      f"not {starts[-1]}; {_RERUN}")
    tokens.append(_open_npy(os.path.join(folder, shard["tokens"]), path,
                            (count, h, w, tp)))
    labels.append(_open_npy(os.path.join(folder, shard["labels"]), path,
                            (count,)))
    starts.append(start + count)
  if starts[-1] != int(manifest["num_examples"]):
    raise DataError(f"{path}: the shards hold {starts[-1]} examples, not "
                    f"num_examples={manifest['num_examples']}; {_RERUN}")
  return tokens, labels, np.asarray(starts, np.int64)


def _check_shards(path: str, manifest: dict, tokens: list, labels: list
                  ) -> None:
  """The value checks of a manifest's shards (one pass over each)."""
  folder = os.path.dirname(os.path.abspath(path))
  group = int(manifest["group"])
  for shard, t, lab in zip(manifest["shards"], tokens, labels, strict=True):
    check_token_values(t, group, os.path.join(folder, shard["tokens"]))
    check_labels(np.asarray(lab), os.path.join(folder, shard["labels"]))


_NPZ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile)


def _npz_shape(path: str, key: str) -> tuple[int, ...]:
  """The shape of array ``key`` of an npz, from its header alone."""
  try:
    with zipfile.ZipFile(path) as z:
      if f"{key}.npy" not in z.namelist():
        names = sorted(n.removesuffix(".npy") for n in z.namelist())
        raise _damaged(path, f"lacks the array {key!r} (holds {names})")
      with z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        return tuple(header(f)[0])
  except DataError:
    raise
  except _NPZ_ERRORS as e:
    raise _damaged(path, f"is not a readable .npz ({_reason(e)})") from None


def _scalar_int(data: dict, key: str, path: str) -> int:
  value = np.asarray(data[key])
  if value.ndim or not np.issubdtype(value.dtype, np.integer):
    raise _damaged(path, f"holds {key}={value!r}, not an int")
  return int(value)


def _load_npz(path: str) -> dict:
  """A legacy ``tokens_{split}.npz`` read whole and checked."""
  if not os.path.exists(path):
    raise _missing(path)
  try:
    with np.load(path, allow_pickle=False) as f:
      out = {k: f[k] for k in f.files}
  except _NPZ_ERRORS as e:  # truncated, random bytes, object arrays
    raise _damaged(path, f"is not a readable .npz ({_reason(e)})") from None
  missing = [k for k in ("tokens", "labels", "bits") if k not in out]
  if missing:
    raise _damaged(path, f"lacks the array(s) {missing} (holds "
                   f"{sorted(out)})")
  tokens, labels = out["tokens"], out["labels"]
  bits = _scalar_int(out, "bits", path)
  if tokens.ndim != 4 or not np.issubdtype(tokens.dtype, np.integer):
    raise _damaged(path, f"holds tokens of {tokens.dtype} "
                   f"{list(tokens.shape)}, not integers [N, h, w, Tp]")
  if labels.shape != tokens.shape[:1] or not np.issubdtype(labels.dtype,
                                                           np.integer):
    raise _damaged(path, f"holds labels of {labels.dtype} "
                   f"{list(labels.shape)}, not integers [{len(tokens)}] "
                   f"(one per token grid)")
  tp = tokens.shape[-1]
  if bits < 1 or tp < 1 or bits % tp or bits // tp > 30:
    raise _damaged(path, f"holds bits={bits} with {tp} token(s) per "
                   f"position: bits must be a positive multiple of that, "
                   f"at most 30 bits per token")
  check_token_values(tokens, bits // tp, path)
  check_labels(labels, path)
  out["bits"] = bits
  out["tokens"] = tokens.astype(np.int32)
  out["labels"] = labels.astype(np.int32)
  out["blae_workdir"] = str(out.get("blae_workdir", ""))
  return out


def read_info(path: str) -> dict:
  """A token file's metadata without its tokens (either format): bits,
  group, grid, num_examples, checkpoint_step, blae_workdir, dataset, split
  (the last four as stored; -1 / '' when absent)."""
  if path.endswith(".npz"):
    if not os.path.exists(path):
      raise _missing(path)
    shape = _npz_shape(path, "tokens")  # [N, h, w, Tp]
    if len(shape) != 4 or not shape[-1]:
      raise _damaged(path, f"holds tokens of shape {list(shape)}, not "
                     f"[N, h, w, Tp]")
    try:
      with np.load(path) as f:  # lazy: reads only the arrays asked for
        if "bits" not in f.files:
          raise _damaged(path, f"lacks the array 'bits' (holds "
                         f"{sorted(f.files)})")
        get = (lambda k, d: f[k] if k in f.files else d)  # noqa: E731
        bits = _scalar_int({"bits": f["bits"]}, "bits", path)
        return {"bits": bits, "group": bits // shape[-1],
                "grid": [int(shape[1]), int(shape[2])],
                "num_examples": int(shape[0]),
                "checkpoint_step": int(get("checkpoint_step", -1)),
                "blae_workdir": str(get("blae_workdir", "")),
                "dataset": str(get("dataset", "")),
                "split": str(get("split", ""))}
    except DataError:
      raise
    except _NPZ_ERRORS as e:
      raise _damaged(path, f"is not a readable .npz ({_reason(e)})") from None
  m = _read_manifest(path)
  info = {k: m[k] for k in ("bits", "group", "grid", "num_examples")}
  info.update(checkpoint_step=m.get("checkpoint_step", -1),
              blae_workdir=m.get("blae_workdir", ""),
              dataset=m.get("dataset", ""), split=m.get("split", ""))
  return info


def load_tokens(path: str) -> dict:
  """Reads a whole token file into memory (either format), checked.

  Returns:
    ``tokens`` int32 [N, h, w, Tp] (as stored: Tp = 1 from 'blae_encode'),
    ``labels`` [N], ``bits`` (int), ``blae_workdir`` (str) and whatever else
    the file records (``grid``, ``checkpoint_step``, ``dataset``, ``split``,
    and ``group`` for a manifest).

  Raises:
    DataNotFoundError: the file or a shard is missing.
    DataError: naming the file that is damaged and how.
  """
  if path.endswith(".npz"):
    return _load_npz(path)
  manifest = _read_manifest(path)
  tokens, labels, _ = _open_shards(path, manifest)
  _check_shards(path, manifest, tokens, labels)
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
    check: scan every token once for values outside ``[0, 2**group)`` and
      negative labels (:class:`~mesp_jax.data.DataError`); copies made by
      unpickling (data-loader workers) skip the scan the original made.

  Raises:
    DataNotFoundError: the file or a shard is missing.
    DataError: the file or a shard is damaged (the message names it).
    ConfigError: ``group`` does not divide the tokens' bits.

  Attributes:
    bits, group, grid (h, w), labels (int32 [N], in memory), blae_workdir,
    name, path; ``shards``: the token arrays (np.memmap for a manifest).
  """

  def __init__(self, path: str, group: int, check: bool = True):
    self.path = path
    self.name = os.path.basename(path)
    self.group = int(group)
    if path.endswith(".npz"):
      data = _load_npz(path)  # checked whole (it is in memory anyway)
      self.bits = data["bits"]
      self.stored_group = self.bits // data["tokens"].shape[-1]
      self.shards = [data["tokens"]]
      self.labels = data["labels"]
      self.blae_workdir = data["blae_workdir"]
      self._starts = np.asarray([0, len(self.labels)], np.int64)
    else:
      manifest = _read_manifest(path)
      self.bits = int(manifest["bits"])
      self.stored_group = int(manifest["group"])
      self.shards, labels, self._starts = _open_shards(path, manifest)
      if check:
        _check_shards(path, manifest, self.shards, labels)
      self.labels = (np.concatenate([np.asarray(x) for x in labels])
                     if labels else np.zeros((0,), np.int32))
      self.blae_workdir = manifest.get("blae_workdir", "")
    if self.bits % self.group:
      raise ConfigError(f"arvm.group={self.group} must divide the BL-AE's "
                        f"{self.bits} bits per position ({path})")
    self.grid = tuple(int(d) for d in self.shards[0].shape[1:3])
    self.tokens_per_position = self.bits // self.group

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getstate__(self) -> dict:  # workers re-open the memmaps, not copy
    return {"path": self.path, "group": self.group}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["path"], state["group"], check=False)

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


def load_bank(config, limit: int = 0, split: str | None = None) -> Bank:
  """Reads the tokens of ``tokens.train_split`` at ``kernel.group`` bits.

  The split's manifest ``tokens_{split}.json`` is read if present, else a
  legacy ``tokens_{split}.npz``.

  Args:
    config: with ``inputs.{tokens_dir, blae_workdir}``,
      ``tokens.train_split`` and ``kernel.group``.
    limit: keep only the first ``limit`` entries (0 = all).
    split: another split to read the same way (held-out latents).
  """
  tokens_dir = config.inputs.tokens_dir
  if not tokens_dir:
    raise ConfigError("config.inputs.tokens_dir is empty: point it at the "
                      "folder of a 'blae_encode' run (it holds "
                      "tokens_train.json)")
  split = split or config.tokens.get("train_split", "train")
  path = tokens_path(tokens_dir, split)
  group = int(config.kernel.group)
  bits = read_info(path)["bits"]
  if bits % group:
    raise ConfigError(f"config.kernel.group={group} must divide the BL-AE's "
                      f"{bits} bits per position ({path})")
  source = TokenSource(path, group)
  n = min(limit, len(source)) if limit else len(source)
  tokens = source.read(np.arange(n))["tokens"]  # [N, h, w, Tp]
  blae_dir = config.inputs.get("blae_workdir") or source.blae_workdir
  if not blae_dir:
    raise ConfigError(f"{path} names no BL-AE workdir; set "
                      f"config.inputs.blae_workdir")
  return Bank(tokens=tokens.astype(np.int32), bits=bits, group=group,
              blae_workdir=blae_dir, path=path)
