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
:func:`load_config` (``path.py:variant`` syntax). Before absl parses the
flags, ``main.py`` runs :func:`check_command_line` (a missing config file, a
``--config.*`` flag that names no field, with a "did you mean", or a value of
the wrong type) and then :func:`check_workdir`, so these mistakes are one
paragraph (:class:`ConfigError`, :class:`WorkdirError`), not a traceback.

gamma fields (``arvm.gamma``, ``kernel.gamma``) hold an int or ``'global'``
(:mod:`mesp_jax.base.gamma`). A ``ConfigDict`` fixes a field's type at its
first value, so :func:`section` makes these fields ``FieldReference`` s of
type ``object``: ``--config.arvm.gamma=global`` and ``=5`` both work (the
latter still gives the int 5), and the saved config (``to_dict``, JSON,
checkpoint meta) holds the plain value as before. The schema rule checks the
value at stage entry.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import tempfile
from collections.abc import Sequence

import ml_collections
from absl import flags

from mesp_jax.base import io
from mesp_jax.base.gamma import parse_gammas
from mesp_jax.base.schema import (
    COUNT,
    SCHEMA,
    STAGE_SECTIONS,
    TOP_LEVEL,
    Field,
    flag,
)
from mesp_jax.base.schema import gamma as gamma_rule

__all__ = ["SCHEMA", "STAGE_SECTIONS", "TOP_LEVEL", "ConfigError",
           "ConfigFileError", "Field", "WorkdirError", "check_command_line",
           "check_config_file", "check_fields", "check_workdir",
           "load_config", "section", "smoke", "validate"]

# The repository's configs/ folder (listed when a config file is missing).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


class ConfigError(ValueError):
  """A config value that no stage can run with; the message names the field."""


class ConfigFileError(ConfigError, FileNotFoundError):
  """A config file that is not there (also a FileNotFoundError)."""


def check_config_file(path: str) -> None:
  """Raises ConfigFileError unless ``path`` is a file; the message lists the
  ``.py`` files of its folder (else of the repository's ``configs/``)."""
  if os.path.isfile(path):
    return
  what = ("is a folder, not a config file" if os.path.isdir(path)
          else "does not exist")
  folder = os.path.dirname(path) or "."
  if not os.path.isdir(folder) and os.path.isdir(CONFIGS_DIR):
    folder = CONFIGS_DIR
  names = (sorted(f for f in os.listdir(folder)
                  if f.endswith(".py") and not f.startswith("_"))
           if os.path.isdir(folder) else [])
  listing = hint = ""
  if names:
    listing = f" {folder} holds {', '.join(names)}."
    close = difflib.get_close_matches(os.path.basename(path), names, n=1)
    if close:
      hint = f" Did you mean {os.path.join(folder, close[0])!r}?"
  raise ConfigFileError(
      f"config file {path!r} {what} (relative paths start at "
      f"{os.getcwd()}).{listing}{hint} Give --config=FILE.py or "
      f"FILE.py:variant.")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'configs/x.py:variant'`` -> ``get_config('variant')`` of that file.

  Raises:
    ConfigFileError: the file is missing (the message lists the configs).
    ConfigError: the file has no ``get_config``.
  """
  path, _, arg = spec.partition(":")
  check_config_file(path)
  module_spec = importlib.util.spec_from_file_location("_mesp_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {path!r} defines no get_config(); a "
                      f"config file returns its ConfigDict from "
                      f"get_config(variant='')")
  return module.get_config(arg) if arg else module.get_config()


def _any_type(value):
  """``value`` as a field that accepts a value of any type (gamma: int or
  'global'); its type is checked by the schema rule instead."""
  if isinstance(value, ml_collections.FieldReference):
    return value
  return ml_collections.FieldReference(value, field_type=object)


def section(section_name: str, /, **overrides) -> ml_collections.ConfigDict:
  """A section with its defaults and ``overrides`` (names are checked).

  gamma fields are ``FieldReference`` s of any type (the module docstring):
  a shallow copy (``ConfigDict(section)``) shares them, so copy a section
  with ``ConfigDict(section.to_dict())`` or ``copy.deepcopy`` before changing
  its gamma.
  """
  name = section_name
  schema = SCHEMA[name]
  unknown = set(overrides) - set(schema)
  if unknown:
    raise ConfigError(f"{name}: unknown field(s) {sorted(unknown)}"
                      f"{_did_you_mean(sorted(unknown)[0], schema)}")
  values = {k: f.default for k, f in schema.items()}
  values.update(overrides)
  for key, field in schema.items():
    if field.rule is gamma_rule:
      values[key] = _any_type(values[key])
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
  if stage == "lch_study":
    _check_lch(config)
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


def _rules_score(config, **_):
  _rules_sample(config, sampler_kind=config.sampler.kind)
  _need(config, "inputs.feature_net_workdir",
        "train the classifier first (stage 'train_feature_net', e.g. "
        "configs/feature_net_fashion_mnist.py) and point this field at its "
        "workdir")
  if config.sampler.num_samples < 2:
    raise ConfigError("config.sampler.num_samples must be >= 2 (a Frechet "
                      "distance needs two samples)")


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


def _check_lch(config) -> None:
  fields = {"stage", "gammas", "sigmas", "arvm", "sweep"}
  for key in sorted(set(config.keys()) - fields):
    raise ConfigError(f"config.{key} is not a field of an lch_study config "
                      f"(fields: {', '.join(sorted(fields))})")
  for key in ("arvm", "sweep"):
    if key not in config:
      raise ConfigError(f"stage 'lch_study' needs the section config.{key}")
  try:
    parse_gammas(config.get("gammas", ""))
  except ValueError as e:
    raise ConfigError(f"config.gammas: {e}") from None
  sigmas = str(config.get("sigmas", "")).split(",")
  try:
    values = [float(s) for s in sigmas if s.strip()]
  except ValueError:
    values = []
  if not values or min(values) <= 0:
    raise ConfigError(f"config.sigmas={config.get('sigmas')!r} must be "
                      f"comma-separated kernel noises sigma_s > 0, e.g. "
                      f"'0.3,0.5,0.7'")
  if not config.sweep.get("inputs", {}).get("tokens_dir"):
    raise ConfigError(
        "config.sweep.inputs.tokens_dir is empty: give the 'blae_encode' "
        "workdir whose tokens both ARVMs model (the kernel's bank and the "
        "neural ARVMs' training set), e.g. --config.sweep.inputs.tokens_dir="
        "runs/blae_full_tokens")
  # The sub-stages check their own configs when they run; check what does
  # not depend on upstream outputs now, before the ARVMs train.
  sweep = ml_collections.ConfigDict(config.sweep.to_dict())
  sweep.stage = "gamma_sweep"
  validate(sweep, "gamma_sweep")
  arvm = ml_collections.ConfigDict(config.arvm.to_dict())
  arvm.inputs.tokens_dir = sweep.inputs.tokens_dir
  validate(arvm, "arvm")


_RULES = {"blae": _rules_blae, "arvm": _rules_arvm, "sample": _rules_sample,
          "gamma_sweep": _rules_sweep,
          "train_feature_net": _rules_feature_net,
          "evaluate": _rules_evaluate, "score": _rules_score,
          "mesp_study": _rules_mesp}


# --------------------------------------------------------------------------
# The command line: checks main.py runs before absl parses the flags and
# before any stage starts (one paragraph for the user, not a traceback).
# --------------------------------------------------------------------------
class WorkdirError(OSError):
  """``--workdir`` is not a folder this process can create and write."""


# --config.a.b=value, --config.a.b (a boolean) and --noconfig.a.b.
_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+?)(?:=(.*))?$", re.S)
_CONFIG_ARG = re.compile(r"^--?config(?:=(.*))?$", re.S)
# Field type -> (the parser ml_collections uses for it, what it accepts).
_PARSERS = {int: (flags.IntegerParser(), "an int"),
            float: (flags.FloatParser(), "a number"),
            bool: (flags.BooleanParser(), "true or false")}


def _config_spec(argv: Sequence[str]) -> str | None:
  """The value of the last ``--config`` flag of ``argv`` (None: absent)."""
  spec = None
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    match = _CONFIG_ARG.match(arg)
    if match:
      value = match.group(1)
      if value is None:  # --config PATH
        value = argv[i + 1] if i + 1 < len(argv) else None
      spec = value
  return spec


def _overrides(argv: Sequence[str]) -> list[tuple[str, str | None, str]]:
  """(field path, value or None, the argument) of each ``--config.*`` flag."""
  out = []
  for arg in argv:
    if arg == "--":
      break
    match = _OVERRIDE.match(arg)
    if match:
      negated, path, value = match.groups()
      out.append((path, "false" if negated else value, arg))
  return out


def _check_override(config: ml_collections.ConfigDict, path: str,
                    value: str | None, arg: str) -> None:
  """Raises ConfigError unless ``--config.{path}={value}`` names a field of
  ``config`` and ``value`` parses as that field's type."""
  parts = path.split(".")
  if any(not p or "[" in p for p in parts):
    return  # indexing syntax (a.b[0]): left to ml_collections
  holder = config
  for i, part in enumerate(parts):
    where = ".".join(["config"] + parts[:i])
    if not isinstance(holder, (ml_collections.ConfigDict, dict)):
      raise ConfigError(
          f"{arg}: {where} is a value ({holder!r}), not a section, so it has "
          f"no field {part!r}; set {where} itself")
    if part not in holder:
      keys = sorted(holder.keys())
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f"; did you mean {where}.{close[0]}?" if close else ""
      raise ConfigError(
          f"{arg}: {where} has no field {part!r}{hint} (the fields of "
          f"{where}: {', '.join(keys)})")
    if i == len(parts) - 1:
      break
    holder = holder[part]
  key = parts[-1]
  current = holder[key]
  field_type = (holder.get_type(key) if isinstance(
      holder, ml_collections.ConfigDict) else type(current))
  name = "config." + path
  if field_type is type(None):
    raise ConfigError(
        f"{arg}: {name} is None in this config, and the command line can "
        f"only set fields that hold a value of a fixed type; set it in the "
        f"config file")
  if value is None or field_type not in _PARSERS:
    return
  parser, accepted = _PARSERS[field_type]
  try:
    parser.parse(value)
  except ValueError:
    raise ConfigError(
        f"{arg}: {name} takes {accepted} (this config has {current!r}), not "
        f"{value!r}; give e.g. --{name}={current!r}") from None


def check_command_line(argv: Sequence[str]) -> None:
  """Checks ``--config`` and every ``--config.*`` flag of ``argv`` before
  absl parses them, so that a mistake is one paragraph, not a traceback.

  Raises:
    ConfigError: the config file is missing or its ``get_config`` refuses
      the variant; a flag names no field (with a "did you mean"); a value
      does not parse as its field's type. The message names the flag.
  """
  argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  spec = _config_spec(argv)
  if spec is None:
    return  # absl reports the missing required flag
  try:
    config = load_config(spec)
  except ConfigError as e:
    raise ConfigError(f"--config={spec}: {e}") from e
  except ValueError as e:  # e.g. an unknown variant
    raise ConfigError(f"--config={spec}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config={spec}: get_config() returned "
                      f"{type(config).__name__}, not a ConfigDict")
  for path, value, arg in _overrides(argv):
    _check_override(config, path, value, arg)


def check_workdir(workdir: str) -> str:
  """Creates ``workdir`` if needed and checks that files can be written in
  it; returns its absolute path.

  Raises:
    WorkdirError: naming the path and what is in the way.
  """
  if io.is_uri(workdir):  # folders are prefixes; the stage's file system
    return str(workdir)    # was checked (stages.check_paths)
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(
        f"--workdir={workdir} is an existing file, not a folder: give the "
        f"path of a folder (it is created if missing) or move the file away")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    parent = os.path.dirname(path)
    while parent != os.path.dirname(parent) and not os.path.exists(parent):
      parent = os.path.dirname(parent)
    blocker = (f"{parent} is a file, not a folder" if os.path.isfile(parent)
               else f"the nearest existing parent is {parent}")
    raise WorkdirError(
        f"--workdir={workdir}: cannot create the folder {path} "
        f"({e.strerror or e}; {blocker}); choose a workdir under a folder you "
        f"can write to, or create it with the right permissions") from None
  try:
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(
        f"--workdir={workdir}: cannot write files in {path} "
        f"({e.strerror or e}); fix its permissions or choose another "
        f"workdir") from None
  return path
