"""Nothing lost: damaged checkpoints are moved aside and the run resumes,
and the NaN guard never lets a non-finite step into the state."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_blae import smoke_config, train_losses

from mesp_jax.train import blae as blae_stage
from mesp_jax.train import checkpoint as ckpt
from mesp_jax.train import loop


def _run(config, workdir, wrap=None):
  task = blae_stage.make_task(config, str(workdir))
  task.visualize = None
  if wrap is not None:
    task.train_batches = wrap(task.train_batches)
  return loop.train(config, str(workdir), task)


def _largest(folder) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest(os.path.join(step_dir, "state"))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _random_bytes(step_dir):
  path = _largest(os.path.join(step_dir, "state"))
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(os.path.getsize(path)))


def _flip_bytes(step_dir):
  """Bytes in the middle of the biggest array file: Orbax alone would load
  them (changed weights); only the checksums notice."""
  path = _largest(os.path.join(step_dir, "state"))
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    data = f.read(8)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in data))


def _garbage_loader(step_dir):
  with open(os.path.join(step_dir, "loader", "process_0-of-1.json"), "w") as f:
    f.write('{"step": "x9", "seed": 0}')


def _garbage_loader_unsealed(step_dir):
  """Also without checksums (a crash before sealing, or an old run): the
  data position itself is checked."""
  _garbage_loader(step_dir)
  os.remove(os.path.join(step_dir, ckpt.CHECKSUMS))


DAMAGE = {"truncated": _truncate, "random_bytes": _random_bytes,
          "flipped_bytes": _flip_bytes, "garbage_loader": _garbage_loader,
          "garbage_loader_no_checksums": _garbage_loader_unsealed}
KW = dict(num_steps=6, checkpoint_every=2, log_every=1, eval_every=100,
          keep_checkpoints=5)


@pytest.fixture(scope="module")
def straight(repo_root, tmp_path_factory):
  """Losses of an uninterrupted 6-step run."""
  workdir = tmp_path_factory.mktemp("straight")
  _run(smoke_config(repo_root, **KW), workdir)
  return train_losses(workdir)


class _Crash(RuntimeError):
  pass


@pytest.fixture(scope="module")
def four_steps(repo_root, tmp_path_factory):
  """A 6-step run that crashed at step 5 (checkpoints 2 and 4 saved, both
  sealed); copy it."""
  workdir = tmp_path_factory.mktemp("four") / "run"
  config = smoke_config(repo_root, **dict(KW, visualize_every=1))
  task = blae_stage.make_task(config, str(workdir))

  def crash_at_5(params, step, workdir_):
    if step == 5:
      raise _Crash("a simulated kill after the checkpoint at step 4")
  task.visualize = crash_at_5
  with pytest.raises(_Crash):
    loop.train(config, str(workdir), task)
  return workdir


def _copy(src, tmp_path):
  shutil.copytree(src, tmp_path / "run")
  return tmp_path / "run"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_finishes(
    repo_root, tmp_path, straight, four_steps, damage):
  workdir = _copy(four_steps, tmp_path)
  step4 = workdir / "checkpoints" / "4"
  assert (step4 / ckpt.CHECKSUMS).exists()
  DAMAGE[damage](str(step4))

  _run(smoke_config(repo_root, **KW), workdir)  # no manual step in between
  manager = ckpt.make_manager(str(workdir / "checkpoints"), async_save=False)
  assert manager.all_steps() == [2, 4, 6]  # step 4 was saved again
  moved = list((workdir / "checkpoints" / ckpt.DAMAGED).iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["4"]
  assert "could not be trusted" in (moved[0] / "NOTE.txt").read_text()
  got = train_losses(workdir)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  for step in range(1, 7):  # resumed from step 2: the same run
    assert got[step] == pytest.approx(straight[step], rel=1e-6), step
  for step in (2, 4, 6):
    assert ckpt.verify(manager, step)


def test_a_kill_while_a_step_was_written_resumes_from_the_one_before(
    repo_root, tmp_path, straight, four_steps):
  """Orbax writes a step into a temporary folder and renames it when
  complete; a kill in between leaves that folder, which is not a step."""
  workdir = _copy(four_steps, tmp_path)
  partial = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1764700000"
  shutil.copytree(workdir / "checkpoints" / "4" / "state", partial / "state")
  _truncate(str(partial))
  _run(smoke_config(repo_root, **KW), workdir)
  manager = ckpt.make_manager(str(workdir / "checkpoints"), async_save=False)
  assert manager.all_steps() == [2, 4, 6]
  got = train_losses(workdir)
  for step in range(1, 7):
    assert got[step] == pytest.approx(straight[step], rel=1e-6), step


def test_when_every_step_is_damaged_the_run_starts_again(
    repo_root, tmp_path, straight, four_steps):
  workdir = _copy(four_steps, tmp_path)
  for step in ("2", "4"):
    _random_bytes(str(workdir / "checkpoints" / step))
  _run(smoke_config(repo_root, **KW), workdir)
  moved = sorted(p.name.split("-")[0]
                 for p in (workdir / "checkpoints" / ckpt.DAMAGED).iterdir())
  assert moved == ["2", "4"]
  got = train_losses(workdir)
  for step in range(1, 7):  # from step 0: the same losses as straight
    assert got[step] == pytest.approx(straight[step], rel=1e-6), step


def test_a_reader_skips_a_damaged_step_and_leaves_it(repo_root, tmp_path,
                                                     four_steps):
  workdir = _copy(four_steps, tmp_path)
  config = smoke_config(repo_root, **KW)
  _flip_bytes(str(workdir / "checkpoints" / "4"))
  task = blae_stage.make_task(config, str(workdir))
  _, step = loop.restore_params(
      str(workdir), config,
      lambda r: task.init_params(r, jax.tree.map(
          lambda x: jnp.asarray(x[:1]), next(task.train_batches))),
      task.meta)
  assert step == 2
  assert (workdir / "checkpoints" / "4").exists()
  assert not (workdir / "checkpoints" / ckpt.DAMAGED).exists()


def test_checksums_notice_an_added_or_missing_file(tmp_path, four_steps):
  workdir = _copy(four_steps, tmp_path)
  manager = ckpt.make_manager(str(workdir / "checkpoints"), async_save=False)
  folder = workdir / "checkpoints" / "2"
  (folder / "state" / "extra").write_bytes(b"x")
  with pytest.raises(ckpt.DamagedCheckpointError, match="extra: not in"):
    ckpt.verify(manager, 2)
  os.remove(folder / "state" / "extra")
  assert ckpt.verify(manager, 2)
  os.remove(folder / "meta" / "metadata")
  with pytest.raises(ckpt.DamagedCheckpointError, match="metadata: missing"):
    ckpt.verify(manager, 2)


# --------------------------------------------------------------------------
# The NaN guard.
# --------------------------------------------------------------------------
class _PoisonAt:
  """A loader whose batch with index ``at`` holds NaN images."""

  def __init__(self, loader, at: int):
    self.loader, self.at = loader, at

  def __iter__(self):
    return self

  def __next__(self):
    index = self.loader.get_state()["step"]
    batch = next(self.loader)
    if index == self.at:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return batch

  def get_state(self):
    return self.loader.get_state()

  def set_state(self, state):
    self.loader.set_state(state)


def _params_at(workdir, step):
  manager = ckpt.make_manager(str(workdir / "checkpoints"), async_save=False)
  restored = manager.restore(step, args=ckpt.ocp.args.Composite(
      state=ckpt.ocp.args.StandardRestore()))
  return restored["state"]["params"]


def _finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x))))
             for x in jax.tree.leaves(tree))


def test_guard_stop_names_the_step_and_batch_and_keeps_good_checkpoints(
    repo_root, tmp_path):
  workdir = tmp_path / "run"
  config = smoke_config(repo_root, num_steps=6, checkpoint_every=1,
                        log_every=3, eval_every=100, keep_checkpoints=10,
                        nan_guard="stop")
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"step 3 \(data batch 2\) was not finite.*newest "
                     r"checkpoint, step 2"):
    _run(config, workdir, lambda it: _PoisonAt(it, 2))
  manager = ckpt.make_manager(str(workdir / "checkpoints"), async_save=False)
  assert manager.all_steps() == [1, 2]  # nothing saved at or after the bad one
  assert _finite(_params_at(workdir, 2))


def test_guard_skip_keeps_the_old_state_and_counts_the_step(repo_root,
                                                           tmp_path):
  workdir = tmp_path / "run"
  config = smoke_config(repo_root, num_steps=5, checkpoint_every=1,
                        log_every=1, eval_every=100, keep_checkpoints=10,
                        nan_guard="skip")
  _run(config, workdir, lambda it: _PoisonAt(it, 2))
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  skipped = {r["step"]: r["skipped"] for r in rows if r["split"] == "train"}
  assert skipped == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0}
  before, after = _params_at(workdir, 2), _params_at(workdir, 3)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert _finite(_params_at(workdir, 5))
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(after), jax.tree.leaves(_params_at(workdir, 4)),
      strict=True))  # training went on after the skipped batch


def test_guard_skip_stops_after_too_many_in_a_row(repo_root, tmp_path):
  config = smoke_config(repo_root, num_steps=20, checkpoint_every=100,
                        log_every=20, eval_every=100, nan_guard="skip",
                        max_skipped_steps=3, learning_rate=1e30)
  with pytest.raises(loop.NonFiniteLossError,
                     match="3 steps in a row were not finite.*no checkpoint "
                     "was saved yet"):
    _run(config, tmp_path / "run")


def test_a_learning_rate_blow_up_keeps_finite_checkpoints_and_reruns(
    repo_root, tmp_path):
  """lr 1e30 gives parameters near 1e30: finite, but their float32 norm is
  not, so the guard refuses the step before any checkpoint holds them; the
  advised rerun with a sane learning rate in the same workdir then works.
  (The one-step warm-up makes step 1's learning rate 0.)"""
  workdir = tmp_path / "run"
  config = smoke_config(repo_root, num_steps=4, checkpoint_every=1,
                        log_every=1, eval_every=100, learning_rate=1e30)
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"step 2 .*parameter norm inf.*newest checkpoint, "
                     r"step 1"):
    _run(config, workdir)
  manager = ckpt.make_manager(str(workdir / "checkpoints"), async_save=False)
  assert manager.all_steps() == [1]
  first = _params_at(workdir, 1)
  assert _finite(first) and max(
      float(np.max(np.abs(x))) for x in jax.tree.leaves(first)) < 1e3
  config.train.learning_rate = 1e-3
  _run(config, workdir)
  assert _finite(_params_at(workdir, 4))


def test_guarded_step_equals_the_plain_step_when_finite():
  """The guard selects, it does not change: same state bit for bit."""
  def loss_fn(params, batch, rng, step):
    del rng, step
    loss = jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
    return loss, {}

  tx = optax.adam(1e-2)
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
  batch = {"x": jnp.ones((5, 4)), "y": jnp.zeros((5, 3))}
  rng = jax.random.key(0)
  state = loop.init_train_state(params, tx)
  plain, _ = jax.jit(loop.make_train_step(loss_fn, tx))(state, batch, rng)
  guarded, m = jax.jit(loop.make_train_step(loss_fn, tx, nan_guard="skip"))(
      state, batch, rng)
  jax.tree.map(np.testing.assert_array_equal, plain, guarded)
  assert float(m["skipped"]) == 0.0
  bad = {"x": batch["x"].at[0, 0].set(jnp.inf), "y": batch["y"]}
  kept, m = jax.jit(loop.make_train_step(loss_fn, tx, nan_guard="skip"))(
      state, bad, rng)
  assert float(m["skipped"]) == 1.0 and int(kept.step) == 1
  jax.tree.map(np.testing.assert_array_equal, state.params, kept.params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state,
               kept.opt_state)


# --------------------------------------------------------------------------
# Paths.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["workdir", "tokens_dir"])
def test_uri_paths_are_refused_before_anything_is_written(
    repo_root, tmp_path, monkeypatch, field):
  from mesp_jax import stages
  from mesp_jax.base.config import ConfigError, load_config
  monkeypatch.chdir(tmp_path)
  config = load_config(os.path.join(repo_root,
                                    "configs/arvm_fashion_mnist.py:smoke"))
  config.inputs.tokens_dir = (
      "gs://bucket/tokens" if field == "tokens_dir" else str(tmp_path))
  workdir = "gs://bucket/run" if field == "workdir" else str(tmp_path / "w")
  # The arvm stage can write a gs:// workdir only with gcsfs and
  # google-cloud-storage (not installed here); inputs never.
  with pytest.raises(ConfigError, match=r"gcsfuse.*/gcs/bucket"):
    stages.run(config, workdir)
  assert os.listdir(tmp_path) == []  # no ./gs:/ folder, nothing else


@pytest.mark.parametrize("field,value", [
    ("arvm.train.eval_batch_size", 12), ("blae.train.batch_size", 12),
    ("arvm.sampler.batch_size", 6)])
def test_the_pipeline_checks_later_stages_before_training(
    repo_root, tmp_path, field, value):
  """On 8 devices: refused before the BL-AE trains, not an hour later."""
  from mesp_jax import stages
  from mesp_jax.base.config import ConfigError, load_config
  config = load_config(os.path.join(repo_root, "configs/demo.py:smoke"))
  node = config
  *parents, leaf = field.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=f"{leaf}={value} must be"):
    stages.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "blae").exists()


def test_a_misspelt_stage_is_refused_with_a_suggestion(repo_root, tmp_path):
  from mesp_jax import stages
  from mesp_jax.base.config import ConfigError, load_config
  config = load_config(os.path.join(repo_root,
                                    "configs/arvm_fashion_mnist.py:smoke"))
  config.stage = "arvn"
  with pytest.raises(ConfigError, match="'arvn' is not a stage; did you mean "
                     "'arvm'"):
    stages.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_resuming_with_another_batch_size_is_a_mismatch(repo_root, tmp_path,
                                                        four_steps):
  workdir = _copy(four_steps, tmp_path)
  config = smoke_config(repo_root, **dict(KW, batch_size=8))
  with pytest.raises(ckpt.CheckpointMismatchError,
                     match="written for other data.*global_batch_size=16"):
    _run(config, workdir)
  assert sorted(train_losses(workdir)) == [1, 2, 3, 4, 5]  # nothing trained
