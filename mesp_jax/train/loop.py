"""The generic sharded training loop shared by every trained stage.

A stage supplies a :class:`Task` (pure functions for init, loss and eval plus
host-side hooks) and the loop does the rest: mesh, sharded init, jitted and
donated train step, deterministic data, Orbax checkpoints with automatic
resume, metrics, progress and periodic visualisations.

Data path: config -> Loader (process-local numpy) -> shard_batch (global
array on the mesh) -> train_step -> checkpoint / metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mesp_jax.base import io, sharding
from mesp_jax.base.config import ConfigError
from mesp_jax.train import checkpoint as ckpt
from mesp_jax.train import provenance
from mesp_jax.train.metrics import MetricWriter, Progress


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree).

  ``ema_params`` is None unless ``config.train.ema_decay > 0``; then it is
  the exponential moving average of ``params`` (float32), which evaluation,
  encoding and sampling use.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None

  @property
  def inference_params(self):
    """The EMA parameters when kept, else the parameters."""
    return self.params if self.ema_params is None else self.ema_params


@dataclasses.dataclass
class Task:
  """What a stage plugs into :func:`train`.

  Attributes:
    name: shown in progress lines.
    init_params: ``(rng, batch) -> params`` (pure; traced under jit).
    loss_fn: ``(params, batch, rng, step) -> (loss, metrics)`` (pure).
    eval_fn: ``(params, batch) -> {name: [B, ...] per-example values}``
      (pure); the loop masks padding and averages over the eval set.
    meta: JSON-able description of model and data checked on resume.
    summarize_eval: optional host function adding derived eval metrics.
    visualize: optional host hook ``(params, step, workdir)`` writing images.
    train_batches / eval_source: the data.
  """
  name: str
  init_params: Callable[..., Any]
  loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  eval_fn: Callable[..., dict[str, jax.Array]] | None
  meta: dict
  train_batches: Any  # a Loader-like iterator with get_state / set_state
  eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None
  summarize_eval: Callable[[dict], dict] | None = None
  visualize: Callable[[Any, int, str], None] | None = None


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(W) with linear warm-up, then constant or cosine; optional clipping."""
  warmup = int(cfg.get("warmup_steps", 0))
  lr = float(cfg.learning_rate)
  schedule_name = cfg.get("schedule", "constant")
  if schedule_name == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup, 1), max(int(cfg.num_steps), warmup + 1),
        end_value=lr * 0.1)
  elif schedule_name == "constant":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)),
         optax.constant_schedule(lr)], [max(warmup, 1)])
  else:
    raise ValueError(f"config.train.schedule={schedule_name!r}; choose one of "
                     "['constant', 'cosine']")
  chain = []
  if cfg.get("grad_clip", 0.0):
    chain.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
  wd = float(cfg.get("weight_decay", 0.0))
  chain.append(optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)),
                           b2=float(cfg.get("b2", 0.999)), weight_decay=wd)
               if wd else optax.adam(schedule, b1=float(cfg.get("b1", 0.9)),
                                     b2=float(cfg.get("b2", 0.999))))
  return optax.chain(*chain)


def ema_decay_at(decay: float, step):
  """The EMA decay at ``step``: ``min(decay, (1 + t) / (10 + t))``, so the
  average forgets its random initialisation within the first steps."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def micro_batches(batch, k: int):
  """Splits every leaf ``[B, ...]`` into ``[k, B / k, ...]``.

  Micro-batch ``i`` is rows ``i, i + k, i + 2k, ...``: each device keeps
  its own rows (a contiguous block of the data-sharded batch), so the split
  moves no data between devices.
  """
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulated_grads(loss_fn, params, batch, rng, step, k: int):
  """(loss, metrics), grads of the mean loss over ``k`` micro-batches.

  Equal micro-batches make the mean of their mean losses the mean over the
  whole batch, so this equals ``value_and_grad`` on the whole batch up to
  float summation order. Micro-batch ``i`` uses ``fold_in(rng, i)``.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    return grad_fn(params, batch, rng, step)

  def body(carry, xs):
    i, micro = xs
    (loss, metrics), grads = grad_fn(params, micro, jax.random.fold_in(rng, i),
                                     step)
    return jax.tree.map(jnp.add, carry, ((loss, metrics), grads)), None

  parts = micro_batches(batch, k)
  first = jax.tree.map(lambda x: x[0], parts)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                       jax.eval_shape(grad_fn, params, first, rng, step))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), parts))
  return jax.tree.map(lambda x: x / k, total)


def all_finite(tree) -> jax.Array:
  """True iff every element of every leaf is finite (a bool scalar)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(loss_fn, tx: optax.GradientTransformation,
                    grad_accum_steps: int = 1, ema_decay: float = 0.0,
                    nan_guard: str = "off"):
  """``(state, batch, base_rng) -> (state, metrics)`` for a pure loss_fn.

  The step's randomness is ``fold_in(base_rng, state.step)``, so it does not
  depend on the device count or on where a run was resumed. With
  ``grad_accum_steps = k > 1`` the gradient is the mean over k micro-batches
  (:func:`accumulated_grads`); with ``ema_decay > 0`` the state's
  ``ema_params`` follow the parameters.

  With ``nan_guard`` 'stop' or 'skip' the step is *good* when the loss, the
  gradient norm and the new parameters' global norm (float32, so parameters
  past about 1e19 count as blown up) are all finite and the new parameters
  hold no NaN or inf. A bad step keeps the old parameters, optimizer and
  EMA state (only ``step`` advances, as its batch was consumed) and reports
  ``skipped = 1``; the host decides whether to stop (:func:`train`).
  """
  if nan_guard not in ("off", "stop", "skip"):
    raise ValueError(f"nan_guard={nan_guard!r}; choose 'off', 'stop' or "
                     "'skip'")

  def train_step(state: TrainState, batch, base_rng):
    step_rng = jax.random.fold_in(base_rng, state.step)
    (loss, metrics), grads = accumulated_grads(
        loss_fn, state.params, batch, step_rng, state.step, grad_accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay:
      d = ema_decay_at(ema_decay, state.step)
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                     ema_params=ema)
    if nan_guard != "off":
      param_norm = optax.tree.norm(jax.tree.map(
          lambda x: x.astype(jnp.float32), params))
      good = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) &
              jnp.isfinite(param_norm) & all_finite(params))
      kept = state.replace(step=state.step + 1)
      new = jax.tree.map(lambda n, o: jnp.where(good, n, o), new, kept)
      metrics.update(param_norm=param_norm,
                     skipped=1.0 - good.astype(jnp.float32))
    return new, metrics

  return train_step


def init_train_state(params, tx: optax.GradientTransformation,
                     ema_decay: float = 0.0) -> TrainState:
  """Step 0: the optimizer's state and, with EMA, a copy of ``params``."""
  ema = jax.tree.map(jnp.copy, params) if ema_decay else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), ema_params=ema)


@dataclasses.dataclass
class Program:
  """The compiled-to-be pieces of a training run on a mesh.

  Attributes:
    abstract: the TrainState as ShapeDtypeStructs (parameters unboxed).
    shardings: its NamedShardings (logical rules for parameters with axis
      names, the fsdp size rule for the rest).
    init: jitted ``rng -> TrainState``, sharded.
    train_step: jitted, donated ``(state, batch, rng) -> (state, metrics)``.
    eval_step: jitted ``(params, batch) -> per-example values``, or None.
    mesh: the mesh.
    rules: the logical axis rules of parameters and activations.
  """
  abstract: Any
  shardings: Any
  init: Callable[..., Any]
  train_step: Any
  eval_step: Any
  mesh: Any
  rules: tuple

  def call(self, fn):
    """``fn`` called under the activation rules (they apply when it traces)."""
    def under_rules(*args):
      with sharding.activation_rules(self.mesh, self.rules):
        return fn(*args)
    return under_rules

  def lower_train_step(self, batch: Any):
    """``train_step`` lowered for abstract ``batch`` (ShapeDtypeStructs of
    the global batch), e.g. to compile ahead of time for another machine."""
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract, self.shardings)
    batch = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=sharding.batch_sharding(
                                           self.mesh)), batch)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    with sharding.activation_rules(self.mesh, self.rules):
      return self.train_step.lower(state, batch, rng)


def nan_guard_of(tcfg: ml_collections.ConfigDict) -> str:
  """``tcfg.nan_guard``, or the schema's default for configs without it."""
  from mesp_jax.base.schema import SCHEMA
  return tcfg.get("nan_guard", SCHEMA["train"]["nan_guard"].default)


def check_batch(tcfg: ml_collections.ConfigDict, mesh) -> None:
  """Raises ConfigError unless ``tcfg.batch_size`` splits evenly over the
  mesh's data-parallel devices and ``tcfg.grad_accum_steps`` micro-batches."""
  dp = sharding.data_parallel_size(mesh)
  accum = int(tcfg.get("grad_accum_steps", 1))
  if tcfg.batch_size % (dp * accum):
    raise ConfigError(
        f"config.train.batch_size={tcfg.batch_size} must be divisible by the "
        f"data-parallel size {dp} (mesh {dict(mesh.shape)}) times "
        f"config.train.grad_accum_steps={accum}")


def check_eval_batch(tcfg: ml_collections.ConfigDict, mesh) -> None:
  """Raises ConfigError unless ``tcfg.eval_batch_size`` (default
  ``batch_size``) splits evenly over the mesh's data-parallel devices.

  Eval batches are placed on the mesh like training batches; without this
  check an indivisible size fails at the first eval, after training.
  """
  dp = sharding.data_parallel_size(mesh)
  size = int(tcfg.get("eval_batch_size", tcfg.batch_size))
  if size % dp:
    raise ConfigError(
        f"config.train.eval_batch_size={size} must be divisible by the "
        f"data-parallel size {dp} (mesh {dict(mesh.shape)}): eval batches "
        f"are split over those devices; use e.g. "
        f"--config.train.eval_batch_size={max(dp, size // dp * dp)}")


def build_program(config: ml_collections.ConfigDict, task: Task, example: Any,
                  mesh, tx: optax.GradientTransformation | None = None
                  ) -> Program:
  """Shardings and jitted steps of ``task`` on ``mesh`` for ``config.train``.

  Args:
    config: the run's config (``train``, ``mesh`` sections).
    task: the stage's Task (only its pure functions are used).
    example: a one-example batch (arrays or ShapeDtypeStructs) for the
      parameter shapes.
    mesh: the mesh.
    tx: the optimizer (default: :func:`make_optimizer` of ``config.train``).
  """
  tcfg = config.train
  tx = tx or make_optimizer(tcfg)
  accum = int(tcfg.get("grad_accum_steps", 1))
  ema_decay = float(tcfg.get("ema_decay", 0.0))
  rules = sharding.rules_from_config(config)
  min_mb = config.get("mesh", {}).get("min_fsdp_size_mb", 4.0)

  def init_boxed(r):
    return init_train_state(task.init_params(r, example), tx, ema_decay)

  def init_state(r):
    return sharding.unbox(init_boxed(r))

  boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  state_shardings = sharding.state_shardings(boxed, mesh, rules, min_mb)
  abstract = sharding.unbox(boxed)
  batch_shard = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  train_step = jax.jit(make_train_step(task.loss_fn, tx, accum, ema_decay,
                                       nan_guard_of(tcfg)),
                       in_shardings=(state_shardings, batch_shard, repl),
                       out_shardings=(state_shardings, repl),
                       donate_argnums=(0,))
  eval_step = None
  if task.eval_fn is not None:
    eval_step = jax.jit(task.eval_fn,
                        in_shardings=(state_shardings.params, batch_shard),
                        out_shardings=batch_shard)
  # init runs outside the activation rules: under them flax would also
  # constrain each boxed initializer output, and DenseGeneral boxes its
  # kernels before reshaping them to their named rank.
  return Program(abstract=abstract, shardings=state_shardings,
                 init=jax.jit(init_state, out_shardings=state_shardings),
                 train_step=train_step, eval_step=eval_step, mesh=mesh,
                 rules=rules)


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped and saved; rerun to resume


class Preempted(Exception):
  """Training stopped on SIGTERM / SIGINT after saving a checkpoint."""

  def __init__(self, stage: str, step: int, directory: str, why: str):
    super().__init__(
        f"{stage}: stopped by {why} at step {step}; its checkpoint is saved "
        f"in {directory}. Rerun the same command to resume from it.")
    self.step = step


class _StopRequest:
  """Notices SIGTERM / SIGINT so that training stops at a step boundary.

  One process: the first signal is recorded and the loop saves and stops
  after the current step; a second SIGTERM (SLURM sends one to the job and
  the launcher forwards another) is ignored, a second SIGINT (Ctrl-C twice)
  stops at once. Several processes: JAX's preemption service catches
  SIGTERM and :func:`multihost_utils.reached_preemption_sync_point` names
  the same step on every process, so all save the same checkpoint (SIGINT
  keeps its default there).
  """

  def __init__(self):
    self.received: str | None = None
    self._previous: dict[int, Any] = {}
    self._multihost = jax.process_count() > 1

  def install(self) -> None:
    """Handles the signals (from the main thread only) until :meth:`restore`."""
    # Several processes: no handler here (one process stopping alone would
    # hang the others in the checkpoint's collectives); JAX's own SIGTERM
    # notice goes to all of them.
    if not self._multihost and (threading.current_thread() is
                                threading.main_thread()):
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.received is not None:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      logging.warning("%s again: already stopping", name)
      return
    self.received = name
    logging.warning("%s: saving a checkpoint after this step", name)

  def should_stop(self, step: int) -> bool:
    if self._multihost:
      from jax._src import distributed
      from jax.experimental import multihost_utils
      if (self.received is None and
          distributed.global_state.preemption_sync_manager is not None and
          multihost_utils.reached_preemption_sync_point(step)):
        self.received = "a preemption notice (SIGTERM)"
    return self.received is not None


class NonFiniteLossError(FloatingPointError):
  """Training hit non-finite values; no checkpoint of a bad state is saved."""


def _newest_checkpoint(manager, directory: str, guarded: bool = True) -> str:
  step = manager.latest_step()
  if step is None:
    return (f"no checkpoint was saved yet in {directory}, so a rerun starts "
            f"from step 0")
  if not guarded:
    return (f"the newest checkpoint is step {step} in {directory} (saved "
            f"before a non-finite loss was logged) and a rerun resumes from "
            f"it")
  return (f"the newest checkpoint, step {step} in {directory}, holds finite "
          f"parameters (the guard never lets a bad step into the state) and "
          f"a rerun resumes from it")


class _Guard:
  """The host half of the NaN guard: reads each step's ``skipped`` flag
  when metrics are flushed and decides whether to stop."""

  def __init__(self, mode: str, max_skipped: int, stage: str):
    self.mode, self.max_skipped, self.stage = mode, max_skipped, stage
    self.in_a_row = 0
    self.total = 0

  def check(self, rows: list[tuple[int, int, dict]], manager, directory: str,
            hint: str) -> None:
    """``rows``: (step, batch index, host metrics) in step order."""
    for step, batch_index, m in rows:
      bad = (m.get("skipped", 0.0) > 0 if self.mode != "off"
             else not np.isfinite(m["loss"]))
      if not bad:
        self.in_a_row = 0
        continue
      self.total += 1
      self.in_a_row += 1
      what = (f"loss {m['loss']:.4g}, gradient norm "
              f"{m.get('grad_norm', float('nan')):.4g}, parameter norm "
              f"{m.get('param_norm', float('nan')):.4g}")
      if self.mode == "off":
        raise NonFiniteLossError(
            f"{self.stage}: the loss became {m['loss']} at step {step} (data "
            f"batch {batch_index}); config.train.nan_guard='off', so the "
            f"state may be ruined and nothing after the last checkpoint is "
            f"saved: {_newest_checkpoint(manager, directory, False)}. "
            f"{hint}")
      if self.mode == "stop":
        raise NonFiniteLossError(
            f"{self.stage}: step {step} (data batch {batch_index}) was not "
            f"finite ({what}); it was not applied and training stopped "
            f"(config.train.nan_guard='stop'): "
            f"{_newest_checkpoint(manager, directory)}. {hint} Or set "
            f"config.train.nan_guard=skip to step over such batches.")
      logging.warning("%s: skipped step %d (data batch %d): %s", self.stage,
                      step, batch_index, what)
      if self.in_a_row >= self.max_skipped:
        raise NonFiniteLossError(
            f"{self.stage}: {self.in_a_row} steps in a row were not finite "
            f"(the last: step {step}, data batch {batch_index}, {what}); "
            f"they were skipped and training stopped "
            f"(config.train.max_skipped_steps={self.max_skipped}): "
            f"{_newest_checkpoint(manager, directory)}. {hint}")


def _average(sums: dict[str, np.ndarray], count: float) -> dict[str, Any]:
  return {k: v / max(count, 1.0) for k, v in sums.items()}


def evaluate(task: Task, eval_step, state: TrainState, mesh) -> dict[str, Any]:
  """Masked average of ``task.eval_fn`` over ``task.eval_batches()``."""
  sums: dict[str, np.ndarray] = {}
  count = 0.0
  for batch in task.eval_batches():
    mask = sharding.gather_local(batch.pop("mask"))
    out = sharding.to_host(eval_step(state.inference_params,
                                     sharding.shard_batch(batch, mesh)))
    m = mask.astype(np.float64)
    for k, v in out.items():
      v = np.asarray(v, np.float64)
      contrib = np.tensordot(m, v, axes=(0, 0))
      sums[k] = sums.get(k, 0.0) + contrib
    count += float(m.sum())
  metrics = _average(sums, count)
  if task.summarize_eval is not None:
    metrics.update(task.summarize_eval(metrics))
  return metrics


def train(config: ml_collections.ConfigDict, workdir: str, task: Task,
          mesh=None) -> TrainState:
  """Trains ``task`` for ``config.train.num_steps``; resumes from ``workdir``.

  Returns the final TrainState (sharded on the mesh).
  """
  tcfg = config.train
  mesh = mesh or sharding.mesh_from_config(config)
  check_batch(tcfg, mesh)
  check_eval_batch(tcfg, mesh)
  io.makedirs(workdir)
  tx = make_optimizer(tcfg)
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)

  iter_peek = _Peek(task.train_batches)
  first = iter_peek.peek()
  example = jax.tree.map(lambda x: jnp.asarray(x[:1]), first)

  program = build_program(config, task, example, mesh, tx)
  abstract, state_shardings = program.abstract, program.shardings

  ckpt_dir = os.path.join(workdir, "checkpoints")
  manager = ckpt.make_manager(ckpt_dir,
                              max_to_keep=tcfg.get("keep_checkpoints", 3),
                              async_save=tcfg.get("async_checkpoint", True))
  restored = ckpt.restore_latest(
      manager, ckpt.abstract_with_shardings(abstract, state_shardings),
      task.meta, move_damaged=True)
  writer = MetricWriter(workdir, tensorboard=tcfg.get("tensorboard", True))
  if restored is None:
    state = program.init(init_rng)
    start = 0
    writer.truncate_after(-1)
  else:
    start, state, loader_state = restored
    try:
      iter_peek.set_state(loader_state)
    except ValueError as e:  # another data set or batch size: a user error
      raise ckpt.CheckpointMismatchError(
          f"{task.name}: the checkpoint in {ckpt_dir} (step {start}) was "
          f"written for other data: {e}") from None
    writer.truncate_after(start)
    logging.info("resumed %s from step %d", task.name, start)
    if io.is_writer():
      print(f"[{task.name}] resumed from checkpoint step {start}", flush=True)
  provenance.keep_config(workdir, task.name, config.to_dict())

  p_train_step = program.call(program.train_step)
  p_eval_step = (program.call(program.eval_step)
                 if program.eval_step is not None else None)

  num_steps = int(tcfg.num_steps)
  log_every = int(tcfg.get("log_every", 50))
  eval_every = int(tcfg.get("eval_every", 0)) or num_steps
  ckpt_every = int(tcfg.get("checkpoint_every", 0)) or num_steps
  vis_every = int(tcfg.get("visualize_every", 0)) or eval_every
  progress = Progress(num_steps, start, task.name)
  guard = _Guard(nan_guard_of(tcfg), int(tcfg.get("max_skipped_steps", 10)),
                 task.name)
  hint = ("Lower config.train.learning_rate, enable config.train.grad_clip "
          "or check the data, then rerun the same command.")
  pending: list[tuple[int, int, dict]] = []  # (step, batch index, metrics)
  sealer = ckpt.Sealer(manager)  # checksums of the steps this run saves

  def flush(step: int) -> None:
    if not pending:
      return
    host = sharding.to_host([m for _, _, m in pending])
    rows = [(s, b, m) for (s, b, _), m in zip(pending, host, strict=True)]
    pending.clear()
    guard.check(rows, manager, ckpt_dir, hint)
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    if "skipped" in mean:
      mean["skipped"] = float(np.sum([m["skipped"] for m in host]))
    writer.write(step, mean, "train")
    progress.update(step, mean)

  def save(step: int) -> None:
    sealer.save(step, state, iter_peek.get_state(), task.meta)

  step = start
  stop = _StopRequest()
  stop.install()
  finished = False
  try:
    while step < num_steps:
      batch_index = int(iter_peek.get_state().get("step", step))
      batch = sharding.shard_batch(next(iter_peek), mesh)
      state, metrics = p_train_step(state, batch, train_rng)
      step += 1
      pending.append((step, batch_index, metrics))
      if step % log_every == 0 or step == num_steps:
        flush(step)
      if p_eval_step is not None and (step % eval_every == 0
                                      or step == num_steps):
        flush(step)
        ev = evaluate(task, p_eval_step, state, mesh)
        writer.write(step, ev, "eval")
        progress.update(step, {f"eval_{k}": v for k, v in ev.items()
                               if np.ndim(v) == 0})
      if task.visualize is not None and (step % vis_every == 0
                                         or step == num_steps):
        task.visualize(state.inference_params, step, workdir)
      saved = step % ckpt_every == 0 or step == num_steps
      if saved:
        flush(step)
        save(step)
      if stop.should_stop(step) and step < num_steps:
        flush(step)
        if not saved:
          save(step)
        sealer.close()
        raise Preempted(task.name, step, ckpt_dir, stop.received)
    finished = True
  finally:
    stop.restore()
    # Seal what this run saved (the saves are complete by then), also when
    # it stops on an error: those steps were written before the error.
    try:
      sealer.close()
    except Exception:  # noqa: BLE001 - do not hide the original error
      if finished:
        raise
      logging.exception("could not write checkpoint checksums")
    writer.close()
    iter_peek.close()
  return state


def restore_params(workdir: str, config: ml_collections.ConfigDict,
                   init_params: Callable[[jax.Array], Any], meta: dict,
                   mesh=None, use_ema: bool = True) -> tuple[Any, int]:
  """Restores the parameters of a finished (or running) training workdir.

  ``init_params(rng) -> params`` gives the structure; the optimizer state is
  rebuilt from ``config.train`` so the saved TrainState matches.

  Returns:
    (params sharded on the mesh, checkpoint step). The EMA parameters when
    the run kept them (``train.ema_decay > 0``) and ``use_ema``.
  """
  mesh = mesh or sharding.make_mesh()
  tx = make_optimizer(config.train)
  ema_decay = float(config.train.get("ema_decay", 0.0))

  def init_state(r):
    return init_train_state(init_params(r), tx, ema_decay)

  boxed = jax.eval_shape(init_state, jax.random.key(0))
  shardings = sharding.state_shardings(
      boxed, mesh, sharding.rules_from_config(config),
      config.get("mesh", {}).get("min_fsdp_size_mb", 4.0))
  abstract = sharding.unbox(boxed)
  manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"),
                              async_save=False)
  restored = ckpt.restore_latest(
      manager, ckpt.abstract_with_shardings(abstract, shardings), meta,
      with_position=False)
  if restored is None:
    raise FileNotFoundError(
        f"no checkpoint in {workdir}/checkpoints; train stage "
        f"{meta.get('stage', '?')!r} into that workdir first")
  step, state, _ = restored
  return (state.inference_params if use_ema else state.params), step


def load_run_config(workdir: str, name: str) -> ml_collections.ConfigDict:
  """The config a trained stage saved in its workdir (``{name}_config.json``).

  Raises:
    FileNotFoundError: ``workdir`` holds no such run, with what to do.
  """
  path = os.path.join(workdir, f"{name}_config.json")
  if not io.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir!r} is not a trained {name} workdir. Train "
        f"it first (stage '{name}') or point the config at the right folder.")
  return ml_collections.ConfigDict(json.loads(io.read_bytes(path)))


class _Peek:
  """Wraps a loader so the first batch (used for shapes) is not lost.

  While the peeked batch is unconsumed, the position is the one before it.
  """

  def __init__(self, loader):
    self.loader = loader
    self._head = None
    self._head_state = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._head is not None:
      head, self._head = self._head, None
      return head
    return next(self.loader)

  def peek(self):
    if self._head is None:
      self._head_state = dict(self.loader.get_state())
      self._head = next(self.loader)
    return self._head

  def get_state(self) -> dict:
    if self._head is not None:  # the peeked batch was not consumed yet
      return dict(self._head_state)
    return dict(self.loader.get_state())

  def set_state(self, state: dict) -> None:
    self._head = None
    self.loader.set_state(state)

  def close(self) -> None:
    if hasattr(self.loader, "close"):
      self.loader.close()
