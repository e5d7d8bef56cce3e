"""Configs: loading, one schema per section, and the defaults of every field.

A config is an ``ml_collections.ConfigDict`` made of sections (``train``,
``blae``, ``arvm``, ``sampler``, ``inputs``, ...). Each section has one schema
below: its fields, their defaults and the rule each value must satisfy. The
files in ``configs/`` build sections with :func:`section` (defaults plus
overrides) and each stage checks its whole config once, at entry, with
:func:`validate`: unknown fields (with a "did you mean"), missing fields, wrong
types and values out of range all fail before anything is compiled or
trained, with the field named and the allowed values.

``main.py`` loads configs with ``config_flags``; benchmarks and tests use
:func:`load_config` (``path.py:variant`` syntax).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from mesp_jax.base.gamma import parse_gamma


class ConfigError(ValueError):
  """A config value that no stage can run with; the message names the field."""


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'configs/x.py:variant'`` -> ``get_config('variant')`` of that file."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path!r}")
  module_spec = importlib.util.spec_from_file_location("_mesp_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


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
)

SCHEMA: dict[str, dict[str, Field]] = {
    "mesh": _fields(
        data=(-1, integer(-1), "data axis size; -1: all remaining devices"),
        fsdp=(1, POSITIVE, "fsdp axis size"),
        min_fsdp_size_mb=(4.0, number(0), "smallest tensor fsdp shards")),
    "data": _fields(
        name=("fashion_mnist", text, "fashion_mnist, mnist, cifar10, ..."),
        image_size=(32, POSITIVE, ""),
        data_dir=("", text, "tfds data dir ('' = default)"),
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
        eval_batch_size=(256, POSITIVE, "")),
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
        sigma_s=(0.5, number(0, above=True), "kernel target noise")),
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
        cache=("ring", choice("ring", "full", "none"), "neural decoder")),
    "kernel": _fields(
        group=(8, integer(1, 16), "bits per token g"),
        sigma_s=(0.3, number(0, above=True), "p_flip = Phi(-1/sigma_s)"),
        gamma=(3, gamma, "observation range"),
        order=("raster", choice("raster", "random"), ""),
        chunk_size=(8192, POSITIVE, "bank entries per device step")),
    "inputs": _fields(
        blae_workdir=("", text, "a stage 'blae' workdir"),
        tokens_dir=("", text, "a stage 'blae_encode' workdir"),
        arvm_workdir=("", text, "a stage 'arvm' workdir"),
        feature_net_workdir=("", text, "a stage 'train_feature_net' workdir"),
        samples=("", text, "a samples .npz")),
    "sweep": _fields(
        gammas=("0,1,2,3,5,global", text, "comma-separated gammas"),
        threshold_db=(25.0, number(0, above=True), "copy: PSNR >= this"),
        latent_threshold=(0.01, number(0), "latent copy: bit share"),
        train_examples=(0, COUNT, "0: the whole bank"),
        reference_split=("test", text, ""),
        reference_examples=(0, COUNT, "0: the whole split"),
        arvm_workdirs=("", text, "'gamma=workdir,...' neural ARVMs"),
        neural=(None, lambda v: None, "see section sweep.neural"),
        grid_samples=(64, POSITIVE, ""), triplet_rows=(16, POSITIVE, ""),
        decode_batch_size=(500, POSITIVE, ""),
        nn_chunk_size=(1024, POSITIVE, ""), cache_dir=("", text, "")),
    "sweep.neural": _fields(
        batch_size=(64, POSITIVE, ""), top_k=(0, COUNT, ""),
        top_p=(1.0, number(0, above=True, hi=1), ""),
        cfg_scale=(0.0, number(0), ""),
        cache=("ring", choice("ring", "full", "none"), "")),
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
    "mesp_study": ("mesh", "data", "model", "vae", "sigma_sweep", "train",
                   "study"),
}
TOP_LEVEL = _fields(stage=("", text, "which stage runs"),
                    seed=(0, SEED, "model init and data order"))


def section(section_name: str, /, **overrides) -> ml_collections.ConfigDict:
  """A section with its defaults and ``overrides`` (names are checked)."""
  name = section_name
  schema = SCHEMA[name]
  unknown = set(overrides) - set(schema)
  if unknown:
    raise ConfigError(f"{name}: unknown field(s) {sorted(unknown)}"
                      f"{_did_you_mean(sorted(unknown)[0], schema)}")
  values = {k: f.default for k, f in schema.items()}
  values.update(overrides)
  if name == "sweep" and values["neural"] is None:
    values["neural"] = section("sweep.neural")
  return ml_collections.ConfigDict(values)


def smoke(config: ml_collections.ConfigDict, **train) -> None:
  """Shrinks a config in place for tests and smoke runs (big_vision's
  ``runlocal``): a few tiny steps, synchronous checkpoints, no TensorBoard,
  64 eval examples. ``train`` overrides the shrunk train fields."""
  if "train" in config:
    config.train.update(dict(
        batch_size=16, num_steps=4, eval_every=4, checkpoint_every=4,
        log_every=2, warmup_steps=0, eval_batch_size=64,
        async_checkpoint=False, tensorboard=False), **train)
  for name in ("data", "tokens"):
    if name in config:
      config[name].eval_examples = 64


def _did_you_mean(name: str, options) -> str:
  close = difflib.get_close_matches(name, list(options), n=1)
  return f"; did you mean {close[0]!r}?" if close else ""


def _check_section(config: ml_collections.ConfigDict, name: str) -> None:
  schema = SCHEMA[name]
  node = config
  for part in name.split("."):
    node = node[part]
  if not isinstance(node, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f"config.{name} must be a section, got {node!r}")
  keys = set(node.keys())
  for key in sorted(keys - set(schema)):
    raise ConfigError(f"config.{name}.{key} is not a field of "
                      f"config.{name}{_did_you_mean(key, schema)} (fields: "
                      f"{', '.join(sorted(schema))})")
  for key in sorted(set(schema) - keys):
    raise ConfigError(f"config.{name}.{key} is missing (default "
                      f"{schema[key].default!r})")
  for key, field in schema.items():
    problem = field.rule(node[key])
    if problem:
      doc = f" ({field.doc})" if field.doc else ""
      raise ConfigError(f"config.{name}.{key}={node[key]!r} must be "
                        f"{problem}{doc}")


def validate(config: ml_collections.ConfigDict, stage: str,
             **context) -> None:
  """Checks the whole config for ``stage``; raises :class:`ConfigError`.

  Every section present is checked against its schema; the stage's own
  sections must be present; then the stage's cross-field rules run.
  ``context``: extra facts a rule needs (``sampler_kind``).
  """
  if stage == "pipeline":
    _check_pipeline(config)
    return
  if stage not in STAGE_SECTIONS:
    raise ConfigError(f"no schema for stage {stage!r}")
  for key in sorted(set(config.keys()) - set(SCHEMA) - set(TOP_LEVEL)):
    raise ConfigError(f"config.{key} is not a config section"
                      f"{_did_you_mean(key, list(SCHEMA) + list(TOP_LEVEL))}")
  for key, field in TOP_LEVEL.items():
    if key in config and field.rule(config[key]):
      raise ConfigError(f"config.{key}={config[key]!r} must be "
                        f"{field.rule(config[key])}")
  for name in STAGE_SECTIONS[stage]:
    if name not in config:
      raise ConfigError(f"stage {stage!r} needs the section config.{name}")
  for name in SCHEMA:
    head = name.split(".")[0]
    if head in config and (name == head or name.split(".")[1] in config[head]):
      _check_section(config, name)
  _RULES.get(stage, lambda c, **k: None)(config, **context)


def _need(config, field: str, what: str) -> None:
  section_name, key = field.split(".")
  if not config[section_name][key]:
    raise ConfigError(f"config.{field} is empty: {what}")


def _rules_blae(config, **_):
  b = config.blae
  if b.family == "downsample" and config.data.image_size % b.downsample_factor:
    raise ConfigError(
        f"config.data.image_size={config.data.image_size} must be divisible "
        f"by config.blae.downsample_factor={b.downsample_factor}")


def _rules_arvm(config, **_):
  a = config.arvm
  if a.d_model % a.num_heads:
    raise ConfigError(f"config.arvm.d_model={a.d_model} must be divisible by "
                      f"config.arvm.num_heads={a.num_heads}")
  _need(config, "inputs.tokens_dir",
        "point it at a 'blae_encode' workdir (it holds tokens_*.npz)")


def _rules_sample(config, sampler_kind: str = "neural", **_):
  if sampler_kind == "kernel":
    for name in ("kernel", "tokens"):
      if name not in config:
        raise ConfigError(f"the kernel sampler needs config.{name}")
    _need(config, "inputs.tokens_dir",
          "the kernel ARVM's bank is tokens_train.npz of a 'blae_encode' run")
  else:
    _need(config, "inputs.arvm_workdir", "point it at a trained 'arvm' run")


def _rules_sweep(config, **_):
  if config.sampler.num_samples < 2:
    raise ConfigError("config.sampler.num_samples must be >= 2 (a Frechet "
                      "distance needs two samples)")
  _need(config, "inputs.tokens_dir",
        "the kernel ARVM's bank is tokens_train.npz of a 'blae_encode' run")


def _rules_feature_net(config, **_):
  f = config.feature_net
  if any(w % f.num_groups for w in f.widths):
    raise ConfigError(f"config.feature_net.widths={tuple(f.widths)}: every "
                      f"width must be divisible by config.feature_net."
                      f"num_groups={f.num_groups}")


def _rules_evaluate(config, **_):
  _need(config, "inputs.samples",
        "give the path of an .npz holding 'images' [N, H, W, C] in [-1, 1]")
  _need(config, "inputs.feature_net_workdir",
        "train the classifier first (stage 'train_feature_net', e.g. "
        "configs/feature_net_fashion_mnist.py) and point this field at its "
        "workdir")


def _rules_mesp(config, **_):
  s, v = config.study, config.vae
  if s.num_nn_pairs + s.num_random_pairs == 0:
    raise ConfigError("config.study.num_nn_pairs and num_random_pairs are "
                      "both 0: there is nothing to measure")
  if not v.kl_weights and not v.calibrated_elbo:
    raise ConfigError("no VAE to train: config.vae.kl_weights is empty and "
                      "config.vae.calibrated_elbo is False")
  sigmas = [float(x) for x in config.sigma_sweep.sigmas]
  if s.primary_blae_sigma is not None and float(
      s.primary_blae_sigma) not in sigmas:
    raise ConfigError(f"config.study.primary_blae_sigma="
                      f"{s.primary_blae_sigma} is not in "
                      f"config.sigma_sweep.sigmas={tuple(sigmas)}")


def _check_pipeline(config) -> None:
  for key in sorted(set(config.keys()) - {"stage", "reencode", "blae",
                                          "arvm"}):
    raise ConfigError(f"config.{key} is not a field of a pipeline config "
                      f"(fields: stage, reencode, blae, arvm)")
  if flag(config.get("reencode", False)):
    raise ConfigError("config.reencode must be True or False")
  # The sub-stages check their own configs when they run; check the parts
  # that do not depend on upstream outputs now, before hours of training.
  validate(config.blae, "blae")
  arvm = ml_collections.ConfigDict(config.arvm.to_dict())
  arvm.inputs.tokens_dir = arvm.inputs.tokens_dir or "(set by the pipeline)"
  validate(arvm, "arvm")


_RULES = {"blae": _rules_blae, "arvm": _rules_arvm, "sample": _rules_sample,
          "gamma_sweep": _rules_sweep,
          "train_feature_net": _rules_feature_net,
          "evaluate": _rules_evaluate, "mesp_study": _rules_mesp}
