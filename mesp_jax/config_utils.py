"""Loading and checking ml_collections configs outside absl flags.

``main.py`` uses ``config_flags``; tools such as benchmarks and tests load the
same files with :func:`load_config` (``path.py:variant`` syntax).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'configs/x.py:variant'`` -> ``get_config('variant')`` of that file."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path!r}")
  module_spec = importlib.util.spec_from_file_location("_mesp_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_choice(config: ml_collections.ConfigDict, field: str,
                 allowed) -> None:
  """Raises a ValueError naming ``field`` and the allowed values."""
  value = _get(config, field)
  if value not in allowed:
    raise ValueError(
        f"config.{field}={value!r} is not allowed; choose one of "
        f"{sorted(map(str, allowed))}")


def check_positive(config: ml_collections.ConfigDict, field: str,
                   allow_zero: bool = False) -> None:
  value = _get(config, field)
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"config.{field}={value!r} must be {bound}")


def _get(config, field: str):
  node = config
  for part in field.split("."):
    if part not in node:
      raise ValueError(f"config.{field} is missing")
    node = node[part]
  return node


# --------------------------------------------------------------------------
# Building blocks shared by the files in configs/ (one source of truth for
# the defaults; each config file overrides what it needs).
# --------------------------------------------------------------------------
def data_config(name: str, image_size: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, image_size=image_size, data_dir="",
      fashion_mnist_dir="/usr/share/datasets/fashion-mnist",
      train_split="train", eval_split="test", eval_examples=0))


def mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_fsdp_size_mb=4.0))


def train_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      batch_size=128, num_steps=10_000, learning_rate=1e-4, warmup_steps=0,
      schedule="constant", grad_clip=0.0, weight_decay=0.0, b1=0.9, b2=0.999,
      log_every=50, eval_every=1000, checkpoint_every=1000,
      visualize_every=0, keep_checkpoints=3, async_checkpoint=True,
      tensorboard=True, eval_batch_size=256))
  cfg.update(overrides)
  return cfg


def blae_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      family="downsample", width=64, bits=16, num_res_blocks=2,
      stem_kernel=7, downsample_factor=4, channel_mult=(1,),
      sigma=1.0, sigma_start=1.0, sigma_ramp_steps=0, beta=0.0))
  cfg.update(overrides)
  return cfg


def encode_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      blae_workdir="", splits=("train", "test"), batch_size=500))
  cfg.update(overrides)
  return cfg


def arvm_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      group=8, gamma=3, num_layers=4, width=128, num_heads=4, mlp_ratio=4.0,
      num_classes=10, label_drop=0.1, embed="linear+table", dtype="float32",
      target="onehot", sigma_s=0.5))
  cfg.update(overrides)
  return cfg


def tokens_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      dir="", blae_workdir="", train_split="train", eval_split="test",
      eval_examples=0))
  cfg.update(overrides)
  return cfg


def sample_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      num_samples=64, batch_size=64, temperature=1.0, top_k=0, top_p=1.0,
      cfg_scale=0.0, cache="ring", seed=0, arvm_workdir="", blae_workdir=""))
  cfg.update(overrides)
  return cfg
