"""Configs: loading, one schema per section, and the defaults of every field.

A config is an ``ml_collections.ConfigDict`` made of sections (``train``,
``blae``, ``arvm``, ``sampler``, ``inputs``, ...). Each section has one schema
in :mod:`mesp_jax.base.schema`: its fields, their defaults and the rule each
value must satisfy. The files in ``configs/`` build sections with
:func:`section` (defaults plus overrides) and each stage checks its whole
config once, at entry, with :func:`validate`: unknown fields (with a "did
you mean"), missing fields, wrong types and values out of range all fail
before anything is compiled or trained, with the field named and the allowed
values.

``main.py`` loads configs with ``config_flags``; benchmarks and tests use
:func:`load_config` (``path.py:variant`` syntax).
"""

from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections

from mesp_jax.base.schema import (
    COUNT,
    SCHEMA,
    STAGE_SECTIONS,
    TOP_LEVEL,
    Field,
    flag,
)

__all__ = ["SCHEMA", "STAGE_SECTIONS", "TOP_LEVEL", "ConfigError", "Field",
           "check_fields", "load_config", "section", "smoke", "validate"]


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


def check_fields(node, name: str, fields) -> None:
  """Checks only ``fields`` of section ``name`` (a builder's own inputs).

  For code that builds a model from part of a section (``build_arvm`` from
  a saved or hand-made config) with the same rules as :func:`validate`.
  """
  schema = SCHEMA[name]
  for key in fields:
    if key not in node:
      raise ConfigError(f"config.{name}.{key} is missing (default "
                        f"{schema[key].default!r})")
    problem = schema[key].rule(node[key])
    if problem:
      doc = f" ({schema[key].doc})" if schema[key].doc else ""
      raise ConfigError(f"config.{name}.{key}={node[key]!r} must be "
                        f"{problem}{doc}")


def _check_section(config: ml_collections.ConfigDict, name: str) -> None:
  schema = SCHEMA[name]
  node = config
  for part in name.split("."):
    node = node[part]
  if not isinstance(node, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f"config.{name} must be a section, got {node!r}")
  for key in sorted(set(node.keys()) - set(schema)):
    raise ConfigError(f"config.{name}.{key} is not a field of "
                      f"config.{name}{_did_you_mean(key, schema)} (fields: "
                      f"{', '.join(sorted(schema))})")
  check_fields(node, name, schema)


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
  model = config.get("mesh", {}).get("model", 1)
  hidden = int(a.mlp_ratio * a.d_model)
  if a.num_heads % model or hidden % model:
    raise ConfigError(
        f"config.mesh.model={model} must divide config.arvm.num_heads="
        f"{a.num_heads} and the MLP width (mlp_ratio * d_model = {hidden}): "
        f"tensor parallelism splits heads and MLP units over that axis")
  _need(config, "inputs.tokens_dir",
        "point it at a 'blae_encode' workdir (it holds tokens_*.json)")


def _rules_sample(config, sampler_kind: str = "neural", **_):
  if sampler_kind == "kernel":
    for name in ("kernel", "tokens"):
      if name not in config:
        raise ConfigError(f"the kernel sampler needs config.{name}")
    _need(config, "inputs.tokens_dir",
          "the kernel ARVM's bank is the training tokens of a 'blae_encode' run")
  else:
    _need(config, "inputs.arvm_workdir", "point it at a trained 'arvm' run")


def _rules_sweep(config, **_):
  if config.sampler.num_samples < 2:
    raise ConfigError("config.sampler.num_samples must be >= 2 (a Frechet "
                      "distance needs two samples)")
  _need(config, "inputs.tokens_dir",
        "the kernel ARVM's bank is the training tokens of a 'blae_encode' run")


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
  fields = {"stage", "reencode", "blae", "arvm", "evaluate_train_examples"}
  for key in sorted(set(config.keys()) - fields):
    raise ConfigError(f"config.{key} is not a field of a pipeline config "
                      f"(fields: {', '.join(sorted(fields))})")
  if flag(config.get("reencode", False)):
    raise ConfigError("config.reencode must be True or False")
  if COUNT(config.get("evaluate_train_examples", 0)):
    raise ConfigError("config.evaluate_train_examples must be an int >= 0 "
                      "(0: every training latent)")
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
