"""The BL-AE model's residual designs (norm 'none' / 'group'), compute dtype
and the checkpoint meta of configs saved before those fields existed."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mesp_jax.base import config as cu
from mesp_jax.models import blae as blae_lib
from mesp_jax.models.blae import BLAE, architecture_kwargs, build_blae, count_params
from mesp_jax.train import blae as blae_train
from mesp_jax.train import checkpoint

# Parameter shapes of the code before `norm` existed (recorded from it),
# for DOWN and FULL below.
_RES = {"conv1/bias": (16,), "conv1/kernel": (3, 3, 16, 16),
        "conv2/bias": (16,), "conv2/kernel": (3, 3, 16, 16)}
_RES8 = {k: v[:-2] + (8, 8) if len(v) == 4 else (8,) for k, v in _RES.items()}
OLD_DOWN_SHAPES = {
    "decoder/from_bits/bias": (16,), "decoder/from_bits/kernel": (3, 3, 4, 16),
    **{f"decoder/mid_res{i}/{k}": v for i in (0, 1) for k, v in _RES.items()},
    "decoder/out/bias": (3,), "decoder/out/kernel": (3, 3, 8, 3),
    "decoder/up0_conv/bias": (8,), "decoder/up0_conv/kernel": (3, 3, 16, 8),
    **{f"decoder/up0_res/{k}": v for k, v in _RES8.items()},
    "decoder/up1_conv/bias": (16,), "decoder/up1_conv/kernel": (3, 3, 16, 16),
    **{f"decoder/up1_res/{k}": v for k, v in _RES.items()},
    "encoder/down0_conv/bias": (16,), "encoder/down0_conv/kernel": (4, 4, 8, 16),
    **{f"encoder/down0_res/{k}": v for k, v in _RES8.items()},
    "encoder/down1_conv/bias": (16,),
    "encoder/down1_conv/kernel": (4, 4, 16, 16),
    **{f"encoder/down1_res/{k}": v for k, v in _RES.items()},
    **{f"encoder/mid_res{i}/{k}": v for i in (0, 1) for k, v in _RES.items()},
    "encoder/stem/bias": (8,), "encoder/stem/kernel": (3, 3, 3, 8),
    "encoder/to_bits/bias": (4,), "encoder/to_bits/kernel": (1, 1, 16, 4),
}
_RES1 = {"conv1/bias": (8,), "conv1/kernel": (1, 1, 8, 8),
         "conv2/bias": (8,), "conv2/kernel": (1, 1, 8, 8)}
OLD_FULL_SHAPES = {
    "decoder/from_bits/bias": (8,), "decoder/from_bits/kernel": (1, 1, 4, 8),
    "decoder/out/bias": (1,), "decoder/out/kernel": (3, 3, 8, 1),
    **{f"{p}/res{i}/{k}": v for p in ("encoder", "decoder") for i in (0, 1)
       for k, v in _RES1.items()},
    "encoder/stem/bias": (8,), "encoder/stem/kernel": (3, 3, 1, 8),
    "encoder/to_bits/bias": (4,), "encoder/to_bits/kernel": (1, 1, 8, 4),
}
DOWN = dict(family="downsample", width=8, bits=4, num_res_blocks=2,
            downsample_factor=4, channel_mult=(1, 2), image_channels=3)
FULL = dict(family="full_res", width=8, bits=4, num_res_blocks=2,
            stem_kernel=3, downsample_factor=1, image_channels=1)
# The old code's sum z, sum |z| and sum |recon| on _inputs with
# _random_params (numpy normal(0, 0.1), seed 0, in tree order).
OLD_NUMBERS = {"downsample": (-3.2801990509033203, 5.292226314544678,
                              161.0365447998047),
               "full_res": (-50.239463806152344, 196.5165557861328,
                            67.38013458251953)}


def _paths(params) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(p.key for p in path[1:]): tuple(v.shape)
          for path, v in flat}


def _inputs(model: BLAE, size: int = 16, batch: int = 2):
  x = np.random.default_rng(1).uniform(
      -1, 1, (batch, size, size, model.image_channels))  # [B, H, W, C]
  code = jnp.zeros((batch,) + model.latent_shape(x.shape[1:]))
  return jnp.asarray(x, jnp.float32), code


def _random_params(model: BLAE, x, code, scale: float = 0.1):
  """normal(0, scale) parameters in ``model``'s tree, drawn with numpy: no
  init to compile (XLA:CPU compiles ``init`` slowly on small machines)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, code)
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0, scale, s.shape), s.dtype), shapes)


@pytest.mark.parametrize("kw,shapes", [(DOWN, OLD_DOWN_SHAPES),
                                       (FULL, OLD_FULL_SHAPES)])
def test_default_design_is_unchanged(kw, shapes):
  model = BLAE(**kw)
  assert (model.norm, model.num_groups, model.dtype) == ("none", 32,
                                                         "float32")
  x, code = _inputs(model)
  params = _random_params(model, x, code)
  assert _paths(params) == shapes
  rec, z = model.apply(params, x, code)
  assert z.dtype == rec.dtype == jnp.float32
  np.testing.assert_allclose(
      [jnp.sum(z), jnp.sum(jnp.abs(z)), jnp.sum(jnp.abs(rec))],
      OLD_NUMBERS[kw["family"]], rtol=1e-4)


def _group(**kw) -> BLAE:
  base = dict(family="downsample", width=8, bits=6, num_res_blocks=1,
              image_channels=3, norm="group", num_groups=4)
  return BLAE(**{**base, **kw})


@pytest.mark.parametrize("f,mult", [(8, (1, 2, 2, 4)), (16, (1, 1, 2, 2, 4))])
def test_group_design_shapes(f, mult):
  model = _group(downsample_factor=f, channel_mult=mult)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  code = jax.ShapeDtypeStruct((2,) + model.latent_shape((64, 64, 3)),
                              jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, code)
  rec, z = jax.eval_shape(model.apply, params, x, code)
  assert z.shape == (2, 64 // f, 64 // f, 6) and rec.shape == (2, 64, 64, 3)
  paths = _paths(params)
  num_down = {8: 3, 16: 4}[f]
  assert paths["encoder/norm_out/scale"] == (8 * mult[-1],)
  assert paths["decoder/norm_out/scale"] == (8,)
  for s in range(num_down):
    assert f"encoder/down{s}_res0/norm1/scale" in paths
    assert f"decoder/up{s}_res0/norm2/bias" in paths
  assert count_params(params) == sum(np.prod(v) for v in paths.values())


def test_group_blocks_per_stage_and_width_changes():
  model = _group(downsample_factor=4, channel_mult=(1, 2), num_res_blocks=2)
  x, code = _inputs(model)
  params = _random_params(model, x, code)
  paths = _paths(params)
  enc_blocks = sorted({p.split("/")[1] for p in paths
                       if p.startswith("encoder/") and "_res" in p})
  assert enc_blocks == ["down0_res0", "down0_res1", "down1_res0",
                        "down1_res1", "mid_res0", "mid_res1"]
  shortcuts = sorted(p for p in paths if "nin_shortcut/kernel" in p)
  # widths [8, 16, 16]: 8 -> 16 in stage 1 (encoder), 16 -> 8 in stage 0.
  assert shortcuts == ["decoder/up0_res0/nin_shortcut/kernel",
                       "encoder/down1_res0/nin_shortcut/kernel"]
  assert paths["encoder/down1_res0/nin_shortcut/kernel"] == (1, 1, 8, 16)
  assert paths["decoder/up0_res0/nin_shortcut/kernel"] == (1, 1, 16, 8)
  # Width-keeping resampling convs.
  assert paths["encoder/down0_conv/kernel"] == (4, 4, 8, 8)
  assert paths["decoder/up0_conv/kernel"] == (3, 3, 16, 16)
  rec, z = model.apply(params, x, code)
  assert z.shape == (2, 4, 4, 6) and rec.shape == x.shape
  assert bool(jnp.all(jnp.isfinite(rec))) and bool(jnp.all(jnp.abs(z) < 1))


def test_num_groups_must_divide_every_width():
  model = _group(width=16, downsample_factor=4, channel_mult=(2, 3),
                 num_groups=32)  # widths [32, 48, 48]
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  code = jax.ShapeDtypeStruct((1, 4, 4, 6), jnp.float32)
  with pytest.raises(ValueError, match=r"num_groups=32 .*\[32, 48, 48\]"):
    jax.eval_shape(model.init, jax.random.key(0), x, code)
  cfg = cu.section("blae", width=16, downsample_factor=4, channel_mult=(2, 3),
                   norm="group", num_groups=32)
  with pytest.raises(ValueError, match=r"config\.blae\.num_groups=32.*"
                     r"\[32, 48, 48\]"):
    build_blae(cfg, 3)
  cfg.num_groups = 16
  assert build_blae(cfg, 3).num_groups == 16
  cfg.norm = "none"  # no GroupNorm: any num_groups
  cfg.num_groups = 32
  assert build_blae(cfg, 3).norm == "none"


@pytest.mark.parametrize("field,value,message", [
    ("norm", "batch", r"config\.blae\.norm='batch'"),
    ("num_groups", 0, r"config\.blae\.num_groups=0"),
    ("dtype", "float16", r"config\.blae\.dtype='float16'"),
])
def test_bad_values_name_the_field(field, value, message):
  cfg = cu.section("blae", width=8)
  cfg[field] = value
  with pytest.raises(ValueError, match=message):
    architecture_kwargs(cfg, "blae")


def test_config_saved_before_the_fields_builds_the_old_model():
  cfg = ml_collections.ConfigDict(dict(
      family="downsample", width=8, bits=4, num_res_blocks=1, stem_kernel=7,
      downsample_factor=2, channel_mult=(1,)))
  kw = architecture_kwargs(cfg, "blae")
  assert (kw["norm"], kw["num_groups"], kw["dtype"]) == ("none", 32,
                                                         "float32")
  assert "dtype" not in blae_lib.ARCHITECTURE_FIELDS
  assert {"norm", "num_groups"} <= set(blae_lib.ARCHITECTURE_FIELDS)


@pytest.mark.parametrize("norm", ["none", "group"])
def test_bfloat16_compute_with_float32_params_and_outputs(norm):
  kw = dict(family="downsample", width=8, bits=4, num_res_blocks=1,
            downsample_factor=4, channel_mult=(1, 2), image_channels=3,
            norm=norm, num_groups=4)
  f32, bf16 = BLAE(**kw), BLAE(**kw, dtype="bfloat16")
  x, code = _inputs(f32)
  params = _random_params(f32, x, code)
  params_bf16 = jax.eval_shape(bf16.init, jax.random.key(0), x, code)
  assert jax.tree.structure(params) == jax.tree.structure(params_bf16)
  assert {v.dtype for v in jax.tree.leaves(params_bf16)} == {
      np.dtype(np.float32)}
  rec32, z32 = f32.apply(params, x, code)
  rec16, z16 = bf16.apply(params, x, code)
  assert z16.dtype == rec16.dtype == jnp.float32
  z_diff = float(jnp.max(jnp.abs(z16 - z32)))
  # Measured about 1e-3 (z) and 1e-2 (recon, relative to its max): bf16 is
  # really used (not bit-identical) and close.
  assert 0 < z_diff < 0.01
  rel = float(jnp.max(jnp.abs(rec16 - rec32)) / jnp.max(jnp.abs(rec32)))
  assert 0 < rel < 0.05


def _old_blae_meta() -> dict:
  """A blae checkpoint's meta as written before norm / num_groups."""
  return {"stage": "blae", "data": "fashion_mnist", "image_shape": [32, 32, 1],
          "model": {"family": "downsample", "width": 64, "bits": 16,
                    "num_res_blocks": 2, "stem_kernel": 7,
                    "downsample_factor": 4, "channel_mult": [1]}}


def test_old_checkpoint_meta_matches_todays_default_config():
  config = ml_collections.ConfigDict(dict(
      blae=cu.section("blae"), data=cu.section("data")))
  current = json.loads(json.dumps(blae_train.model_meta(config, (32, 32, 1))))
  old = _old_blae_meta()
  upgraded = checkpoint.upgrade_meta(old)
  assert upgraded == current
  assert checkpoint.upgrade_meta(upgraded) == upgraded
  assert "norm" not in old["model"]  # not changed in place
  checkpoint._compare_meta(old, current, "/ckpt")  # no mismatch
  # A config saved before the fields gives the same meta.
  saved = ml_collections.ConfigDict(dict(
      blae={k: v for k, v in cu.section("blae").items()
            if k not in ("norm", "num_groups", "dtype")},
      data=cu.section("data")))
  assert json.loads(json.dumps(blae_train.model_meta(saved, (32, 32, 1)))) \
      == current
  # A group-norm config does not match an old checkpoint.
  config.blae.norm = "group"
  with pytest.raises(checkpoint.CheckpointMismatchError, match="norm"):
    checkpoint._compare_meta(old, blae_train.model_meta(config, (32, 32, 1)),
                             "/ckpt")
