"""models.conv: 'xla' is nn.Conv; 'im2col' is the same convolution.

Tolerance for im2col against xla (float32): ``|a - b| <= 1e-5 * max|b|`` for
every entry of outputs and gradients (a relative error of 1e-5 against the
tensor's scale; entries near zero make a per-entry relative test
meaningless).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesp_jax.models import blae as blae_lib
from mesp_jax.models import conv as conv_lib
from mesp_jax.models.blae import BLAE, architecture_kwargs, build_blae
from mesp_jax.models.conv import Conv, resolve_conv
from mesp_jax.models.vae import GaussianVAE, build_vae

RTOL = 1e-5


def assert_close(a, b, rtol=RTOL):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  scale = max(float(np.max(np.abs(b))), 1e-30)
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


def same_tree(a, b) -> bool:
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(x.shape == y.shape and x.dtype == y.dtype and
             bool(jnp.array_equal(x, y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                             strict=True))


def random_params(module, *args, seed=0, scale=0.3):
  """``module.init``'s tree (shapes from eval_shape) with random values.

  Cheaper than ``init`` (no per-shape initializer compiles); the tests of
  ``init`` itself are ``test_xla_impl_is_nn_conv`` and
  ``test_blae_init_is_nn_conv_init``.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype),
      shapes)


def both_impls(x, kernel_size, strides, features, padding):
  """{impl: (y, d params, d x)} of one random cotangent, in one jit."""
  mods = {impl: Conv(features, kernel_size, strides=strides, padding=padding,
                     impl=impl) for impl in ("xla", "im2col")}
  params = random_params(mods["xla"], x)

  @jax.jit
  def run(params, x):
    out = {}
    for impl, mod in mods.items():
      y, vjp = jax.vjp(mod.apply, params, x)
      dp, dx = vjp(jax.random.normal(jax.random.key(1), y.shape, y.dtype))
      out[impl] = (y, dp["params"], dx)
    return out

  return run(params, x)


def assert_impls_agree(out):
  (y, dp, dx), (y2, dp2, dx2) = out["xla"], out["im2col"]
  assert_close(y2, y)
  assert_close(dx2, dx)
  assert_close(dp2["kernel"], dp["kernel"])
  assert_close(dp2["bias"], dp["bias"])


# The BL-AE's convolutions: 1x1, 3x3, 4x4 stride 2, the 7x7 stem; odd and
# even spatial sizes.
CASES = [(k, s, h, w) for k, s in ((1, 1), (3, 1), (4, 2), (7, 1))
         for h, w in ((8, 8), (7, 9))]


@pytest.mark.parametrize("k,s,h,w", CASES)
def test_xla_impl_is_nn_conv(k, s, h, w):
  x = jax.random.normal(jax.random.key(2), (2, h, w, 3))
  ref = nn.Conv(5, (k, k), strides=(s, s))
  mod = Conv(5, (k, k), strides=(s, s), impl="xla")
  p_ref = ref.init(jax.random.key(0), x)  # the same names, shapes, values
  assert same_tree(mod.init(jax.random.key(0), x), p_ref)
  assert same_tree(Conv(5, (k, k), strides=(s, s), impl="im2col").init(
      jax.random.key(0), x), p_ref)
  params = random_params(ref, x)
  assert jnp.array_equal(jax.jit(mod.apply)(params, x),
                         jax.jit(ref.apply)(params, x))


@pytest.mark.parametrize("k,s,h,w", CASES)
def test_im2col_matches_xla_values_and_grads(k, s, h, w):
  x = jax.random.normal(jax.random.key(3), (2, h, w, 3))
  out = both_impls(x, (k, k), (s, s), 4, "SAME")
  assert out["xla"][0].shape == (2, -(-h // s), -(-w // s), 4)
  assert_impls_agree(out)


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9),
       cin=st.integers(1, 4), cout=st.integers(1, 4), kh=st.integers(1, 5),
       kw=st.integers(1, 5), sh=st.integers(1, 3), sw=st.integers(1, 3),
       padding=st.sampled_from(["SAME", "VALID"]), seed=st.integers(0, 99))
def test_im2col_matches_xla_property(batch, h, w, cin, cout, kh, kw, sh, sw,
                                     padding, seed):
  if padding == "VALID" and (kh > h or kw > w):
    kh, kw = min(kh, h), min(kw, w)
  x = jax.random.normal(jax.random.key(seed), (batch, h, w, cin))
  assert_impls_agree(both_impls(x, (kh, kw), (sh, sw), cout, padding))


def test_explicit_padding_and_bad_arguments():
  x = jax.random.normal(jax.random.key(4), (1, 6, 5, 2))
  assert_impls_agree(both_impls(x, (3, 2), (2, 1), 3, [(2, 0), (1, 1)]))
  with pytest.raises(ValueError, match="must be one of"):
    jax.eval_shape(Conv(3, (3, 3), impl="fft").init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="padding"):
    jax.eval_shape(Conv(3, (3, 3), padding="CIRCULAR", impl="im2col").init,
                   jax.random.key(0), x)


def test_auto_rule():
  assert resolve_conv("auto", (3, 3), backend="cpu",
                      measured="im2col") == "im2col"
  assert resolve_conv("auto", (3, 3), backend="cpu", measured="xla") == "xla"
  assert resolve_conv("auto", (4, 4), backend="gpu",
                      measured="im2col") == "xla"
  assert resolve_conv("auto", (1, 1), backend="cpu",
                      measured="im2col") == "xla"
  assert resolve_conv("im2col", (1, 1)) == "im2col"
  assert resolve_conv("xla", (3, 3), backend="cpu",
                      measured="im2col") == "xla"
  # The probe runs (once per process) even when first asked inside a trace.
  conv_lib.measured_cpu_choice.cache_clear()
  seen = []
  jax.jit(lambda x: seen.append(resolve_conv("auto", backend="cpu")) or x)(1.)
  assert seen[0] in ("xla", "im2col")
  assert conv_lib.measured_cpu_choice() == seen[0]


# --------------------------------------------------------------------------
# The BL-AE (and the VAE) with each implementation.
# --------------------------------------------------------------------------
TINY = [dict(family="downsample", width=8, bits=4, num_res_blocks=1,
             downsample_factor=4, channel_mult=(1, 2)),
        dict(family="full_res", width=8, bits=4, num_res_blocks=1,
             stem_kernel=7)]


def nn_conv_adapter(*args, impl, **kwargs):
  """Today's model: flax's nn.Conv wherever blae.py builds a Conv."""
  del impl
  return nn.Conv(*args, **kwargs)


def image_and_code(model, seed):
  x = jax.random.uniform(jax.random.key(seed), (2, 16, 16, 1), minval=-1,
                         maxval=1)
  code = 0.5 * jax.random.normal(
      jax.random.key(seed + 1), (2,) + model.latent_shape(x.shape[1:]))
  return x, code


def test_blae_init_is_nn_conv_init(monkeypatch):
  """Every impl's init is the nn.Conv model's init (checkpoints interchange).
  """
  kw = dict(family="downsample", width=4, bits=4, num_res_blocks=0,
            downsample_factor=2)
  x, code = image_and_code(BLAE(**kw), 10)
  inits = {impl: BLAE(**kw, conv=impl).init(jax.random.key(0), x, code)
           for impl in ("xla", "im2col", "auto")}
  monkeypatch.setattr(blae_lib, "Conv", nn_conv_adapter)
  reference = BLAE(**kw).init(jax.random.key(0), x, code)
  for params in inits.values():
    assert same_tree(params, reference)


@pytest.mark.parametrize("kw", TINY, ids=lambda kw: kw["family"])
def test_blae_impls_share_params_and_outputs(kw, monkeypatch):
  models = {impl: BLAE(**kw, conv=impl) for impl in ("xla", "im2col")}
  x, noise = image_and_code(models["xla"], 5)
  params = random_params(models["xla"], x, noise, scale=0.2)
  assert jax.tree.structure(jax.eval_shape(
      models["im2col"].init, jax.random.key(0), x, noise)) == \
      jax.tree.structure(params)

  @jax.jit
  def forward(params, x, noise):
    return {impl: m.apply(params, x, noise) for impl, m in models.items()}

  outs = forward(params, x, noise)
  for a, b in zip(outs["im2col"], outs["xla"], strict=True):
    assert_close(a, b)
  # conv='xla' is bit for bit the model built from nn.Conv.
  monkeypatch.setattr(blae_lib, "Conv", nn_conv_adapter)
  reference = BLAE(**kw)
  assert jax.tree.structure(jax.eval_shape(
      reference.init, jax.random.key(0), x, noise)) == \
      jax.tree.structure(params)
  for a, b in zip(jax.jit(reference.apply)(params, x, noise), outs["xla"],
                  strict=True):
    assert jnp.array_equal(a, b)


def test_blae_gradients_agree():
  kw = TINY[0]
  model = BLAE(**kw)
  x, code = image_and_code(model, 7)
  params = random_params(model, x, code, scale=0.2)

  @jax.jit
  def grads(params):
    def loss(p, impl):
      return jnp.mean(jnp.square(
          BLAE(**kw, conv=impl).apply(p, x, code)[0] - x))
    return {impl: jax.grad(loss)(params, impl) for impl in ("xla", "im2col")}

  g = grads(params)
  for a, b in zip(jax.tree.leaves(g["im2col"]), jax.tree.leaves(g["xla"]),
                  strict=True):
    assert_close(a, b, rtol=1e-4)  # through ~10 convs


def test_conv_from_config():
  cfg = ml_collections.ConfigDict(dict(
      family="downsample", width=8, bits=4, num_res_blocks=1, stem_kernel=7,
      downsample_factor=2, channel_mult=(1,)))  # saved before `conv` existed
  assert architecture_kwargs(cfg, "blae")["conv"] == "xla"
  assert build_blae(cfg, 1).conv == "xla"
  cfg.conv = "im2col"
  model = build_blae(cfg, 1)
  assert model.conv == "im2col"
  enc, dec = blae_lib.encoder_decoder(model, 4)
  assert enc.conv == dec.conv == "im2col"
  assert build_vae(cfg, 1).conv == "im2col"
  cfg.conv = "fft"
  with pytest.raises(ValueError, match=r"config\.blae\.conv='fft'"):
    build_blae(cfg, 1)


def test_vae_uses_the_conv_choice():
  kw = TINY[0]
  vae, vae_i2c = GaussianVAE(**kw), GaussianVAE(**kw, conv="im2col")
  x, code = image_and_code(vae, 9)
  params = random_params(vae, x, code, scale=0.2)

  @jax.jit
  def forward(params):
    return vae_i2c.apply(params, x, code), vae.apply(params, x, code)

  for a, b in zip(*forward(params), strict=True):
    assert_close(a, b)
