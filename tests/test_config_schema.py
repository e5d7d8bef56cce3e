"""The config schema, the gamma grammar and reading artefacts of earlier
versions (workdirs and samples written before the house layout)."""

import os

import ml_collections
import numpy as np
import pytest

from mesp_jax.base import config as config_lib
from mesp_jax.base.gamma import gamma_label, parse_gamma, parse_gammas
from mesp_jax.data.sample_set import SampleSet
from mesp_jax.train import arvm as arvm_train
from mesp_jax.train import checkpoint

CONFIGS = ["blae_fashion_mnist.py", "blae_fashion_mnist.py:demo",
           "blae_fashion_mnist.py:smoke", "blae_cifar10.py",
           "blae_cifar10.py:smoke", "arvm_fashion_mnist.py:smoke",
           "arvm_cifar10.py", "feature_net_fashion_mnist.py",
           "evaluate_fashion_mnist.py", "gamma_sweep_fashion_mnist.py",
           "mesp_study_fashion_mnist.py", "mesp_study_fashion_mnist.py:smoke",
           "demo.py", "demo.py:smoke"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_passes_its_stage_schema(repo_root, name):
  config = config_lib.load_config(os.path.join(repo_root, "configs", name))
  if config.stage == "arvm":
    config.inputs.tokens_dir = "/somewhere"
  if config.stage == "evaluate":
    config.inputs.update(samples="/s.npz", feature_net_workdir="/fn")
  config_lib.validate(config, config.stage)


@pytest.mark.parametrize("path,value,message", [
    ("train.batchsize", 3, r"train\.batchsize is not a field.*'batch_size'"),
    ("train.log_every", 0, r"train\.log_every=0 must be an int >= 1"),
    ("train.keep_checkpoints", 0, r"keep_checkpoints=0 must be an int >= 1"),
    ("seed", -1, r"config\.seed=-1 must be an int >= 0"),
    ("blae.family", "unet", r"blae\.family='unet' must be one of"),
    ("train.schedule", "linear", r"schedule='linear' must be one of"),
    ("train.b1", 1.0, r"train\.b1=1\.0 must be a number >= 0 and < 1"),
])
def test_schema_errors_name_the_field_and_what_is_allowed(repo_root, path,
                                                          value, message):
  config = config_lib.load_config(
      os.path.join(repo_root, "configs/blae_fashion_mnist.py:smoke"))
  with config.unlocked():
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, "blae")


def test_arvm_and_sample_cross_field_rules(repo_root):
  config = config_lib.load_config(
      os.path.join(repo_root, "configs/arvm_fashion_mnist.py:smoke"))
  with pytest.raises(config_lib.ConfigError, match="inputs.tokens_dir"):
    config_lib.validate(config, "arvm")
  config.inputs.tokens_dir = "/t"
  config.arvm.num_heads = 3
  with pytest.raises(config_lib.ConfigError, match="divisible by"):
    config_lib.validate(config, "arvm")
  config.arvm.num_heads = 2
  config.arvm = ml_collections.ConfigDict(dict(config.arvm.to_dict(),
                                              gamma="wide"))
  with pytest.raises(config_lib.ConfigError, match="gamma='wide'"):
    config_lib.validate(config, "arvm")
  config.arvm = ml_collections.ConfigDict(dict(config.arvm.to_dict(),
                                              gamma="global"))
  config_lib.validate(config, "arvm")
  with pytest.raises(config_lib.ConfigError, match="arvm_workdir is empty"):
    config_lib.validate(config, "sample", sampler_kind="neural")
  with pytest.raises(config_lib.ConfigError, match="did you mean 'batch"):
    config_lib.section("train", batchsize=1)
  with pytest.raises(config_lib.ConfigError, match="did you mean 'arvm'"):
    bad = ml_collections.ConfigDict(dict(stage="arvm", arvmm={}))
    config_lib.validate(bad, "arvm")


def test_one_gamma_grammar():
  for spelling in (3, "3", " 3 ", np.int64(3)):
    assert parse_gamma(spelling) == 3
  for spelling in (None, "global", "GLOBAL"):
    assert parse_gamma(spelling) is None
  for bad in ("none", "wide", -1, 1.5, True, "-1", ""):
    with pytest.raises(ValueError, match="expected an int >= 0 or 'global'"):
      parse_gamma(bad)
  assert gamma_label(None) == "global" and gamma_label("5") == "5"
  assert parse_gammas("0, 1,global") == [0, 1, None]
  with pytest.raises(ValueError, match="duplicates"):
    parse_gammas("1,global,GLOBAL")


def test_workdirs_from_before_the_house_layout_are_read():
  old_meta = {"stage": "arvm", "grid": [8, 8], "bits": 16,
              "model": {"group": 8, "gamma": 3, "num_layers": 3,
                        "width": 128, "num_heads": 4, "mlp_ratio": 4.0,
                        "num_classes": 10, "embed": "linear+table"}}
  new = checkpoint.upgrade_meta(old_meta)
  assert new["model"]["d_model"] == 128 and "width" not in new["model"]
  assert checkpoint.upgrade_meta(new) == new
  old_config = ml_collections.ConfigDict(dict(
      arvm=dict(old_meta["model"]), tokens=dict(dir="/t", blae_workdir="/b")))
  config = arvm_train.upgrade_config(old_config)
  assert config.arvm.d_model == 128 and "width" not in config.arvm
  assert config.inputs.tokens_dir == "/t"
  assert config.inputs.blae_workdir == "/b"
  # A changed architecture is still refused, naming the field.
  changed = dict(new, model=dict(new["model"], d_model=64))
  with pytest.raises(checkpoint.CheckpointMismatchError, match="d_model"):
    checkpoint._compare_meta(old_meta, changed, "/ckpt")


def test_sample_sets_of_every_schema_load(tmp_path):
  tokens = np.arange(2 * 2 * 2 * 1).reshape(2, 2, 2, 1)
  images = np.zeros((2, 8, 8, 1), np.float32)
  old_neural = tmp_path / "neural.npz"
  np.savez(old_neural, tokens=tokens, images=images, labels=[0, 1],
           group=np.int32(8), arvm_step=np.int32(5), gamma="None")
  old_kernel = tmp_path / "kernel.npz"
  np.savez(old_kernel, tokens=tokens, images=images, labels=[-1, -1],
           group=np.int32(8), bits=np.int32(16), gamma="global",
           sigma_s=0.3, blae_step=np.int32(7), bank_size=np.int64(9))
  a, b = SampleSet.load(str(old_neural)), SampleSet.load(str(old_kernel))
  assert (a.kind, a.gamma, a.sources) == ("neural", "global", {"arvm_step": 5})
  assert (b.kind, b.gamma, b.sources["bank_size"]) == ("kernel", "global", 9)
  new = SampleSet(tokens=tokens, images=images, labels=[3, 4], kind="neural",
                  gamma=2, group=8, sources={"arvm_workdir": "/a"},
                  settings={"seed": 1}, extra={"psnr": np.ones(2)})
  path = str(tmp_path / "new.npz")
  new.save(path)
  back = SampleSet.load(path)
  assert (back.kind, back.gamma, back.group) == ("neural", "2", 8)
  assert back.sources == {"arvm_workdir": "/a"} and back.settings["seed"] == 1
  np.testing.assert_array_equal(back.tokens, tokens)
  np.testing.assert_array_equal(back.extra["psnr"], np.ones(2))
  with pytest.raises(ValueError, match="lacks"):
    np.savez(tmp_path / "x.npz", images=images)
    SampleSet.load(str(tmp_path / "x.npz"))
