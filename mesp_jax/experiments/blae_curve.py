"""Plots a BL-AE run's binarisation curve from its ``metrics.jsonl``.

  python -m mesp_jax.experiments.blae_curve --workdir=runs/blae \
      --out=docs/blae_binarisation.png

Left: test bin rate (share of |z| >= 0.9) and train bin rate against steps,
with the noise level sigma. Right: test PSNR decoded from the sign bits and
from the continuous code against steps.
"""

from __future__ import annotations

import argparse

from mesp_jax.experiments.plots import plot_blae_curve


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--title", default="")
  args = parser.parse_args(argv)
  plot_blae_curve(args.workdir, args.out, args.title)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
