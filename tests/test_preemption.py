"""SIGTERM / SIGINT during training: a checkpoint at the current step, a
distinct exit code, and a rerun that continues as if never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_train_blae import smoke_config, train_losses

from mesp_jax.train import blae as blae_stage
from mesp_jax.train import checkpoint as ckpt
from mesp_jax.train import loop


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_and_the_rerun_loses_nothing(
    repo_root, tmp_path, sig):
  """Both signals stop and save; the rerun is checked for SIGTERM."""
  kw = dict(num_steps=6, checkpoint_every=100, log_every=1, eval_every=100,
            visualize_every=1)
  config = smoke_config(repo_root, **kw)
  stopped = tmp_path / "stopped"
  task = blae_stage.make_task(config, str(stopped))

  def signal_at_3(params, step, workdir):
    if step == 3:  # no periodic checkpoint before step 6
      os.kill(os.getpid(), sig)
  task.visualize = signal_at_3
  before = signal.getsignal(sig)
  with pytest.raises(loop.Preempted, match="at step 3.*Rerun the same"):
    loop.train(config, str(stopped), task)
  manager = ckpt.make_manager(str(stopped / "checkpoints"), async_save=False)
  assert manager.all_steps() == [3]
  assert signal.getsignal(sig) == before  # the handler was put back
  if sig != signal.SIGTERM:
    return

  straight = tmp_path / "straight"
  task = blae_stage.make_task(config, str(straight))
  task.visualize = None
  loop.train(config, str(straight), task)
  task = blae_stage.make_task(config, str(stopped))  # the rerun
  task.visualize = None
  loop.train(config, str(stopped), task)
  want, got = train_losses(straight), train_losses(stopped)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
  for step in range(1, 7):
    assert got[step] == pytest.approx(want[step], rel=1e-6)


def test_sigterm_to_the_command_exits_75_with_how_to_resume(repo_root,
                                                            tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "mesp_jax.main",
         "--config=configs/blae_fashion_mnist.py:smoke",
         f"--workdir={workdir}", "--config.train.num_steps=100000",
         "--config.train.log_every=1", "--config.train.checkpoint_every=0",
         "--config.train.eval_every=100000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  metrics = workdir / "metrics.jsonl"

  def run_until(logged: int) -> int:
    """Starts the command, sends SIGTERM once ``logged`` steps are in the
    metrics and returns the step it stopped at."""
    proc = subprocess.Popen(cmd, cwd=repo_root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if metrics.exists() and metrics.read_text().count("\n") >= logged:
        break
      time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == loop.PREEMPTED_EXIT_CODE, err[-3000:]
    assert "stopped by SIGTERM at step" in err
    assert "Rerun the same command" in err
    last = max(train_losses(workdir))
    manager = ckpt.make_manager(str(workdir / "checkpoints"),
                                async_save=False)
    assert manager.latest_step() == last  # every logged step is in it
    assert ckpt.verify(manager, last)  # and sealed
    return last

  first = run_until(2)
  second = run_until(first + 2)  # the rerun: the same command
  assert second >= first + 2
  got = train_losses(workdir)
  assert sorted(got) == list(range(1, second + 1))  # no step lost or twice

  # An uninterrupted run of the same config (here: stopped by a crash after
  # step `second`) logs the same losses (8 devices against 1: float order).
  config = smoke_config(repo_root, num_steps=100000, log_every=1,
                        checkpoint_every=0, eval_every=100000,
                        visualize_every=1)
  straight = tmp_path / "straight"
  task = blae_stage.make_task(config, str(straight))

  def stop_after(params, step, workdir_):
    if step == second:
      raise _Done
  task.visualize = stop_after
  with pytest.raises(_Done):
    loop.train(config, str(straight), task)
  want = train_losses(straight)
  for step in range(1, second + 1):
    assert got[step] == pytest.approx(want[step], rel=1e-5), step


class _Done(Exception):
  pass
