"""Token grids written by stage ``blae_encode``, as a random-access source."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from mesp_jax.base import bits as bits_lib


def repack(tokens: np.ndarray, bits: int, from_group: int, to_group: int
           ) -> np.ndarray:
  """Re-groups packed tokens [..., C/from_group] -> [..., C/to_group]."""
  if from_group == to_group:
    return tokens.astype(np.int32)
  if bits % to_group:
    raise ValueError(f"arvm.group={to_group} must divide the BL-AE's "
                     f"{bits} bits per position")
  b = bits_lib.unpack(tokens, from_group, np.int8, xp=np)  # [..., C] +-1
  return bits_lib.pack(b, to_group, xp=np)


def load_tokens(path: str) -> dict:
  """Reads ``tokens_{split}.npz``: tokens int32 [N, h, w, 1], labels, bits."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found; run stage 'blae_encode' on a trained BL-AE first "
        f"(or set config.inputs.tokens_dir to the folder holding tokens_*.npz)")
  with np.load(path) as f:
    out = {k: f[k] for k in f.files}
  out["bits"] = int(out["bits"])
  out["blae_workdir"] = str(out.get("blae_workdir", ""))
  return out


class TokenSource:
  """Random-access source of ``{'tokens': [n, h, w, Tp], 'label': [n]}``."""

  def __init__(self, path: str, group: int):
    data = load_tokens(path)
    self.bits = data["bits"]
    self.group = group
    self.tokens = repack(data["tokens"], self.bits, self.bits, group)
    self.labels = data["labels"].astype(np.int32)
    self.grid = tuple(self.tokens.shape[1:3])
    self.blae_workdir = data["blae_workdir"]
    self.name = os.path.basename(path)

  def __len__(self) -> int:
    return len(self.tokens)

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    return {"tokens": self.tokens[indices], "label": self.labels[indices]}


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


def load_bank(config, limit: int = 0) -> Bank:
  """Reads ``tokens_{train_split}.npz`` and regroups it to ``kernel.group``.

  Args:
    config: with ``inputs.{tokens_dir, blae_workdir}``,
      ``tokens.train_split`` and ``kernel.group``.
    limit: keep only the first ``limit`` entries (0 = all).
  """
  tokens_dir = config.inputs.tokens_dir
  if not tokens_dir:
    raise ValueError("config.inputs.tokens_dir is empty: point it at the "
                     "folder of a 'blae_encode' run (it holds "
                     "tokens_train.npz)")
  split = config.tokens.get("train_split", "train")
  path = os.path.join(tokens_dir, f"tokens_{split}.npz")
  data = load_tokens(path)
  group = int(config.kernel.group)
  if data["bits"] % group:
    raise ValueError(f"config.kernel.group={group} must divide the BL-AE's "
                     f"{data['bits']} bits per position")
  raw = data["tokens"][:limit] if limit else data["tokens"]
  tokens = repack(raw, data["bits"], data["bits"], group)  # [N, h, w, Tp]
  blae_dir = config.inputs.get("blae_workdir") or data["blae_workdir"]
  if not blae_dir:
    raise ValueError(f"{path} names no BL-AE workdir; set "
                     f"config.inputs.blae_workdir")
  return Bank(tokens=tokens.astype(np.int32), bits=data["bits"], group=group,
              blae_workdir=blae_dir, path=path)
