"""Tensor parallelism, scanned layers, rematerialisation and restoring a
checkpoint onto another mesh, each against a single-device reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from arvm_testing import random_setup, tiny_arvm
from jax.sharding import PartitionSpec as P

from mesp_jax.base import config as config_lib
from mesp_jax.base import sharding
from mesp_jax.models import arvm as arvm_lib
from mesp_jax.sample import decode, wavefront
from mesp_jax.train import arvm as arvm_train
from mesp_jax.train import checkpoint as ckpt
from mesp_jax.train import loop

GRID, BITS, BATCH = (4, 4), 4, 16

# A sharded step reorders float32 sums (the model axis adds partial sums of
# the attention and MLP outputs); measured <= 2e-6 relative on the loss.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5  # after 3 AdamW steps of learning rate 1e-3


def _config(**arvm) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seed=0,
      arvm=config_lib.section(
          "arvm", group=2, gamma=1, num_layers=2, d_model=32, num_heads=4,
          mlp_ratio=2.0, num_classes=5, **arvm),
      train=config_lib.section("train", batch_size=BATCH, learning_rate=1e-3,
                               warmup_steps=0, grad_clip=1.0),
      mesh=config_lib.section("mesh")))


def _program(config, mesh) -> tuple[loop.Program, arvm_lib.ARVM]:
  model, init_params, loss_fn, eval_fn = arvm_train.functions(config, GRID,
                                                              BITS)
  task = loop.Task(name="arvm", init_params=init_params, loss_fn=loss_fn,
                   eval_fn=eval_fn, meta={}, train_batches=None)
  example = {"tokens": jnp.zeros((1, *GRID, BITS // 2), jnp.int32),
             "label": jnp.zeros((1,), jnp.int32)}
  return loop.build_program(config, task, example, mesh), model


def _batches(n: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(3)
  return [{"tokens": rng.integers(0, 4, (BATCH, *GRID, 2)).astype(np.int32),
           "label": rng.integers(0, 5, (BATCH,)).astype(np.int32)}
          for _ in range(n)]


def _mesh(data, fsdp, model, n=None):
  return sharding.make_mesh(data, fsdp, jax.devices()[:n or data * fsdp * model],
                            model=model)


def _run(program, state, batches):
  step = program.call(program.train_step)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.shard_batch(batch, program.mesh),
                          jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return state, losses


def _on(program, host_state):
  return jax.device_put(host_state, program.shardings)


def _without_key_bias(params):
  """Parameters without the key projection's bias. Its gradient is zero in
  exact arithmetic (a shift of every key by the same vector moves all of a
  query's scores equally, and softmax ignores that), so Adam turns its float
  noise, which differs between meshes, into steps of the learning rate."""
  params = jax.tree.map(lambda x: x, params)
  for name, block in params["params"].items():
    if name.startswith("block_"):
      del block["attn"]["key_value"]["bias"]
  return params


def _assert_trees_close(a, b, atol, rtol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def test_logical_rules_shard_heads_mlp_and_width():
  program, _ = _program(_config(), _mesh(2, 2, 2))
  block = program.shardings.params["params"]["block_0"]
  assert block["attn"]["query"]["kernel"].spec == P("fsdp", "model", None)
  assert block["attn"]["out"]["kernel"].spec == P("model", None, "fsdp")
  assert block["mlp_in"]["kernel"].spec == P("fsdp", "model")
  assert block["mlp_out"]["kernel"].spec == P("model", "fsdp")
  head = program.shardings.params["params"]["head"]["kernel"]
  assert head.spec == P("fsdp", "model")  # 2^g histogram bins over model
  # Adam's moments follow their parameters.
  leaves = jax.tree_util.tree_flatten_with_path(program.shardings.opt_state)[0]
  moments = [s.spec for path, s in leaves
             if "'block_0'" in jax.tree_util.keystr(path)
             and "'mlp_in'" in jax.tree_util.keystr(path)
             and "'kernel'" in jax.tree_util.keystr(path)]
  assert len(moments) == 2 and all(m == P("fsdp", "model") for m in moments)
  # The label table (6 rows) has no rule for its rows: width over fsdp only.
  labels = program.shardings.params["params"]["label_embed"]["embedding"]
  assert labels.spec == P(None, "fsdp")


def test_logical_spec_skips_axes_that_do_not_divide():
  mesh = _mesh(2, 2, 2)
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_spec(("embed", "mlp"), (5, 8), mesh, rules) == P(
      None, "model")
  assert sharding.logical_spec(("batch", "embed"), (8, 4), mesh, rules) == P(
      ("data", "fsdp"), None)  # fsdp already used by the batch


def test_data_fsdp_model_step_equals_one_device():
  """(data 2, fsdp 2, model 2) on 8 devices == 1 device, 3 AdamW steps."""
  config = _config()
  one, _ = _program(config, _mesh(1, 1, 1))
  init = sharding.to_host(one.init(jax.random.key(0)))
  ref_state, ref_losses = _run(one, _on(one, init), _batches(3))
  big, _ = _program(config, _mesh(2, 2, 2))
  state, losses = _run(big, _on(big, init), _batches(3))
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  got, want = (_without_key_bias(sharding.to_host(s.params))
               for s in (state, ref_state))
  _assert_trees_close(got, want, PARAM_ATOL)
  kernel = state.params["params"]["block_0"]["mlp_in"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (16, 32)  # [32/2, 64/2]


def test_model_axis_must_divide_heads():
  config = _config()
  config.mesh.model = 3
  config.inputs = config_lib.section("inputs", tokens_dir="x")
  config.tokens = config_lib.section("tokens")
  config.sampler = config_lib.section("sampler")
  with pytest.raises(config_lib.ConfigError, match="mesh.model=3 must divide"):
    config_lib.validate(config, "arvm")


@pytest.mark.parametrize("attention", ["dense", "block_local"])
@pytest.mark.parametrize("remat", ["none", "full", "dots_no_batch"])
def test_scan_and_remat_equal_the_plain_layers(attention, remat):
  """Scanned / rematerialised blocks: same logits and gradients as the plain
  loop, with the plain parameters stacked (float32; measured <= 2e-6)."""
  plain = tiny_arvm(num_layers=3, attention=attention)
  params, tokens, _ = random_setup(plain, batch=2, seed=1)
  scanned = tiny_arvm(num_layers=3, attention=attention, scan_layers=True,
                      remat=remat)
  stacked = arvm_lib.stack_layers(params, 3)
  np.testing.assert_allclose(scanned.apply(stacked, tokens),
                             plain.apply(params, tokens), atol=1e-5)

  def grads(model, p):
    return jax.grad(lambda q: jnp.sum(jnp.sin(model.apply(q, tokens))))(p)

  _assert_trees_close(grads(scanned, stacked),
                      arvm_lib.stack_layers(grads(plain, params), 3),
                      atol=1e-5, rtol=1e-5)


def test_scanned_decoding_matches_the_full_pass_and_plain_tokens():
  plain = tiny_arvm(num_layers=3, gamma=1)
  params, tokens, _ = random_setup(plain, batch=2, seed=2)
  scanned = tiny_arvm(num_layers=3, gamma=1, scan_layers=True)
  stacked = arvm_lib.stack_layers(params, 3)
  full = scanned.apply(stacked, tokens)
  np.testing.assert_allclose(
      decode.teacher_forced_logits(scanned, stacked, tokens), full, atol=1e-4)
  np.testing.assert_allclose(
      wavefront.wavefront_logits(scanned, stacked, tokens), full, atol=1e-4)
  mesh = sharding.make_mesh()
  for order in ("raster", "wavefront"):
    a = decode.sample_tokens(plain, params, jax.random.key(4), 8, mesh=mesh,
                             order=order)
    b = decode.sample_tokens(scanned, stacked, jax.random.key(4), 8,
                             mesh=mesh, order=order)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scan_config_compiles_one_block():
  """With scan_layers the parameters hold one stacked block."""
  program, _ = _program(_config(scan_layers=True, remat="full"),
                        _mesh(2, 2, 2))
  inner = program.abstract.params["params"]
  assert "layers" in inner and "block_0" not in inner
  assert inner["layers"]["mlp_in"]["kernel"].shape == (2, 32, 64)
  spec = program.shardings.params["params"]["layers"]["mlp_in"]["kernel"].spec
  assert spec == P(None, "fsdp", "model")


@pytest.mark.parametrize("target", [(8, 1, 1, 8), (1, 2, 2, 4), (1, 1, 1, 1)],
                         ids=["8x1x1", "4-devices", "1-device"])
def test_checkpoint_restores_onto_another_mesh(tmp_path, target):
  """Saved on (2, 2, 2), restored on another mesh: identical parameters and
  optimizer state; the next step there equals the next step on (2, 2, 2)."""
  config = _config()
  source, _ = _program(config, _mesh(2, 2, 2))
  state, _ = _run(source, source.init(jax.random.key(0)), _batches(2))
  saved = sharding.to_host(state)
  manager = ckpt.make_manager(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(manager, 2, state, {"step": 2}, {"stage": "arvm"})
  manager.wait_until_finished()
  _, next_losses = _run(source, state, _batches(3)[2:])

  data, fsdp, model, n = target
  dest, _ = _program(config, _mesh(data, fsdp, model, n))
  step, restored, position = ckpt.restore_latest(
      ckpt.make_manager(str(tmp_path / "checkpoints"), async_save=False),
      ckpt.abstract_with_shardings(dest.abstract, dest.shardings),
      {"stage": "arvm"})
  assert step == 2 and position["step"] == 2
  for x, y in zip(jax.tree.leaves(sharding.to_host(restored)),
                  jax.tree.leaves(saved), strict=True):
    np.testing.assert_array_equal(x, y)
  leaf = restored.params["params"]["block_0"]["mlp_in"]["kernel"]
  assert len(leaf.sharding.device_set) == n
  _, losses = _run(dest, restored, _batches(3)[2:])
  np.testing.assert_allclose(losses, next_losses, rtol=LOSS_RTOL)
