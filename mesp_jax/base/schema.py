"""The config schema: every section's fields, defaults and rules.

Each section (``train``, ``blae``, ``arvm``, ``sampler``, ``inputs``, ...) is a
dict of :class:`Field` (default, rule, doc). A rule returns None when a value
is fine, else a phrase saying what it must be. :mod:`mesp_jax.base.config`
builds sections from these defaults and validates configs against them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mesp_jax.base.gamma import parse_gamma

# --------------------------------------------------------------------------
# Rules: each returns None when the value is fine, else what it must be.
# --------------------------------------------------------------------------
Rule = Callable[[Any], str | None]


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
  def rule(v):
    if not _is_int(v) or (lo is not None and v < lo) or (
        hi is not None and v > hi):
      lo_s = "" if lo is None else f" >= {lo}"
      hi_s = "" if hi is None else f" <= {hi}"
      return f"an int{lo_s}{' and' if lo_s and hi_s else ''}{hi_s}"
    return None
  return rule


def number(lo: float | None = None, *, above: bool = False,
           hi: float | None = None, below: bool = False) -> Rule:
  """A float (ints accepted) in the given range."""
  def rule(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok and lo is not None:
      ok = v > lo if above else v >= lo
    if ok and hi is not None:
      ok = v < hi if below else v <= hi
    if not ok:
      parts = []
      if lo is not None:
        parts.append(f"{'>' if above else '>='} {lo}")
      if hi is not None:
        parts.append(f"{'<' if below else '<='} {hi}")
      return "a number" + (" " + " and ".join(parts) if parts else "")
    return None
  return rule


def choice(*allowed) -> Rule:
  def rule(v):
    return None if v in allowed else f"one of {list(allowed)}"
  return rule


def text(v) -> str | None:
  return None if isinstance(v, str) else "a string"


def flag(v) -> str | None:
  return None if isinstance(v, bool) else "True or False"


def gamma(v) -> str | None:
  try:
    parse_gamma(v)
  except ValueError:
    return "an int >= 0 or 'global'"
  return None


def sequence(item: Rule, min_len: int = 0) -> Rule:
  def rule(v):
    if not isinstance(v, (tuple, list)) or len(v) < min_len or any(
        item(x) is not None for x in v):
      least = f" (at least {min_len})" if min_len else ""
      return f"a tuple{least}, each item {item(object())}"
    return None
  return rule


def optional(rule: Rule) -> Rule:
  def opt(v):
    return None if v is None else rule(v)
  return opt


def axis_rules(v) -> str | None:
  """Logical sharding rules: pairs (logical name, mesh axes)."""
  msg = ("a sequence of (logical name, mesh axes) pairs, the axes None, one "
         "of 'data', 'fsdp', 'model' or a tuple of them; () for the default")
  if not isinstance(v, (tuple, list)):
    return msg
  for pair in v:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(
        pair[0], str):
      return msg
    axes = pair[1]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if not isinstance(axes, (tuple, list)) or any(
        a not in ("data", "fsdp", "model") for a in axes):
      return msg
  return None


POSITIVE = integer(1)
COUNT = integer(0)  # 0 often means "all"
SEED = integer(0)


@dataclasses.dataclass(frozen=True)
class Field:
  default: Any
  rule: Rule
  doc: str = ""


def _fields(**kw: tuple) -> dict[str, Field]:
  return {k: Field(*v) for k, v in kw.items()}


ARCHITECTURE = _fields(
    family=("downsample", choice("full_res", "downsample"),
            "full_res (the authors' design) or downsample"),
    width=(64, POSITIVE, "channels"),
    bits=(16, integer(1, 24), "bits per latent position C"),
    num_res_blocks=(2, COUNT, ""),
    stem_kernel=(7, POSITIVE, "full_res stem kernel"),
    downsample_factor=(4, choice(1, 2, 4, 8, 16), "downsample family f"),
    channel_mult=((1,), sequence(POSITIVE, 1), "width multiplier per stage"),
    conv=("xla", choice("xla", "im2col", "auto"),
          "convolution implementation (same parameters and results)"),
    norm=("none", choice("none", "group"),
          "residual blocks with GroupNorm (VQGAN-style) or none"),
    num_groups=(32, POSITIVE, "GroupNorm groups (norm='group')"),
    dtype=("float32", choice("float32", "bfloat16"),
           "compute dtype; parameters stay float32"),
)

SCHEMA: dict[str, dict[str, Field]] = {
    "mesh": _fields(
        data=(-1, integer(-1), "data axis size; -1: all remaining devices"),
        fsdp=(1, POSITIVE, "fsdp axis size"),
        model=(1, POSITIVE, "model (tensor-parallel) axis size"),
        rules=((), axis_rules, "logical axis -> mesh axes for annotated "
               "parameters and activations; (): the default rules"),
        min_fsdp_size_mb=(4.0, number(0), "smallest tensor fsdp shards "
                          "(parameters without logical names)")),
    "data": _fields(
        name=("fashion_mnist", text,
              "fashion_mnist, mnist, cifar10, celeb_a, imagenet2012, folder"),
        image_size=(32, POSITIVE, ""),
        data_dir=("", text, "tfds data dir ('' = default); for 'folder' the "
                  "root (one sub-folder per class, optional split folders)"),
        channels=(0, choice(0, 1, 3), "0: the data set's own (folder: 3)"),
        pipeline=("auto", choice("auto", "grain", "memory"),
                  "auto: grain for encoded images (imagenet2012, folder), "
                  "the in-memory loader for the small sets"),
        workers=(0, COUNT, "grain decode processes (0: in this process)"),
        augment=("none", choice("none", "inception"),
                 "training crops: none (resize-small + centre crop) or "
                 "Inception random-resized crop"),
        crop_min_scale=(0.08, number(0, above=True, hi=1),
                        "smallest crop area share (augment=inception)"),
        flip=(True, flag, "random horizontal flips (augment=inception)"),
        fashion_mnist_dir=("/usr/share/datasets/fashion-mnist", text, ""),
        train_split=("train", text, ""), eval_split=("test", text, ""),
        eval_examples=(0, COUNT, "0: the whole eval split")),
    "train": _fields(
        batch_size=(128, POSITIVE, "global batch"),
        num_steps=(10_000, POSITIVE, ""),
        learning_rate=(1e-4, number(0, above=True), ""),
        warmup_steps=(0, COUNT, ""),
        schedule=("constant", choice("constant", "cosine"), ""),
        grad_clip=(0.0, number(0), "0: off"),
        weight_decay=(0.0, number(0), "0: Adam, else AdamW"),
        b1=(0.9, number(0, hi=1, below=True), ""),
        b2=(0.999, number(0, hi=1, below=True), ""),
        log_every=(50, POSITIVE, ""),
        eval_every=(1000, COUNT, "0: at the end"),
        checkpoint_every=(1000, COUNT, "0: at the end"),
        visualize_every=(0, COUNT, "0: with eval"),
        keep_checkpoints=(3, POSITIVE, ""),
        async_checkpoint=(True, flag, ""), tensorboard=(True, flag, ""),
        eval_batch_size=(256, POSITIVE, ""),
        grad_accum_steps=(1, POSITIVE, "micro-batches per step (sums to "
                          "batch_size)"),
        ema_decay=(0.0, number(0, hi=1, below=True),
                   "0: off; else EMA of the parameters, used for eval, "
                   "encoding and sampling"),
        nan_guard=("stop", choice("stop", "skip", "off"),
                   "a step whose loss, gradient or new parameters are not "
                   "finite keeps the old state; stop: then stop the run, "
                   "skip: go on (stop after max_skipped_steps in a row)"),
        max_skipped_steps=(10, POSITIVE, "nan_guard='skip': consecutive "
                           "skipped steps before the run stops")),
    "blae": dict(ARCHITECTURE, **_fields(
        sigma=(1.0, number(0), "training noise"),
        sigma_start=(1.0, number(0), "noise at step 0 (linear ramp)"),
        sigma_ramp_steps=(0, COUNT, ""),
        beta=(0.0, number(0), "weight of mean(z^2)"))),
    "encode": _fields(
        splits=(("train", "test"), sequence(text, 1), ""),
        batch_size=(500, POSITIVE, "")),
    "arvm": _fields(
        group=(8, integer(1, 16), "bits per token g (2^g-bin histogram)"),
        gamma=(3, gamma, "observation range: int >= 0 or 'global'"),
        num_layers=(4, POSITIVE, ""), d_model=(128, POSITIVE, "model width"),
        num_heads=(4, POSITIVE, ""),
        mlp_ratio=(4.0, number(0, above=True), ""),
        num_classes=(10, COUNT, "0: unconditional"),
        label_drop=(0.1, number(0, hi=1, below=True), "null-label rate"),
        embed=("linear+table", choice("linear", "linear+table"), ""),
        dtype=("float32", choice("float32", "bfloat16"), "activations"),
        target=("onehot", choice("onehot", "kernel"), "training target"),
        sigma_s=(0.5, number(0, above=True), "kernel target noise"),
        attention=("dense", choice("dense", "block_local", "auto"),
                   "full-pass attention (same parameters and results)"),
        scan_layers=(False, flag, "one nn.scan over the blocks (fast "
                     "compile; stacked parameters)"),
        remat=("none", choice("none", "full", "dots", "dots_no_batch"),
               "recompute block intermediates in the backward pass")),
    "tokens": _fields(
        train_split=("train", text, ""), eval_split=("test", text, ""),
        eval_examples=(0, COUNT, "0: the whole eval split")),
    "sampler": _fields(
        kind=("neural", choice("neural", "kernel"), ""),
        num_samples=(64, POSITIVE, ""),
        batch_size=(64, POSITIVE, "samples per jitted call"),
        seed=(0, SEED, "batch b uses fold_in(key(seed), b)"),
        temperature=(1.0, number(0), "0: most likely token"),
        top_k=(0, COUNT, "neural; 0: off"),
        top_p=(1.0, number(0, above=True, hi=1), "neural; 1: off"),
        cfg_scale=(0.0, number(0), "neural; classifier-free guidance"),
        cache=("ring", choice("ring", "full", "none"), "neural decoder"),
        order=("raster", choice("raster", "wavefront"),
               "neural decoding order (same tokens for a seed)"),
        dtype=("", choice("", "float32", "bfloat16"),
               "neural activations and KV cache; '': the ARVM's own")),
    "kernel": _fields(
        group=(8, integer(1, 16), "bits per token g"),
        sigma_s=(0.3, number(0, above=True), "p_flip = Phi(-1/sigma_s)"),
        gamma=(3, gamma, "observation range"),
        order=("raster", choice("raster", "random", "wavefront"),
               "wavefront: same tokens as raster in fewer steps"),
        chunk_size=(8192, POSITIVE, "bank entries per device step")),
    "inputs": _fields(
        blae_workdir=("", text, "a stage 'blae' workdir"),
        tokens_dir=("", text, "a stage 'blae_encode' workdir"),
        arvm_workdir=("", text, "a stage 'arvm' workdir"),
        feature_net_workdir=("", text, "a stage 'train_feature_net' workdir"),
        samples=("", text, "a samples .npz"),
        allow_changed=(False, flag, "resume or consume although an input "
                       "changed since this workdir was made (see "
                       "<stage>_provenance.json)")),
    "sweep": _fields(
        gammas=("0,1,2,3,5,global", text, "comma-separated gammas"),
        threshold_db=(25.0, number(0, above=True), "copy: PSNR >= this"),
        latent_threshold=(0.01, number(0), "latent copy: bit share"),
        train_examples=(0, COUNT, "0: the whole bank"),
        reference_split=("test", text, ""),
        reference_examples=(0, COUNT, "0: the whole split"),
        pr_examples=(2000, COUNT, "reference images of precision / recall "
                     "(the first ones; 0: none)"),
        bits_examples=(2000, COUNT, "held-out latents (the first ones of "
                       "tokens.eval_split) the kernel ARVM's bits per token "
                       "is measured on; 0: none"),
        arvm_workdirs=("", text, "'gamma=workdir,...' neural ARVMs"),
        neural=(None, lambda v: None, "see section sweep.neural"),
        grid_samples=(64, POSITIVE, ""), triplet_rows=(16, POSITIVE, ""),
        decode_batch_size=(500, POSITIVE, ""),
        nn_chunk_size=(1024, POSITIVE, ""), cache_dir=("", text, "")),
    "sweep.neural": _fields(
        batch_size=(64, POSITIVE, ""), top_k=(0, COUNT, ""),
        top_p=(1.0, number(0, above=True, hi=1), ""),
        cfg_scale=(0.0, number(0), ""),
        cache=("ring", choice("ring", "full", "none"), ""),
        order=("raster", choice("raster", "wavefront"), "")),
    "feature_net": _fields(
        num_classes=(10, POSITIVE, ""),
        widths=((16, 32, 64, 128), sequence(POSITIVE, 1), ""),
        feature_dim=(256, POSITIVE, ""), num_groups=(8, POSITIVE, ""),
        dropout_rate=(0.0, number(0, hi=1, below=True), ""),
        reference_splits=(("train", "test"), sequence(text, 1), ""),
        reference_examples=(0, COUNT, "0: the whole split"),
        reference_max_features=(10_000, COUNT, "raw rows kept for KID/P&R"),
        feature_batch_size=(500, POSITIVE, "")),
    "evaluate": _fields(
        max_samples=(0, COUNT, "0: all"), batch_size=(500, POSITIVE, ""),
        kid_subsets=(100, POSITIVE, ""), kid_subset_size=(1000, POSITIVE, ""),
        pr_k=(3, POSITIVE, ""), seed=(0, SEED, ""),
        copy_rate=(True, flag, ""),
        copy_rate_train_examples=(0, COUNT, "0: whole train split"),
        copy_threshold_db=(25.0, number(0, above=True), ""),
        inception_weights=("", text, "FID Inception-v3 file; '': no FID"),
        inception_cache_dir=("", text, "default: the feature-net workdir"),
        inception_reference_examples=(10_000, COUNT, ""),
        inception_batch_size=(50, POSITIVE, ""),
        output=("eval.json", text, "")),
    "model": ARCHITECTURE,
    "vae": _fields(
        kl_weights=((1e-4, 1e-3, 1e-2, 1e-1, 1.0), sequence(number(0)), ""),
        calibrated_elbo=(True, flag, "add the VAE at its calibrated ELBO")),
    "sigma_sweep": _fields(
        sigmas=((0.1, 1.0), sequence(number(0, above=True)), "BL-AE noises"),
        beta=(0.0, number(0), "")),
    "study": _fields(
        primary_blae_sigma=(0.1, optional(number(0, above=True)), ""),
        heldout_split=("test", text, ""), num_heldout=(1000, POSITIVE, ""),
        num_nn_pairs=(96, COUNT, ""), num_random_pairs=(96, COUNT, ""),
        rec_samples=(16, integer(2), "posterior draws per image"),
        overlap_samples=(4096, POSITIVE, ""),
        overlap_proposal=("geometric", choice("geometric", "mixture", "p"),
                          ""),
        decode_batch_size=(64, POSITIVE, ""), seed=(0, SEED, ""),
        fail_on_violation=(True, flag, "")),
}

# The sections each stage reads (others may be present and are checked too).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "blae": ("mesh", "data", "blae", "train"),
    "blae_encode": ("mesh", "encode", "inputs"),
    "arvm": ("mesh", "inputs", "tokens", "arvm", "train", "sampler"),
    "sample": ("mesh", "inputs", "sampler"),
    "gamma_sweep": ("mesh", "inputs", "tokens", "kernel", "sampler", "sweep"),
    "train_feature_net": ("mesh", "data", "feature_net", "train"),
    "evaluate": ("mesh", "inputs", "evaluate"),
    "score": ("mesh", "inputs", "sampler", "evaluate"),
    "mesp_study": ("mesh", "data", "model", "vae", "sigma_sweep", "train",
                   "study"),
}
TOP_LEVEL = _fields(stage=("", text, "which stage runs"),
                    seed=(0, SEED, "model init and data order"))
