"""Sampling at scale: wavefront decoding of the neural ARVM against raster
decoding and the full forward pass, the front schedule against a brute-force
window check, bf16 sampling, and per-process sample shards."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arvm_testing import random_setup, tiny_arvm

from mesp_jax.base import sharding
from mesp_jax.models import arvm, arvm_geometry
from mesp_jax.sample import decode, samplers, wavefront

# Wavefront and full-forward logits differ only by float32 summation order
# (the cache is longer and laid out differently); measured <= 2e-6.
ATOL = RTOL = 1e-4


_model = tiny_arvm
_params = random_setup


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(h=st.integers(1, 6), w=st.integers(1, 7),
                  tp=st.integers(1, 3),
                  gamma=st.one_of(st.none(), st.integers(0, 8)))
def test_schedule_covers_every_token_after_its_window(h, w, tp, gamma):
  sched = arvm_geometry.wavefront_schedule(h, w, tp, gamma)
  g = arvm_geometry.front_gamma(w, gamma)
  assert sched.shape[0] == tp * (w + (h - 1) * (g + 1))
  step_of = np.full(h * w * tp, -1)
  for s, row in enumerate(sched):
    for i in row[row >= 0]:
      assert step_of[i] == -1, "a token is drawn twice"
      step_of[i] = s
  assert (step_of >= 0).all(), "a token is never drawn"
  # Query slot i sees token j = slot - 1 under the gamma mask: j must be drawn
  # at an earlier step (brute force over the dense mask).
  mask = arvm.gamma_mask(h, w, tp, gamma)  # [T, T] over input slots
  q, s = np.nonzero(mask[:, 1:])
  assert (step_of[s] < step_of[q]).all()


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(h=st.integers(1, 9), w=st.integers(1, 9),
                  tp=st.integers(1, 3),
                  gamma=st.one_of(st.none(), st.integers(0, 9)))
def test_ring_holds_every_window_when_it_is_read(h, w, tp, gamma):
  """Replays the plan's cache writes (numpy): at every step, each query's
  window (and the start slot) sits in the ring, so the mask rebuilt from the
  stored slots is the dense gamma mask's row."""
  model = _model((h, w), tp, group=1, gamma="global" if gamma is None
                 else gamma)
  steps = wavefront.plan(model)
  stored = np.full(wavefront.cache_entries(model) + 1, -1)
  mask = arvm.gamma_mask(h, w, tp, gamma)  # [T, T] over input slots
  for query, slot, entry in zip(steps["query"], steps["slot"],
                                steps["entry"], strict=True):
    stored[entry] = slot  # the plan writes before the step's queries
    for q in query[query >= 0]:
      assert set(np.flatnonzero(mask[q])) <= set(stored[stored >= 0])


@pytest.mark.parametrize("grid,bits,overrides", [
    ((5, 4), 4, dict(group=2, gamma=1, num_classes=3)),      # Tp 2, labels
    ((6, 3), 2, dict(group=2, gamma=0)),                     # Tp 1
    ((4, 6), 6, dict(group=3, gamma=2, embed="linear")),     # Tp 2, W > H
    ((3, 5), 4, dict(group=4, gamma=7)),                     # gamma >= W
    ((4, 4), 4, dict(group=2, gamma="global", num_classes=2)),
    # Taller than a front's rows + gamma' (front_gamma < gamma): the ring
    # must reach gamma rows up, and every row for global gamma.
    ((7, 3), 2, dict(group=1, gamma=4)),
    ((6, 2), 2, dict(group=2, gamma="global")),
])
def test_wavefront_logits_equal_full_forward(grid, bits, overrides):
  model = _model(grid, bits, **overrides)
  params, tokens, labels = _params(model)
  full = jax.jit(model.apply)(params, tokens, labels)  # [B, T, V]
  front = wavefront.wavefront_logits(model, params, tokens, labels)
  np.testing.assert_allclose(front, full, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("overrides,settings", [
    (dict(gamma=1, num_classes=3), dict(cfg_scale=2.0)),
    (dict(gamma=2), dict(temperature=0.7, top_k=3)),
    (dict(gamma=0), dict(top_p=0.8)),
    (dict(gamma=1), dict(temperature=0.0)),
])
def test_wavefront_tokens_equal_raster_tokens(overrides, settings):
  model = _model((6, 5), 4, **overrides)
  params, _, _ = _params(model)
  num = 16
  labels = (np.arange(num) % model.num_classes if model.num_classes
            else None)
  rng = jax.random.key(3)
  raster = decode.sample_tokens(model, params, rng, num, labels, **settings)
  front = decode.sample_tokens(model, params, rng, num, labels,
                               order="wavefront", **settings)
  # Same key per token and logits equal up to round-off: a flipped draw would
  # need a near tie at a categorical threshold; none happened in these runs.
  np.testing.assert_array_equal(np.asarray(front), np.asarray(raster))


def test_wavefront_on_a_mesh_equals_one_device():
  model = _model((5, 4), 4, gamma=1, num_classes=2)
  params, _, _ = _params(model)
  labels = np.arange(8) % 2
  rng = jax.random.key(0)
  mesh = sharding.make_mesh(data=4, fsdp=2)
  one = decode.sample_tokens(model, params, rng, 8, labels, order="wavefront")
  many = decode.sample_tokens(model, params, rng, 8, labels,
                              order="wavefront", mesh=mesh)
  np.testing.assert_array_equal(np.asarray(many), np.asarray(one))


def test_cache_and_steps_do_not_grow_like_the_grid():
  sizes = {h: _model((h, 8), 4, gamma=2) for h in (8, 32, 128)}
  entries = {h: wavefront.cache_entries(m) for h, m in sizes.items()}
  assert len(set(entries.values())) == 1, entries
  # 3 rows of a front + gamma rows of 8 positions x 2 tokens, + spare.
  assert entries[8] == (3 + 2) * 8 * 2 + 1
  for h, m in sizes.items():
    assert wavefront.num_steps(m) == 2 * (8 + (h - 1) * 3)
  big = _model((32, 32), 5, group=5, gamma=5)  # the example
  assert wavefront.num_steps(big) == 218 and big.seq_len == 1024


def test_wavefront_rejects_recomputation():
  model = _model((3, 3), 2, gamma=1)
  params, _, _ = _params(model)
  with pytest.raises(ValueError, match="wavefront"):
    decode.sample_tokens(model, params, jax.random.key(0), 2,
                         order="wavefront", cache="none")
  with pytest.raises(ValueError, match="order"):
    decode.sample_tokens(model, params, jax.random.key(0), 2, order="zigzag")


def test_bfloat16_sampling_halves_the_cache_and_stays_close():
  model = _model((4, 4), 4, gamma=1, num_classes=2)
  params, tokens, labels = _params(model)
  half = model.clone(dtype=jnp.bfloat16)
  for cache_bytes, entries in (
      (decode.cache_bytes, decode.cache_entries(model, "ring") + 1),
      (wavefront.cache_bytes, wavefront.cache_entries(model) + 1)):
    tags = 4 * entries  # the int32 slot tags do not shrink
    keys_values = cache_bytes(model, 8) - tags
    assert cache_bytes(half, 8) == tags + keys_values // 2
  full = np.asarray(jax.jit(model.apply)(params, tokens, labels))
  low = np.asarray(wavefront.wavefront_logits(half, params, tokens, labels))
  # bf16 keeps 8 mantissa bits: logits of this size agree to a few 1e-2.
  np.testing.assert_allclose(low, full, atol=0.1, rtol=0.05)
  sampler = samplers.NeuralSampler(model, params, order="wavefront",
                                   dtype="bfloat16")
  out = sampler.sample(jax.random.key(0), 4, np.array([0, 1, 0, 1]))
  assert out.shape == (4, 4, 4, 2) and out.dtype == np.int32
  assert samplers.describe(sampler)["dtype"] == "bfloat16"


def test_manifest_joins_shards_in_sample_order(tmp_path):
  from mesp_jax.data import sample_set as ss
  from mesp_jax.eval.evaluate import load_samples
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 4, (10, 2, 2, 1)).astype(np.int32)
  images = rng.uniform(-1, 1, (10, 4, 4, 1)).astype(np.float32)
  shards = []
  for p, idx in enumerate((np.r_[0:4, 8:10], np.r_[4:8])):  # batches of 4
    part = ss.SampleSet(tokens=tokens[idx], images=images[idx],
                        labels=np.full(len(idx), -1), kind="neural",
                        gamma="1", group=2, extra={"index": idx})
    shards.append(ss.shard_name(p, 2))
    part.save(str(tmp_path / shards[-1]), shard=True)
  manifest = str(tmp_path / ss.MANIFEST)
  ss.write_manifest(manifest, shards, 10, {"kind": "neural"})
  joined = ss.SampleSet.load(manifest)
  np.testing.assert_array_equal(joined.tokens, tokens)
  np.testing.assert_array_equal(load_samples(manifest), images)
  ss.write_manifest(manifest, shards[:1], 10, {})
  with pytest.raises(ValueError, match="missing or stale"):
    ss.SampleSet.load(manifest)
