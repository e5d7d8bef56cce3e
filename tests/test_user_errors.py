"""Bad input is caught early, with one paragraph that names the field or file
and says what to do: the command line (missing config file, misspelt or
mistyped --config.* flags, gamma='global'), the workdir, token files,
Fashion-MNIST IDX files, schema ranges, batch divisibility and the sample
stage's host-memory estimate.

A few tests run ``python -m mesp_jax.main`` (the printed paragraph and the
exit status are the point); the rest call the checks directly. This module
must not import ``mesp_jax.main`` (its absl flags would clash with
``mesp_jax.aot``'s in the same pytest process).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from mesp_jax.base import config as config_lib
from mesp_jax.base.config import (
    ConfigError,
    WorkdirError,
    check_command_line,
    check_workdir,
    load_config,
    section,
    validate,
)
from mesp_jax.base.gamma import parse_gammas
from mesp_jax.data import DataError, DataNotFoundError
from mesp_jax.data import sources as sources_lib
from mesp_jax.data import tokens as tokens_lib

ARVM_SMOKE = "configs/arvm_fashion_mnist.py:smoke"
BITS, GRID = 16, (8, 8)


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------
def run_main(repo_root: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "mesp_jax.main", *args],
                        cwd=repo_root, env=env, capture_output=True,
                        text=True, timeout=120)


def error_paragraph(result: subprocess.CompletedProcess) -> str:
  """The last paragraph of stderr after checking it is a user error: exit
  status 2, no traceback, 'error: ' first, no blank line inside."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  paragraph = result.stderr.strip().split("\n\n")[-1]
  assert paragraph.startswith("error: "), result.stderr[-3000:]
  assert paragraph.count("error: ") == 1
  return paragraph


def parse_with_ml_collections(args: list[str]) -> ml_collections.ConfigDict:
  """The config main.py's flag would give for ``args`` (a fresh FlagValues,
  so nothing is defined on the global flags)."""
  argv = ["prog", *args]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      "config", None, flag_values=values, sys_argv=argv, lock_config=True)
  values(argv)
  return holder.value


def write_token_split(directory: str, split: str, n: int, seed: int = 0,
                      tokens: np.ndarray | None = None) -> str:
  """A one-shard token set of ``n`` random 16-bit tokens; its manifest."""
  rng = np.random.default_rng(seed)
  if tokens is None:
    tokens = rng.integers(0, 2**BITS, (n, *GRID, 1)).astype(np.int32)
  labels = rng.integers(0, 10, (n,)).astype(np.int32)
  tokens_lib.write_shard(directory, split, 0, 1, tokens, labels)
  path = tokens_lib.manifest_path(directory, split)
  tokens_lib.write_manifest(path, tokens_lib.make_manifest(
      split=split, dataset="synthetic", grid=GRID, bits=BITS, num_examples=n,
      process_count=1, blae_workdir="", checkpoint_step=1))
  return path


def arvm_config(tokens_dir: str) -> ml_collections.ConfigDict:
  config = load_config(ARVM_SMOKE)
  config.inputs.tokens_dir = tokens_dir
  return config


@pytest.fixture(autouse=True)
def _in_repo(repo_root, monkeypatch):
  monkeypatch.chdir(repo_root)  # the configs/ paths are relative


# --------------------------------------------------------------------------
# 1-3. The command line.
# --------------------------------------------------------------------------
def test_missing_config_file_names_it_and_lists_configs(repo_root, tmp_path):
  result = run_main(repo_root, "--config=configs/nope.py",
                    f"--workdir={tmp_path / 'run'}")
  paragraph = error_paragraph(result)
  assert "'configs/nope.py' does not exist" in paragraph
  names = sorted(f for f in os.listdir(os.path.join(repo_root, "configs"))
                 if f.endswith(".py"))
  assert names and all(name in paragraph for name in names)
  assert not (tmp_path / "run").exists()  # nothing ran
  # --verbosity adds the traceback, the paragraph stays last.
  result = run_main(repo_root, "--config=configs/nope.py", "--verbosity=0",
                    f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2 and "Traceback" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_missing_config_file_in_process():
  with pytest.raises(ConfigError, match=r"configs/dmeo\.py.*does not exist"
                     r".*Did you mean 'configs/demo\.py'"):
    check_command_line(["prog", "--config=configs/dmeo.py:smoke"])
  with pytest.raises(FileNotFoundError, match="is a folder"):
    load_config("configs")  # still a FileNotFoundError for old callers
  with pytest.raises(ConfigError, match=r"--config=configs/demo\.py:smok: "
                     r"unknown variant 'smok'"):
    check_command_line(["prog", "--config", "configs/demo.py:smok"])


def test_unknown_field_on_the_command_line_is_the_message(repo_root,
                                                          tmp_path):
  result = run_main(repo_root, f"--config={ARVM_SMOKE}",
                    "--config.train.num_stpes=5", f"--workdir={tmp_path}")
  paragraph = error_paragraph(result)
  assert paragraph.startswith(
      "error: ConfigError: --config.train.num_stpes=5: config.train has no "
      "field 'num_stpes'; did you mean config.train.num_steps?")


@pytest.mark.parametrize("arg, message", [
    ("--config.trian.batch_size=5",
     "config has no field 'trian'; did you mean config.train?"),
    ("--config.train.num_steps.x=3",
     "config.train.num_steps is a value (4), not a section"),
    ("--noconfig.train.tensorbord",
     "did you mean config.train.tensorboard?"),
    ("--config.arvm.mlp_ratio=wide", "config.arvm.mlp_ratio takes a number"),
    ("--config.train.tensorboard=maybe",
     "config.train.tensorboard takes true or false"),
])
def test_bad_overrides_in_process(arg, message):
  with pytest.raises(ConfigError) as info:
    check_command_line(["prog", f"--config={ARVM_SMOKE}", arg])
  assert str(info.value).startswith(arg + ": ")
  assert message in str(info.value)


def test_good_overrides_pass_the_check():
  check_command_line(["prog", f"--config={ARVM_SMOKE}",
                      "--config.train.num_steps=7", "--config.arvm.gamma=2",
                      "--noconfig.train.tensorboard",
                      "--config.sampler.temperature=0.5",
                      "--config.arvm.gamma=global"])


def test_wrong_type_on_the_command_line(repo_root, tmp_path):
  result = run_main(repo_root, f"--config={ARVM_SMOKE}",
                    "--config.train.num_steps=abc", f"--workdir={tmp_path}")
  paragraph = error_paragraph(result)
  assert ("--config.train.num_steps=abc: config.train.num_steps takes an int"
          in paragraph)
  assert "--config.train.num_steps=4" in paragraph  # the smoke value


# --------------------------------------------------------------------------
# 4. gamma='global' from the command line; ints unchanged.
# --------------------------------------------------------------------------
def test_gamma_global_and_int_from_the_command_line(tmp_path):
  from mesp_jax.models import arvm as arvm_lib

  config = parse_with_ml_collections([f"--config={ARVM_SMOKE}",
                                      "--config.arvm.gamma=global",
                                      f"--config.inputs.tokens_dir={tmp_path}"])
  assert config.arvm.gamma == "global"
  validate(config, "arvm")
  assert arvm_lib.build_arvm(config.arvm, GRID, BITS).gamma is None
  config = parse_with_ml_collections([f"--config={ARVM_SMOKE}",
                                      "--config.arvm.gamma=5"])
  assert config.arvm.gamma == 5 and type(config.arvm.gamma) is int
  assert arvm_lib.build_arvm(config.arvm, GRID, BITS).gamma == 5
  config = parse_with_ml_collections([f"--config={ARVM_SMOKE}",
                                      "--config.arvm.gamma=-1",
                                      f"--config.inputs.tokens_dir={tmp_path}"])
  with pytest.raises(ConfigError, match=r"config.arvm.gamma=-1 must be an "
                     r"int >= 0 or 'global'"):
    validate(config, "arvm")

  sweep = parse_with_ml_collections([
      "--config=configs/gamma_sweep_fashion_mnist.py",
      "--config.kernel.gamma=global", "--config.sweep.gammas=1,global",
      f"--config.inputs.tokens_dir={tmp_path}"])
  assert sweep.kernel.gamma == "global"
  assert parse_gammas(sweep.sweep.gammas) == [1, None]
  validate(sweep, "gamma_sweep")
  demo = parse_with_ml_collections(["--config=configs/demo.py:smoke",
                                    "--config.arvm.arvm.gamma=global"])
  assert demo.arvm.arvm.gamma == "global"


def test_gamma_global_runs_through_main(repo_root, tmp_path):
  """Parsed, validated, then the stage's own input check (missing tokens)."""
  result = run_main(repo_root, f"--config={ARVM_SMOKE}",
                    "--config.arvm.gamma=global",
                    f"--config.inputs.tokens_dir={tmp_path / 'none'}",
                    f"--workdir={tmp_path / 'run'}")
  paragraph = error_paragraph(result)
  assert paragraph.startswith("error: DataNotFoundError: no ARVM training "
                              "tokens")


def test_int_gamma_saves_as_before():
  """Config JSON and checkpoint meta of an int gamma are what a plain
  ConfigDict (the configs before gamma accepted 'global') gave."""
  from mesp_jax.train import arvm as arvm_train

  config = load_config(ARVM_SMOKE)
  old = ml_collections.ConfigDict(config.to_dict())  # plain values only
  with pytest.raises(TypeError):  # what a plain int field does
    ml_collections.ConfigDict(old.to_dict()).arvm.gamma = "global"
  assert json.dumps(config.to_dict(), sort_keys=True) == json.dumps(
      old.to_dict(), sort_keys=True)
  saved = json.loads(json.dumps(config.to_dict()))
  assert saved["arvm"]["gamma"] == 3 and type(saved["arvm"]["gamma"]) is int
  meta = json.loads(json.dumps(arvm_train.model_meta(config, GRID, BITS)))
  # What an ARVM checkpoint of this config stored before the change.
  assert meta == {"stage": "arvm", "grid": [8, 8], "bits": 16, "model": {
      "group": 8, "gamma": 3, "num_layers": 1, "d_model": 32,
      "num_heads": 2, "mlp_ratio": 4.0, "num_classes": 10,
      "embed": "linear+table"}}
  assert meta == json.loads(json.dumps(arvm_train.model_meta(old, GRID,
                                                             BITS)))
  # A section built with an explicit int keeps the int (and its type).
  assert type(section("kernel", gamma=4).gamma) is int


# --------------------------------------------------------------------------
# 5. The workdir.
# --------------------------------------------------------------------------
def test_workdir_that_is_a_file(repo_root, tmp_path):
  target = tmp_path / "file"
  target.write_text("not a folder")
  result = run_main(repo_root, f"--config={ARVM_SMOKE}",
                    f"--workdir={target}")
  paragraph = error_paragraph(result)
  assert f"--workdir={target} is an existing file, not a folder" in paragraph
  assert target.read_text() == "not a folder"


def test_workdir_whose_parent_cannot_be_created(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(WorkdirError, match=f"{blocker} is a file, not a "
                     f"folder"):
    check_workdir(str(blocker / "a" / "b"))
  made = check_workdir(str(tmp_path / "new" / "run"))
  assert made == str(tmp_path / "new" / "run") and os.path.isdir(made)
  assert os.listdir(made) == []  # the write probe is gone


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes everywhere")
def test_workdir_not_writable(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    with pytest.raises(WorkdirError, match="cannot create the folder"):
      check_workdir(str(locked / "run"))
    with pytest.raises(WorkdirError, match="cannot write files in"):
      check_workdir(str(locked))
  finally:
    locked.chmod(0o700)


def test_workdir_under_a_system_folder():
  if not os.path.isdir("/sys"):
    pytest.skip("no /sys")
  try:
    os.mkdir("/sys/mesp_jax_probe")
  except OSError:
    pass
  else:  # /sys is writable here: nothing to test
    os.rmdir("/sys/mesp_jax_probe")
    pytest.skip("/sys is writable")
  with pytest.raises(WorkdirError, match="cannot create the folder"):
    check_workdir("/sys/mesp_jax_probe/run")


# --------------------------------------------------------------------------
# 6. Token files.
# --------------------------------------------------------------------------
def _truncate(path: str, keep: float = 0.5) -> None:
  data = open(path, "rb").read()
  open(path, "wb").write(data[:int(len(data) * keep)])


def _random_bytes(path: str) -> None:
  open(path, "wb").write(np.random.default_rng(0).bytes(500))


def _edit_manifest(path: str, **changes) -> None:
  with open(path) as f:
    manifest = json.load(f)
  for key, value in changes.items():
    if value is None:
      del manifest[key]
    else:
      manifest[key] = value
  with open(path, "w") as f:
    json.dump(manifest, f)


def _shard(directory: str, kind: str) -> str:
  return os.path.join(directory, "tokens_train",
                      f"{kind}-00000-of-00001.npy")


MANIFEST_DAMAGE = {
    "manifest truncated": (lambda d, p: _truncate(p),
                           DataError, "not a readable JSON manifest"),
    "manifest random bytes": (lambda d, p: _random_bytes(p),
                              DataError, "not a readable JSON manifest"),
    "manifest without grid": (lambda d, p: _edit_manifest(p, grid=None),
                              DataError, r"lacks the field\(s\) \['grid'\]"),
    "manifest bad group": (lambda d, p: _edit_manifest(p, group=5),
                           DataError, "group must divide bits"),
    "tokens shard truncated": (lambda d, p: _truncate(_shard(d, "tokens")),
                               DataError, "tokens-00000-of-00001.npy .*"
                               "unreadable"),
    "tokens shard random bytes": (
        lambda d, p: _random_bytes(_shard(d, "tokens")), DataError,
        "neither the .npy nor the .npz format"),
    "labels shard missing": (lambda d, p: os.remove(_shard(d, "labels")),
                             DataNotFoundError,
                             "labels-00000-of-00001.npy .*missing"),
    "tokens of another dtype": (
        lambda d, p: np.save(_shard(d, "tokens"),
                             np.zeros((6, *GRID, 1), np.float32)),
        DataError, r"holds float32 \[6, 8, 8, 1\] but .* expects int32"),
    "tokens of another shape": (
        lambda d, p: np.save(_shard(d, "tokens"),
                             np.zeros((6, *GRID, 2), np.int32)),
        DataError, r"\[6, 8, 8, 2\] but .* expects int32 \[6, 8, 8, 1\]"),
    "token too large": (
        lambda d, p: np.save(_shard(d, "tokens"),
                             np.full((6, *GRID, 1), 2**BITS, np.int32)),
        DataError, r"token values in \[65536, 65536\].*16-bit tokens lie in "
        r"\[0, 65535\]"),
    "negative token": (
        lambda d, p: np.save(_shard(d, "tokens"),
                             np.full((6, *GRID, 1), -1, np.int32)),
        DataError, r"token values in \[-1, -1\]"),
    "negative label": (
        lambda d, p: np.save(_shard(d, "labels"), np.full((6,), -2,
                                                          np.int32)),
        DataError, "holds the label -2"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_damaged_manifest_token_sets_fail_at_load(tmp_path, case):
  directory = str(tmp_path)
  path = write_token_split(directory, "train", 6)
  tokens_lib.TokenSource(path, 8)  # intact: reads
  damage, error, message = MANIFEST_DAMAGE[case]
  damage(directory, path)
  for load in (lambda: tokens_lib.TokenSource(path, 8),
               lambda: tokens_lib.load_tokens(path)):
    with pytest.raises(error, match=message) as info:
      load()
    assert "blae_encode" in str(info.value)
    assert str(tmp_path) in str(info.value)  # names the file


def _legacy(path, **arrays) -> None:
  np.savez(path, **arrays)


def _good_legacy() -> dict:
  rng = np.random.default_rng(3)
  return {"tokens": rng.integers(0, 2**BITS, (6, *GRID, 1)).astype(np.int32),
          "labels": np.arange(6, dtype=np.int32), "bits": np.int32(BITS),
          "blae_workdir": np.asarray("/b")}


def _without(key: str) -> dict:
  arrays = _good_legacy()
  del arrays[key]
  return arrays


LEGACY_DAMAGE = {
    "truncated": ("truncate", "not a readable .npz"),
    "random bytes": ("random", "not a readable .npz"),
    "without labels": (_without("labels"),
                       r"lacks the array\(s\) \['labels'\]"),
    "without bits": (_without("bits"), r"lacks the array\(s\) \['bits'\]"),
    "float tokens": (dict(_good_legacy(), tokens=np.zeros((6, *GRID, 1),
                                                          np.float32)),
                     r"tokens of float32 \[6, 8, 8, 1\], not integers"),
    "3-d tokens": (dict(_good_legacy(), tokens=np.zeros((6, *GRID),
                                                        np.int32)),
                   r"tokens of int32 \[6, 8, 8\]"),
    "short labels": (dict(_good_legacy(), labels=np.arange(3)),
                     r"labels of int64 \[3\], not integers \[6\]"),
    "token too large": (dict(_good_legacy(), tokens=np.full(
        (6, *GRID, 1), 2**BITS + 5, np.int32)), r"token values in \[65541"),
}


@pytest.mark.parametrize("case", sorted(LEGACY_DAMAGE))
def test_damaged_legacy_npz_fails_at_load(tmp_path, case):
  path = str(tmp_path / "tokens_train.npz")
  _legacy(path, **_good_legacy())
  assert len(tokens_lib.TokenSource(path, 8)) == 6  # intact: reads
  what, message = LEGACY_DAMAGE[case]
  if what == "truncate":
    _truncate(path)
  elif what == "random":
    _random_bytes(path)
  else:
    _legacy(path, **what)
  with pytest.raises(DataError, match=message) as info:
    tokens_lib.TokenSource(path, 8)
  assert path in str(info.value) and "blae_encode" in str(info.value)
  if case in ("truncated", "random bytes", "without bits"):
    with pytest.raises(DataError, match=path):
      tokens_lib.read_info(path)


def test_missing_token_file_is_data_not_found(tmp_path):
  with pytest.raises(DataNotFoundError, match="run stage 'blae_encode'"):
    tokens_lib.TokenSource(tokens_lib.tokens_path(str(tmp_path), "train"), 8)
  assert issubclass(DataError, ValueError)  # old `except ValueError` works


def test_out_of_range_tokens_stop_the_arvm_stage_before_training(tmp_path):
  from mesp_jax import stages

  tokens = np.random.default_rng(1).integers(
      0, 2**BITS, (64, *GRID, 1)).astype(np.int32)
  tokens[37, 2, 3, 0] = 2**BITS + 7  # one bad value deep in the set
  directory = str(tmp_path / "tokens")
  write_token_split(directory, "train", 64, tokens=tokens)
  write_token_split(directory, "test", 16, seed=2)
  workdir = tmp_path / "run"
  with pytest.raises(DataError, match=r"first bad row 37"):
    stages.run(arvm_config(directory), str(workdir))
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / "metrics.jsonl").exists()


# --------------------------------------------------------------------------
# 7. Fashion-MNIST IDX files.
# --------------------------------------------------------------------------
def _write_idx(path: str, array: np.ndarray, dtype_code: int = 0x08,
               magic: bytes = b"\0\0") -> None:
  header = magic + bytes([dtype_code, array.ndim]) + struct.pack(
      ">" + "I" * array.ndim, *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _fashion_dir(directory, n: int = 12) -> tuple[str, str]:
  rng = np.random.default_rng(0)
  images = os.path.join(directory, "t10k-images-idx3-ubyte.gz")
  labels = os.path.join(directory, "t10k-labels-idx1-ubyte.gz")
  _write_idx(images, rng.integers(0, 256, (n, 28, 28)))
  _write_idx(labels, rng.integers(0, 10, (n,)))
  return images, labels


def _raw_gz(path: str, data: bytes) -> None:
  with gzip.open(path, "wb") as f:
    f.write(data)


def _gz_bytes(path: str) -> bytes:
  with gzip.open(path, "rb") as f:
    return f.read()


def _images(array: np.ndarray, **kw):
  """A damage that rewrites the images file with ``array``."""
  return lambda img, lab: _write_idx(img, array, **kw)


def _labels(array: np.ndarray):
  return lambda img, lab: _write_idx(lab, array)


def _cut_images(stop: int):
  """A damage that keeps the first ``stop`` bytes of the IDX content."""
  return lambda img, lab: _raw_gz(img, _gz_bytes(img)[:stop])


IDX_DAMAGE = {
    "truncated gzip": (lambda img, lab: _truncate(img), "images",
                       "is unreadable .*Compressed file ended"),
    "random bytes": (lambda img, lab: _random_bytes(img), "images",
                     "is unreadable .*Not a gzipped file"),
    "truncated body": (_cut_images(-100), "images",
                       r"is truncated: its header promises \(12, 28, 28\)"),
    "truncated header": (_cut_images(9), "images",
                         "truncated inside its header"),
    "RGB images": (_images(np.zeros((12, 28, 28, 3))), "images",
                   "4-dimensional array, expected 3"),
    "wrong magic": (_images(np.zeros((12, 28, 28)), magic=b"PK"), "images",
                    "not an IDX file"),
    "float IDX": (_images(np.zeros((12, 28, 28)), dtype_code=0x0D), "images",
                  "type 0x0d, not of unsigned bytes"),
    "wrong dims": (_images(np.zeros((12, 40, 40))), "images",
                   "holds 40x40 images, not Fashion-MNIST's 28x28"),
    "label count": (_labels(np.zeros((11,))), "labels",
                    "holds 11 labels but .* 12 images"),
    "label value": (_labels(np.full((12,), 10)), "labels",
                    "holds the label 10"),
}


@pytest.mark.parametrize("case", sorted(IDX_DAMAGE))
def test_damaged_fashion_mnist_names_the_file(tmp_path, case):
  images, labels = _fashion_dir(str(tmp_path))
  kw = dict(fashion_mnist_dir=str(tmp_path), data_dir=str(tmp_path / "no"))
  source = sources_lib.get_source("fashion_mnist", "test", **kw)
  assert source.images.shape == (12, 32, 32, 1)  # intact: reads, padded
  damage, which, message = IDX_DAMAGE[case]
  damage(images, labels)
  with pytest.raises(DataError, match=message) as info:
    sources_lib.get_source("fashion_mnist", "test", **kw)
  text = str(info.value)
  assert text.startswith({"images": images, "labels": labels}[which])
  assert "apt-get install --reinstall dataset-fashion-mnist" in text
  assert "config.data.fashion_mnist_dir" in text


def test_fashion_mnist_half_installed_and_too_small(tmp_path):
  images, labels = _fashion_dir(str(tmp_path))
  kw = dict(fashion_mnist_dir=str(tmp_path), data_dir=str(tmp_path / "no"))
  with pytest.raises(ConfigError, match=r"config.data.image_size=16 is "
                     r"smaller than Fashion-MNIST's 28x28"):
    sources_lib.get_source("fashion_mnist", "test", image_size=16, **kw)
  os.remove(labels)
  with pytest.raises(DataNotFoundError, match=f"only {images} of the pair"):
    sources_lib.get_source("fashion_mnist", "test", **kw)


# --------------------------------------------------------------------------
# 8. Schema ranges, refused at stage entry with the field named.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("spec, stage, field, value", [
    (ARVM_SMOKE, "arvm", "seed", -1),
    (ARVM_SMOKE, "arvm", "train.log_every", 0),
    (ARVM_SMOKE, "arvm", "train.keep_checkpoints", 0),
    (ARVM_SMOKE, "arvm", "train.eval_batch_size", 0),
    (ARVM_SMOKE, "arvm", "tokens.eval_examples", -1),
    ("configs/blae_fashion_mnist.py:smoke", "blae", "data.eval_examples", -5),
    (ARVM_SMOKE, "sample", "sampler.num_samples", 0),
    (ARVM_SMOKE, "sample", "sampler.num_samples", -3),
    (ARVM_SMOKE, "sample", "sampler.batch_size", 0),
    (ARVM_SMOKE, "sample", "sampler.seed", -1),
])
def test_out_of_range_fields_are_refused(spec, stage, field, value):
  config = load_config(spec)
  if "inputs" in config:
    config.inputs.update(tokens_dir="t", arvm_workdir="a")
  validate(config, stage)  # as shipped: fine
  *head, key = field.split(".")
  node = config
  for part in head:
    node = node[part]
  node[key] = value
  with pytest.raises(ConfigError, match=rf"^config\.{field}={value} must be "
                     rf"an int >= \d"):
    validate(config, stage)


# --------------------------------------------------------------------------
# 9. Batch sizes the devices cannot split.
# --------------------------------------------------------------------------
def _check_eval_batch():
  from mesp_jax.train import loop
  check = getattr(loop, "check_eval_batch", None)
  if check is None:
    pytest.skip("mesp_jax/train/loop.py has no check_eval_batch yet (see "
                "the helper's report for the lines to merge)")
  return check


def test_check_eval_batch():
  from mesp_jax.base import sharding
  check = _check_eval_batch()
  mesh = sharding.make_mesh()
  dp = sharding.data_parallel_size(mesh)
  assert dp == 8  # conftest: 8 CPU devices
  check(ml_collections.ConfigDict(dict(batch_size=16, eval_batch_size=64)),
        mesh)
  with pytest.raises(ConfigError, match=r"config.train.eval_batch_size=12 "
                     r"must be divisible by the data-parallel size 8"):
    check(ml_collections.ConfigDict(dict(batch_size=16, eval_batch_size=12)),
          mesh)


def test_eval_batch_fails_before_the_first_train_step(tmp_path):
  from mesp_jax import stages
  _check_eval_batch()
  directory = str(tmp_path / "tokens")
  write_token_split(directory, "train", 32)
  write_token_split(directory, "test", 16, seed=2)
  config = arvm_config(directory)
  config.train.eval_batch_size = 12
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="eval_batch_size=12"):
    stages.run(config, str(workdir))
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / "metrics.jsonl").exists()


class _FakeSampler:
  """What check_sampling reads of a sampler."""

  def __init__(self, grid=(8, 8, 2), batch_multiple=1):
    self.grid, self.batch_multiple = grid, batch_multiple


def test_sampler_batch_must_split_over_its_devices():
  from mesp_jax.stages import sample as sample_stage
  scfg = section("sampler", num_samples=16, batch_size=12)
  with pytest.raises(ConfigError, match=r"config.sampler.batch_size=12 must "
                     r"be a multiple of the sampler's data-parallel size 8.*"
                     r"batch_size=8"):
    sample_stage.check_sampling(scfg, _FakeSampler(batch_multiple=8),
                                (32, 32, 1), available=2**40)
  scfg.batch_size = 16
  sample_stage.check_sampling(scfg, _FakeSampler(batch_multiple=8),
                              (32, 32, 1), available=2**40)


# --------------------------------------------------------------------------
# 10. The sample stage's host memory.
# --------------------------------------------------------------------------
def test_sample_memory_estimate():
  from mesp_jax.stages import sample as sample_stage
  per_sample = 8 * 8 * 2 * 4 + 32 * 32 * 1 * 4 + 4 + 8  # tokens, images, ...
  scfg = section("sampler", num_samples=1000, batch_size=64)
  need = sample_stage.check_sampling(scfg, _FakeSampler(), (32, 32, 1),
                                     available=2**40)
  assert need == 3 * 1000 * per_sample  # the surplus is dropped; 3 copies
  scfg.num_samples = 10**9
  with pytest.raises(ConfigError) as info:
    sample_stage.check_sampling(scfg, _FakeSampler(), (32, 32, 1),
                                available=8 * 2**30)
  text = str(info.value)
  assert text.startswith("config.sampler.num_samples=1000000000 needs about ")
  estimate = 3 * 10**9 * per_sample / 2**40
  assert f"{estimate:.1f} TiB" in text and "8.0 GiB available" in text
  most = int(0.9 * 8 * 2**30 // (3 * per_sample)) // 64 * 64
  assert f"--config.sampler.num_samples={most}" in text
  assert "--config.sampler.seed" in text
  # Two processes: each holds about half.
  half = sample_stage.check_sampling(section("sampler", num_samples=1000,
                                             batch_size=64),
                                     _FakeSampler(), (32, 32, 1),
                                     processes=2, available=2**40)
  assert half == 3 * 512 * per_sample


def test_sample_stage_refuses_before_drawing(monkeypatch):
  from mesp_jax.sample import samplers
  from mesp_jax.stages import sample as sample_stage

  config = load_config(ARVM_SMOKE)
  config.stage = "sample"
  config.inputs.arvm_workdir = "/unused"
  config.sampler.num_samples = 10**9
  blae_cfg = load_config("configs/blae_fashion_mnist.py:smoke")
  monkeypatch.setattr(sample_stage, "build_sampler",
                      lambda *a, **k: (_FakeSampler(), "/blae", {}))
  monkeypatch.setattr(sample_stage.blae, "load_blae",
                      lambda *a, **k: (None, None, blae_cfg, 0))

  def no_draw(*args, **kwargs):
    raise AssertionError("sampling started")

  monkeypatch.setattr(samplers, "draw_batches", no_draw)
  monkeypatch.setattr(sample_stage, "available_memory", lambda: 16 * 2**30)
  with pytest.raises(ConfigError, match="num_samples=1000000000 needs about"):
    sample_stage.run(config, "/nonexistent-workdir")


def test_damaged_tokens_through_main(repo_root, tmp_path):
  """A DataError is one of main's user errors: one paragraph, status 2."""
  directory = str(tmp_path / "tokens")
  path = write_token_split(directory, "train", 8)
  write_token_split(directory, "test", 8)
  _truncate(path)
  result = run_main(repo_root, f"--config={ARVM_SMOKE}",
                    f"--config.inputs.tokens_dir={directory}",
                    f"--workdir={tmp_path / 'run'}")
  paragraph = error_paragraph(result)
  assert paragraph.startswith(f"error: DataError: {path} is not a readable "
                              f"JSON manifest")
  assert "re-run stage 'blae_encode'" in paragraph
  assert issubclass(config_lib.ConfigFileError, ConfigError)
