"""Provenance: every workdir records its inputs, a resume on changed inputs
is refused with what changed, earlier configs are kept, paths are absolute."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mesp_jax import stages
from mesp_jax.base.config import load_config
from mesp_jax.data import tokens as tokens_lib
from mesp_jax.train import provenance

GRID = (4, 4)
BITS = 8


def write_tokens(directory, seed: int, blae_step: int = 7, n: int = 64):
  """A train and a test split of random tokens (one shard each)."""
  rng = np.random.default_rng(seed)
  for split in ("train", "test"):
    tokens = rng.integers(0, 2**BITS, (n, *GRID, 1)).astype(np.int32)
    labels = rng.integers(0, 10, (n,)).astype(np.int32)
    tokens_lib.write_shard(str(directory), split, 0, 1, tokens, labels)
    tokens_lib.write_manifest(
        tokens_lib.manifest_path(str(directory), split),
        tokens_lib.make_manifest(
            split=split, dataset="synthetic", grid=GRID, bits=BITS,
            num_examples=n, process_count=1, blae_workdir="/nowhere/blae",
            checkpoint_step=blae_step))


def arvm_config(repo_root, tokens_dir, **train):
  config = load_config(os.path.join(repo_root,
                                    "configs/arvm_fashion_mnist.py:smoke"))
  config.arvm.group = BITS
  config.inputs.tokens_dir = str(tokens_dir)
  config.train.update(dict(num_steps=2, eval_every=2, checkpoint_every=2),
                      **train)
  return config


@pytest.fixture
def trained(repo_root, tmp_path):
  tokens_dir, workdir = tmp_path / "tokens", tmp_path / "arvm"
  write_tokens(tokens_dir, seed=0)
  stages.run(arvm_config(repo_root, tokens_dir), str(workdir))
  return tokens_dir, workdir


def test_the_record_names_the_tokens_and_their_blae(trained):
  tokens_dir, workdir = trained
  record = provenance.read(str(workdir), "arvm")
  train = record["inputs"]["tokens"]["train"]
  assert train["path"] == str(tokens_dir / "tokens_train.json")
  assert (train["blae_workdir"], train["blae_step"]) == ("/nowhere/blae", 7)
  assert len(train["sha256"]) == 64 and record["history"] == []


def test_resuming_on_changed_tokens_is_refused_then_allowed(repo_root,
                                                           trained):
  tokens_dir, workdir = trained
  write_tokens(tokens_dir, seed=1, blae_step=9)  # a re-encoded token set
  config = arvm_config(repo_root, tokens_dir, num_steps=4)
  with pytest.raises(provenance.InputsChangedError,
                     match=r"(?s)other inputs.*tokens\.train\.blae_step: was "
                     r"7, now 9.*tokens\.train\.sha256.*new --workdir.*"
                     r"allow_changed=True"):
    stages.run(config, str(workdir))
  assert not (workdir / "checkpoints" / "4").exists()  # nothing trained

  config.inputs.allow_changed = True
  stages.run(config, str(workdir))
  assert (workdir / "checkpoints" / "4").exists()
  record = provenance.read(str(workdir), "arvm")
  assert record["inputs"]["tokens"]["train"]["blae_step"] == 9
  assert [h["inputs"]["tokens"]["train"]["blae_step"]
          for h in record["history"]] == [7]


def test_a_fresh_workdir_on_new_tokens_is_not_refused(repo_root, tmp_path,
                                                      trained, capsys):
  tokens_dir, _ = trained
  write_tokens(tokens_dir, seed=1)
  capsys.readouterr()
  stages.run(arvm_config(repo_root, tokens_dir), str(tmp_path / "other"))
  # The tokens name a BL-AE that is not there: said before training, and
  # training goes on without the sample grid.
  out = capsys.readouterr().out
  assert out.index("/nowhere/blae (the BL-AE of these tokens) is not a "
                   "trained 'blae' workdir") < out.index("[arvm] step ")


def test_earlier_configs_are_kept_and_paths_made_absolute(
    repo_root, trained, monkeypatch):
  tokens_dir, workdir = trained
  monkeypatch.chdir(tokens_dir.parent)
  config = arvm_config(repo_root, "tokens", num_steps=4, learning_rate=3e-4)
  stages.run(config, str(workdir))
  with open(workdir / "arvm_config.json") as f:
    now = json.load(f)
  assert now["train"]["learning_rate"] == 3e-4
  assert now["inputs"]["tokens_dir"] == str(tokens_dir)  # absolute
  history = sorted((workdir / "config_history").iterdir())
  assert len(history) == 1
  with open(history[0]) as f:
    assert json.load(f)["train"]["learning_rate"] != 3e-4


def test_a_blae_resumed_on_other_data_is_refused(repo_root, tmp_path):
  """The record alone: a BL-AE checkpoint (same image shape, so the model
  meta matches) must not continue on another data set."""
  config = load_config(os.path.join(repo_root,
                                    "configs/blae_fashion_mnist.py:smoke"))
  inputs = {"data": {"name": "fashion_mnist", "image_size": 32}}
  provenance.check_and_record(str(tmp_path), "blae", config, inputs,
                              resuming=False)
  other = {"data": {"name": "mnist", "image_size": 32}}
  with pytest.raises(provenance.InputsChangedError,
                     match="data.name: was 'fashion_mnist', now 'mnist'"):
    provenance.check_and_record(str(tmp_path), "blae", config, other,
                                resuming=True)
  provenance.check_and_record(str(tmp_path), "blae", config, other,
                              resuming=False)  # a fresh start may
  assert provenance.read(str(tmp_path), "blae")["inputs"] == other
