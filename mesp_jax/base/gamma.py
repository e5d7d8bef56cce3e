"""The observation range gamma: one grammar for configs, flags and files.

gamma is a non-negative int (the Chebyshev radius of the window) or global
(every generated token is context). Accepted spellings: an int, a string of
digits (``--config.arvm.gamma=3``), ``None`` or ``'global'`` (any case).
Everything else is an error that says what is accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

GLOBAL = "global"

Gamma = int | None  # None = global


def parse_gamma(gamma: Any) -> Gamma:
  """An int >= 0 or None (global) from any accepted spelling.

  Raises:
    ValueError: naming the value and the accepted spellings.
  """
  if gamma is None:
    return None
  if isinstance(gamma, str):
    text = gamma.strip()
    if text.lower() == GLOBAL:
      return None
    if text.isdigit():
      return int(text)
  elif not isinstance(gamma, bool) and hasattr(gamma, "__index__"):
    value = int(gamma)  # int, np.integer
    if value >= 0:
      return value
  raise ValueError(f"gamma={gamma!r}: expected an int >= 0 or 'global'")


def gamma_label(gamma: Any) -> str:
  """The text form: 'global' or the int as a string ('3')."""
  value = parse_gamma(gamma)
  return GLOBAL if value is None else str(value)


def parse_gammas(spec: str | Sequence) -> list[Gamma]:
  """'0,1,2,global' or a sequence -> [0, 1, 2, None] (order kept).

  Raises:
    ValueError: an empty list, a bad value or a duplicate.
  """
  items = ([s.strip() for s in spec.split(",") if s.strip()]
           if isinstance(spec, str) else list(spec))
  if not items:
    raise ValueError("the gamma list is empty; give e.g. '0,1,2,3,5,global'")
  gammas = [parse_gamma(g) for g in items]
  labels = [gamma_label(g) for g in gammas]
  if len(set(labels)) != len(labels):
    raise ValueError(f"the gamma list has duplicates: {labels}")
  return gammas


def covers_grid(gamma: Gamma, height: int, width: int) -> bool:
  """Whether a window of radius gamma reaches every position of the grid."""
  return gamma is None or gamma >= max(height, width) - 1
