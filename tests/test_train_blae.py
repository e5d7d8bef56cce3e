"""BL-AE training: loss falls, 8 devices == 1 device, kill/resume, encode."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mesp_jax import stages
from mesp_jax.base import bits as bits_lib
from mesp_jax.base import sharding
from mesp_jax.base.config import load_config
from mesp_jax.data.tokens import load_tokens
from mesp_jax.models.blae import BLAE
from mesp_jax.train import blae as blae_stage
from mesp_jax.train import loop


def smoke_config(repo_root, **train):
  config = load_config(os.path.join(repo_root,
                                    "configs/blae_fashion_mnist.py:smoke"))
  config.train.update(train)
  return config


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}


def test_loss_falls_on_a_small_batch(repo_root):
  config = smoke_config(repo_root)
  model = BLAE(family="downsample", width=16, bits=8, num_res_blocks=1,
               downsample_factor=4)
  task = blae_stage.make_task(config, "/tmp/unused")
  x = jnp.asarray(next(task.train_batches)["image"][:8])
  params = model.init(jax.random.key(0), x, jnp.zeros((8, 8, 8, 8)))
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, rng):
    def lf(p):
      z = model.apply(p, x, method=BLAE.encode_continuous)
      rec = model.apply(p, z + 0.3 * jax.random.normal(rng, z.shape),
                        method=BLAE.decode)
      return jnp.mean((rec - x) ** 2)
    loss, g = jax.value_and_grad(lf)(params)
    u, opt = tx.update(g, opt)
    return optax.apply_updates(params, u), opt, loss

  losses = []
  for i in range(40):
    params, opt, loss = step(params, opt, jax.random.key(i))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_sharded_step_equals_single_device(repo_root, tmp_path):
  assert jax.device_count() == 8
  states = []
  for n, name in ((8, "eight"), (1, "one")):
    config = smoke_config(repo_root, num_steps=2, checkpoint_every=2)
    mesh = sharding.make_mesh(devices=jax.devices()[:n])
    task = blae_stage.make_task(config, str(tmp_path / name))
    task.visualize = None
    states.append(jax.device_get(loop.train(config, str(tmp_path / name),
                                            task, mesh=mesh)))
  # Same math, different reduction order across devices: float32 noise only.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5), *states)
  assert train_losses(tmp_path / "eight")[2] == pytest.approx(
      train_losses(tmp_path / "one")[2], rel=1e-5)


class Crash(RuntimeError):
  pass


def test_kill_after_checkpoint_then_resume_matches(repo_root, tmp_path):
  kw = dict(num_steps=6, checkpoint_every=2, log_every=1, eval_every=100,
            visualize_every=1)
  config = smoke_config(repo_root, **kw)
  straight = tmp_path / "straight"
  task = blae_stage.make_task(config, str(straight))
  task.visualize = None
  loop.train(config, str(straight), task)

  crashed = tmp_path / "crashed"
  task = blae_stage.make_task(config, str(crashed))

  def crash_at_5(params, step, workdir):
    if step == 5:  # after the checkpoint at step 4, before the one at 6
      raise Crash("simulated kill")
  task.visualize = crash_at_5
  with pytest.raises(Crash):
    loop.train(config, str(crashed), task)
  assert 5 in train_losses(crashed)

  task = blae_stage.make_task(config, str(crashed))  # a fresh process
  task.visualize = None
  loop.train(config, str(crashed), task)
  want, got = train_losses(straight), train_losses(crashed)
  assert sorted(got) == sorted(want)  # step 5 not duplicated
  for step in (5, 6):
    assert got[step] == pytest.approx(want[step], rel=1e-6)


def test_encode_stage_tokens_match_sign_of_code(repo_root, tmp_path):
  config = smoke_config(repo_root)
  workdir = str(tmp_path / "blae")
  stages.run(config, workdir)
  config.stage = "blae_encode"
  config.inputs.blae_workdir = workdir
  paths = stages.run(config, str(tmp_path / "tok"))
  data = load_tokens(paths["test"])
  assert data["tokens"].shape == (10_000, 8, 8, 1)
  model, params, _, step = blae_stage.load_blae(workdir)
  assert step == config.train.num_steps
  task = blae_stage.make_task(config, workdir)
  images = next(task.eval_batches())["image"][:20]
  z = np.asarray(model.apply(params, images, method=BLAE.encode_continuous))
  np.testing.assert_array_equal(data["tokens"][:20],
                                bits_lib.pack_numpy(np.sign(z), 8))


def test_checkpoint_of_another_model_is_refused(repo_root, tmp_path):
  config = smoke_config(repo_root, num_steps=2, checkpoint_every=2)
  workdir = str(tmp_path / "w")
  stages.run(config, workdir)
  config.blae.width = 12
  with pytest.raises(ValueError, match="blae|model"):
    stages.run(config, workdir)


def test_nan_loss_stops_without_saving_the_bad_state(repo_root, tmp_path):
  """``nan_guard='off'``: the logged loss is checked (the guard's own tests
  are in test_reliability.py)."""
  config = smoke_config(repo_root, num_steps=6, checkpoint_every=2,
                        log_every=1, nan_guard="off")
  task = blae_stage.make_task(config, str(tmp_path))
  task.visualize = None
  good_loss = task.loss_fn

  def nan_from_step_3(params, batch, rng, step):
    loss, metrics = good_loss(params, batch, rng, step)
    return jnp.where(step >= 2, jnp.nan, loss), metrics  # step counts from 0

  task.loss_fn = nan_from_step_3
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"at step 3 \(data batch 2\).*newest checkpoint "
                     r"is step 2 .*learning_rate"):
    loop.train(config, str(tmp_path), task)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_corrupt_latest_checkpoint_falls_back_to_older(repo_root, tmp_path):
  config = smoke_config(repo_root, num_steps=4, checkpoint_every=2)
  workdir = str(tmp_path / "w")
  stages.run(config, workdir)
  state_dir = os.path.join(workdir, "checkpoints", "4", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  _, _, _, step = blae_stage.load_blae(workdir)
  assert step == 2
  assert os.path.exists(state_dir)  # the broken step is left for inspection
