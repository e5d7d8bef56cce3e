"""Plots a BL-AE run's binarisation curve from its ``metrics.jsonl``.

  python -m mesp_jax.experiments.blae_curve --workdir=runs/blae \
      --out=docs/blae_binarisation.png

Left: test bin rate (share of |z| >= 0.9) and train bin rate against steps,
with the noise level sigma. Right: test PSNR decoded from the sign bits and
from the continuous code against steps.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mesp_jax.train.metrics import read_metrics  # noqa: E402


def plot(workdir: str, out: str, title: str = "") -> None:
  train = read_metrics(workdir, "train")
  evals = read_metrics(workdir, "eval")
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.plot([r["step"] for r in train], [r["bin_rate"] for r in train],
           label="bin rate (train batches)", alpha=0.6)
  ax1.plot([r["step"] for r in evals], [r["bin_rate"] for r in evals], "o-",
           label="bin rate (test)")
  ax1.axhline(0.9, color="grey", ls=":", lw=1)
  ax1.set_xlabel("step")
  ax1.set_ylabel("share of |z| >= 0.9")
  ax1.set_ylim(0, 1)
  if "sigma" in train[0]:
    ax1b = ax1.twinx()
    ax1b.plot([r["step"] for r in train], [r["sigma"] for r in train],
              color="tab:red", ls="--", lw=1, label="sigma (noise)")
    ax1b.set_ylabel("sigma", color="tab:red")
  ax1.legend(loc="lower right")
  ax2.plot([r["step"] for r in evals], [r["psnr"] for r in evals], "o-",
           label="PSNR from sign bits")
  ax2.plot([r["step"] for r in evals], [r["psnr_continuous"] for r in evals],
           "s--", label="PSNR from continuous code")
  ax2.set_xlabel("step")
  ax2.set_ylabel("test PSNR (dB, 0..255 scale)")
  ax2.legend()
  fig.suptitle(title or f"BL-AE binarisation: {workdir}")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--title", default="")
  args = parser.parse_args(argv)
  plot(args.workdir, args.out, args.title)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
