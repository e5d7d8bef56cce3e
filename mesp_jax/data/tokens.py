"""Token grids written by stage ``blae_encode``, as a random-access source."""

from __future__ import annotations

import os

import numpy as np

from mesp_jax.models import bits as bits_lib


def repack(tokens: np.ndarray, bits: int, from_group: int, to_group: int
           ) -> np.ndarray:
  """Re-groups packed tokens [..., C/from_group] -> [..., C/to_group]."""
  if from_group == to_group:
    return tokens.astype(np.int32)
  if bits % to_group:
    raise ValueError(f"arvm.group={to_group} must divide the BL-AE's "
                     f"{bits} bits per position")
  shifts = np.arange(from_group - 1, -1, -1)
  b = (tokens[..., None].astype(np.int64) >> shifts) & 1
  b = b.reshape(*tokens.shape[:-1], -1) * 2 - 1  # signed bits [..., C]
  return bits_lib.pack_numpy(b, to_group)


def load_tokens(path: str) -> dict:
  """Reads ``tokens_{split}.npz``: tokens int32 [N, h, w, 1], labels, bits."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found; run stage 'blae_encode' on a trained BL-AE first "
        f"(or set config.tokens.dir to the folder holding tokens_*.npz)")
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
