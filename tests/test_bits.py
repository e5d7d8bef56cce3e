"""Bit packing: property tests against a pure-Python reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesp_jax.base import bits


def reference_pack(signed_bits: np.ndarray, group: int) -> np.ndarray:
  """Per-token loop: first channel of a group is the most significant bit."""
  flat = signed_bits.reshape(-1, signed_bits.shape[-1])
  out = []
  for row in flat:
    toks = []
    for t in range(len(row) // group):
      value = 0
      for b in row[t * group:(t + 1) * group]:
        value = value * 2 + (1 if b > 0 else 0)
      toks.append(value)
    out.append(toks)
  return np.asarray(out).reshape(*signed_bits.shape[:-1], -1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 8), st.integers(1, 3),
       st.integers(0, 2**31 - 1))
def test_pack_matches_reference_and_round_trips(tokens_per_pos, group, batch,
                                                seed):
  rng = np.random.default_rng(seed)
  signed = rng.choice([-1.0, 1.0], size=(batch, 3, tokens_per_pos * group))
  packed = np.asarray(bits.pack(signed, group))
  np.testing.assert_array_equal(packed, reference_pack(signed, group))
  np.testing.assert_array_equal(bits.pack_numpy(signed, group), packed)
  assert packed.min() >= 0 and packed.max() < 2**group
  np.testing.assert_array_equal(np.asarray(bits.unpack(packed, group)), signed)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 3),
       st.integers(-3, 2), st.integers(0, 2**31 - 1))
def test_numpy_and_jax_paths_agree(tokens_per_pos, group, batch, axis, seed):
  rng = np.random.default_rng(seed)
  signed = rng.choice([-1.0, 1.0], size=(batch, 2, tokens_per_pos * group))
  packed_np = bits.pack(signed, group, xp=np)
  packed_jax = bits.pack(signed, group)
  assert isinstance(packed_np, np.ndarray) and packed_np.dtype == np.int32
  assert packed_jax.dtype == np.int32
  np.testing.assert_array_equal(packed_np, np.asarray(packed_jax))
  for dtype in (np.float32, np.int32, np.int8):
    flat_np = bits.unpack(packed_np, group, dtype, xp=np)
    assert isinstance(flat_np, np.ndarray) and flat_np.dtype == dtype
    np.testing.assert_array_equal(flat_np, signed)
    np.testing.assert_array_equal(
        flat_np, np.asarray(bits.unpack(packed_np, group, dtype)))
  # The bit axis placed at ``axis`` (of the result, as expand_dims) holds
  # the same bits as the flattened form, in the same MSB-first order.
  at_np = bits.unpack(packed_np, group, np.int32, axis=axis, xp=np)
  at_jax = np.asarray(bits.unpack(packed_jax, group, np.int32, axis=axis))
  np.testing.assert_array_equal(at_np, at_jax)
  assert at_np.shape[axis] == group and at_np.ndim == packed_np.ndim + 1
  by_token = np.moveaxis(at_np, axis, -1)  # [..., T, g]
  np.testing.assert_array_equal(by_token.reshape(signed.shape), signed)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_hamming_matches_bit_count(group, seed):
  rng = np.random.default_rng(seed)
  a, b = rng.integers(0, 2**group, size=(2, 50))
  expected = [bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b, strict=True)]
  np.testing.assert_array_equal(np.asarray(bits.hamming(a, b)), expected)


def test_first_channel_is_most_significant():
  assert int(bits.pack(np.array([1, -1, -1]), 3)[0]) == 4
  assert int(bits.pack(np.array([-1, -1, 1]), 3)[0]) == 1


def test_bad_group_is_a_clear_error():
  with pytest.raises(ValueError, match="divisible"):
    bits.pack(np.ones((2, 7)), 3)
