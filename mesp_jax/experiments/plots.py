"""Figures of the experiments (matplotlib, Agg; imported lazily).

* :func:`plot_sweep`: copy rates and the Frechet distance against the
  observation range gamma (stage ``gamma_sweep``);
* :func:`plot_lch`: the same for several series, kernel and neural ARVMs
  (stage ``lch_study``);
* :func:`plot_mesp_study`: mean pair loss and bound against the mean
  posterior overlap (stage ``mesp_study``);
* :func:`plot_blae_curve`: a BL-AE run's binarisation curve from its
  ``metrics.jsonl`` (CLI: :mod:`mesp_jax.experiments.blae_curve`).
"""

from __future__ import annotations

import io as _io
import math
from collections.abc import Sequence

from mesp_jax.base import io
from mesp_jax.base.gamma import GLOBAL
from mesp_jax.experiments.mesp_overlap import model_label
from mesp_jax.train.metrics import read_metrics
from mesp_jax.train.vae import ELBO

# Copy rates drawn in the plot: (result key, legend label).
PLOT_RATES = (("copy_rate_latent", "latent (<= 1 % bits)"),
              ("copy_rate_recon", "vs BL-AE reconstructions"),
              ("copy_rate", "vs training images"))


# ---------------------------------------------------------------------------
# The gamma sweep.
# ---------------------------------------------------------------------------


def _png(fig, title: str) -> bytes:
  """PNG bytes of a finished figure (suptitle ``title``); closes it."""
  import matplotlib.pyplot as plt
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  buf = _io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


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
  return _png(fig, title)


def plot_lch(rows: Sequence[dict], distance_name: str, reference: dict,
             title: str) -> bytes:
  """PNG bytes of stage ``lch_study``: four panels against gamma, one line
  per series (the kernel ARVM at each sigma_s, the neural ARVM): the copy
  rate against BL-AE reconstructions, the latent copy rate, the distance of
  all samples (the same-size references dashed) and the held-out bits per
  token (rows without it are left out of that panel)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = list(dict.fromkeys(r["gamma"] for r in rows))
  pos = gamma_positions(labels)
  ticks = sorted(pos, key=pos.get)
  panels = (("copy_rate_recon", "copy rate vs BL-AE reconstructions"),
            ("copy_rate_latent", "latent copy rate (<= 1 % bits)"),
            (distance_name, f"{distance_name} of all samples"),
            ("bits_per_token", "held-out bits per token"))
  fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
  for n, series in enumerate(dict.fromkeys(r["series"] for r in rows)):
    mine = sorted((r for r in rows if r["series"] == series),
                  key=lambda r: pos[r["gamma"]])
    neural = series == "neural"
    for ax, (key, _) in zip(axes, panels, strict=True):
      pts = [r for r in mine if r.get(key) is not None]
      ax.plot([pos[r["gamma"]] for r in pts], [r[key] for r in pts],
              "--" if neural else "-", marker="s" if neural else "o",
              color="k" if neural else f"C{n}", label=series)
  for key, style in (("train_images", ":"), ("train_recons", "-.")):
    if reference.get(key) is not None:
      axes[2].axhline(reference[key], color="grey", linestyle=style,
                      label=f"{key.replace('_', ' ')} (same size)")
  for ax, (key, name) in zip(axes, panels, strict=True):
    ax.set_xticks([pos[t] for t in ticks], ticks)
    ax.set_xlabel("observation range gamma")
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
    if key.startswith("copy_rate"):
      ax.set_ylim(-0.03, 1.03)
  bits = [r["bits_per_token"] for r in rows if r.get("bits_per_token")]
  if bits and max(bits) > 10 * min(bits):
    axes[3].set_yscale("log")
  axes[2].legend(fontsize=7)
  return _png(fig, title)


# ---------------------------------------------------------------------------
# The MESP study.
# ---------------------------------------------------------------------------


def plot_mesp_study(results: list[dict], path: str, title: str = "",
         floor: float = -80.0, zoom_floor: float = -8.0,
         highlight: Sequence[str] = ()) -> None:
  """Mean L_rec (filled) and mean bound (open) against the mean overlap.

  One column per pair set. Top row: the whole range, log10 axes computed
  in log space (values below float64 are placed correctly); values under
  ``10^floor`` are drawn at the floor and listed with their exponents.
  Bottom row: a zoom on overlaps above ``10^zoom_floor``, where the bound
  is not negligible. The grey line is ``OVL * mean ||x_i - x_j||^2 / 4``
  (the family the bound points lie near), the dashed line its value at
  OVL = 1. A '*' marks a Monte Carlo overlap whose median relative error
  exceeds 0.5 (its true value is below the Bhattacharyya bound in the JSON).
  Models named in ``highlight`` (the comparison) get large, black-edged
  markers.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter

  sets = list(results[0]["pairs"])
  fig, axes = plt.subplots(2, len(sets), figsize=(6.4 * len(sets), 9.4),
                           squeeze=False,
                           gridspec_kw={"height_ratios": [1.0, 0.8]})
  swept = [m for m in results
           if m["kind"] == "vae" and m["kl_weight"] != ELBO]
  blaes = [m for m in results if m["kind"] == "blae"]
  cmap = plt.get_cmap("viridis")
  reds = plt.get_cmap("Reds")
  power = FuncFormatter(lambda v, _: f"$10^{{{v:g}}}$")

  def color_of(m):
    if m["kind"] == "blae":
      return reds(0.95 - 0.45 * blaes.index(m) / max(len(blaes) - 1, 1))
    if m["kl_weight"] == ELBO:
      return "black"
    return cmap(swept.index(m) / max(len(swept) - 1, 1) * 0.9)

  def draw(ax, set_name, lo, zoom):
    first = results[0]["pairs"][set_name]
    half_sq = math.log10(first["mean_sq_dist"] / 4)
    ax.plot([lo, 0.0], [lo + half_sq, half_sq], "-", color="0.75", lw=1,
            zorder=0, label=r"OVL $\cdot$ mean $\|x_i-x_j\|^2/4$")
    ax.axhline(half_sq, ls="--", color="0.6", lw=1,
               label=r"mean $\|x_i-x_j\|^2/4$ (bound at OVL = 1)")
    off_scale = []
    y_top = half_sq
    for m in results:
      s = m["pairs"][set_name]
      color = color_of(m)
      x_true, b_true = s["log10_mean_overlap"], s["log10_mean_bound"]
      y_rec = math.log10(s["mean_l_rec"])
      y_top = max(y_top, y_rec)
      star = "" if s["overlap_estimate_reliable"] else "*"
      if zoom and x_true < lo:
        continue
      x, y_bound = max(x_true, lo), max(b_true, lo)
      ax.plot([x, x], [y_bound, y_rec], ":", color=color, lw=1)
      big = m["name"] in highlight
      ax.plot(x, y_rec, "o", color=color, ms=12 if big else 8, alpha=0.85,
              mec="k" if big else color, mew=1.5 if big else 1)
      ax.plot(x, y_bound, "v", mfc="none", color=color, ms=12 if big else 8,
              mew=1.8 if big else 1)
      if x_true < lo or b_true < lo:
        off_scale.append((f"{model_label(m)}{star}: OVL $10^{{{x_true:.0f}}}$, "
                          f"bound $10^{{{b_true:.0f}}}$", color))
      elif zoom:  # BL-AE labels to the right, VAE labels to the left
        right = m["kind"] == "blae"
        ax.annotate(model_label(m) + star, (x, y_bound),
                    textcoords="offset points", xytext=(8 if right else -8, -4),
                    fontsize=8, color=color, ha="left" if right else "right")
      elif x < zoom_floor:  # the rest is labelled in the zoom
        ax.annotate(model_label(m) + star, (x, y_rec), textcoords="offset points",
                    xytext=(4, 7 + 14 * (results.index(m) % 2)),
                    fontsize=7.5, color=color, rotation=25)
    for k, (text, color) in enumerate(off_scale):
      ax.annotate(text, (lo, lo), textcoords="offset points",
                  xytext=(10, 6 + 11 * k), fontsize=7.5, color=color)
    ax.plot([], [], "ko", label="measured $L_{rec}$ (mean over pairs)")
    if highlight:
      ax.plot([], [], "o", color="0.8", mec="k", mew=1.5, ms=10,
              label="the comparison: ELBO VAE vs BL-AE (mesp_study.md)")
    ax.plot([], [], "kv", mfc="none",
            label=r"bound OVL $\|x_i-x_j\|^2/4$ (mean over pairs)")
    pad = 0.04 * -lo
    ax.set_xlim(lo - pad, pad)
    ax.set_ylim(lo - 2 * pad, y_top + 4 * pad + 0.5)
    ax.xaxis.set_major_formatter(power)
    ax.yaxis.set_major_formatter(power)
    ax.grid(alpha=0.3)
    ax.set_ylabel("pair loss (squared error summed over pixels)")
    name = "nearest-neighbour" if set_name == "nn" else set_name
    if zoom:
      ax.set_title(f"{name} pairs: zoom on OVL > $10^{{{lo:g}}}$",
                   fontsize=10)
      ax.set_xlabel("mean posterior overlap OVL$(q_i, q_j)$")
    else:
      ax.set_title(f"{name} pairs ({first['num_pairs']})")
      ax.set_xlabel(f"mean posterior overlap OVL$(q_i, q_j)$ (values below "
                    f"$10^{{{lo:g}}}$ drawn at the edge)")
      ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 0.16))

  for col, set_name in enumerate(sets):
    draw(axes[0, col], set_name, floor, zoom=False)
    draw(axes[1, col], set_name, zoom_floor, zoom=True)
  fig.suptitle(title or "MESP: reconstruction floor vs posterior overlap",
               fontsize=11)
  fig.tight_layout()
  if io.is_writer():
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    io.atomic_write_bytes(path, buf.getvalue())
  plt.close(fig)


# ---------------------------------------------------------------------------
# The BL-AE binarisation curve.
# ---------------------------------------------------------------------------


def plot_blae_curve(workdir: str, out: str, title: str = "") -> None:
  """Writes the binarisation curve of the BL-AE run in ``workdir`` to ``out``.

  Left: test and train bin rate (share of |z| >= 0.9) against steps, with
  the noise level sigma. Right: test PSNR decoded from the sign bits and from
  the continuous code against steps.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

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
