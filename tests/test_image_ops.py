"""image_ops: crops against PIL references, the JPEG draft path, errors."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, JpegImagePlugin

from mesp_jax.data import image_ops


def encode(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None,
           **kw) -> bytes:
  image = Image.fromarray(array)
  if mode is not None:
    image = image.convert(mode)
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kw)
  return buf.getvalue()


def noise(h: int, w: int, c: int | None = 3, seed: int = 0) -> np.ndarray:
  shape = (h, w) if c is None else (h, w, c)
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def gradient(h: int, w: int) -> np.ndarray:
  """A smooth RGB image that is asymmetric in both axes."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  r, g = 255 * x / (w - 1), 255 * y / (h - 1)
  b = 127.5 + 100 * np.sin(2 * np.pi * (x / w + 0.5 * y / h))
  return np.stack([r, g, b], -1).round().astype(np.uint8)


def reference_eval(array: np.ndarray, size: int, mode: str) -> np.ndarray:
  """Resize the shorter side to `size` with PIL, then slice the centre."""
  image = Image.fromarray(array).convert(mode)
  w, h = image.size
  if h <= w:
    nh, nw = size, round(w * size / h)
  else:
    nh, nw = round(h * size / w), size
  out = np.asarray(image.resize((nw, nh), Image.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  out = out[top:top + size, left:left + size]
  return out[..., None] if out.ndim == 2 else out


@pytest.mark.parametrize("h,w,size", [(37, 50, 16), (50, 37, 16), (64, 64, 32),
                                      (20, 9, 12), (5, 7, 16), (300, 101, 33)])
def test_eval_crop_equals_pil_reference(h, w, size):
  rgb = noise(h, w)
  np.testing.assert_array_equal(image_ops.eval_crop(rgb, size),
                                reference_eval(rgb, size, "RGB"))
  grey = noise(h, w, None)
  np.testing.assert_array_equal(image_ops.eval_crop(grey, size, channels=1),
                                reference_eval(grey, size, "L"))


def inputs() -> dict[str, object]:
  rgb = noise(30, 45)
  return {
      "grey array": noise(30, 45, None),
      "grey array [H, W, 1]": noise(30, 45, 1),
      "rgb array": rgb,
      "rgba array": noise(30, 45, 4),
      "png rgb": encode(rgb, "PNG"),
      "png rgba": encode(noise(30, 45, 4), "PNG"),
      "png grey": encode(rgb, "PNG", "L"),
      "png palette": encode(rgb, "PNG", "P"),
      "jpeg rgb": encode(rgb),
      "jpeg grey": encode(rgb, mode="L"),
      "jpeg cmyk": encode(rgb, mode="CMYK"),
      "gif": encode(rgb, "GIF"),
  }


@pytest.mark.parametrize("name", list(inputs()))
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_dtypes(name, channels):
  data = inputs()[name]
  assert image_ops.image_size(data) == (30, 45)
  for out in (image_ops.eval_crop(data, 24, channels=channels),
              image_ops.train_crop(data, 24, np.random.default_rng(0),
                                   channels=channels)):
    assert out.shape == (24, 24, channels) and out.dtype == np.uint8
    assert out.flags.c_contiguous
  if "grey" in name and channels == 3:  # grey becomes RGB: equal channels
    out = image_ops.eval_crop(data, 24)
    assert (out == out[..., :1]).all()


def test_channels_1_of_colour_is_luma():
  rgb = gradient(40, 40)
  want = np.asarray(Image.fromarray(rgb).convert("L"))[..., None]
  np.testing.assert_array_equal(image_ops.eval_crop(rgb, 40, channels=1), want)


class DraftSpy:
  """Records the size of each JPEG right after ``draft``."""

  def __init__(self, monkeypatch):
    self.sizes: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def draft(image, mode, size):
      result = original(image, mode, size)
      self.sizes.append(image.size)
      return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)


def test_eval_crop_decodes_large_jpegs_at_reduced_scale(monkeypatch):
  array = gradient(768, 1024)
  jpeg = encode(array, quality=95)
  full = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
  spy = DraftSpy(monkeypatch)
  # 768 / 64 = 12: decoded at 1/8 (96 px >= 64 a side); 768 / 300: at 1/2;
  # 768 / 400 < 2: in full.
  for size, decoded in [(64, (128, 96)), (300, (512, 384)),
                        (400, (1024, 768))]:
    spy.sizes.clear()
    out = image_ops.eval_crop(jpeg, size)
    assert spy.sizes == [decoded]
    want = image_ops.eval_crop(full, size)  # an array: no draft
    assert len(spy.sizes) == 1
    assert out.shape == want.shape == (size, size, 3)
    assert np.abs(out.astype(int) - want).mean() < 1.5, size


def test_train_crop_draft_matches_full_decode(monkeypatch):
  array = gradient(768, 1024)
  jpeg = encode(array, quality=95)
  full = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
  spy = DraftSpy(monkeypatch)
  for seed in range(6):
    # The same seed draws the same box: it depends on (h, w) and rng only.
    out = image_ops.train_crop(jpeg, 48, np.random.default_rng(seed))
    want = image_ops.train_crop(full, 48, np.random.default_rng(seed))
    assert np.abs(out.astype(int) - want).mean() < 1.5, seed
  assert any(w < 1024 for w, _ in spy.sizes), spy.sizes  # some reduced


def test_train_crop_is_deterministic_per_seed():
  data = encode(gradient(120, 160))
  crops = [image_ops.train_crop(data, 32, np.random.default_rng(s))
           for s in range(8)]
  again = image_ops.train_crop(data, 32, np.random.default_rng(3))
  np.testing.assert_array_equal(crops[3], again)
  assert len({c.tobytes() for c in crops}) == 8


def test_flip():
  """Red grows to the right in the image: a crop is flipped iff it grows to
  the left."""
  array = gradient(60, 80)

  def flipped(crop):
    red = crop[..., 0].astype(int).mean(0)
    return red[0] > red[-1]

  no_flip = [flipped(image_ops.train_crop(array, 16, np.random.default_rng(s),
                                          flip=False)) for s in range(40)]
  assert not any(no_flip)
  with_flip = [flipped(image_ops.train_crop(array, 16, np.random.default_rng(s)))
               for s in range(40)]
  assert 8 <= sum(with_flip) <= 32


@pytest.mark.parametrize("h,w", [(60, 80), (80, 60), (33, 33), (7, 200)])
def test_full_image_crop_is_a_plain_resize(h, w):
  array = noise(h, w)
  want = np.asarray(Image.fromarray(array).resize((24, 24), Image.BICUBIC))
  out = image_ops.train_crop(array, 24, np.random.default_rng(0), min_scale=1.0,
                             ratio=(w / h, w / h), flip=False)
  np.testing.assert_array_equal(out, want)


@settings(max_examples=60, deadline=None, database=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), size=st.integers(1, 64),
       channels=st.sampled_from([1, 3]), seed=st.integers(0, 2**32 - 1),
       jpeg=st.booleans())
def test_output_shape_property(h, w, size, channels, seed, jpeg):
  array = noise(h, w, seed=seed % 1000)
  data = encode(array) if jpeg else array
  rng = np.random.default_rng(seed)
  left, top, right, bottom = image_ops.crop_box(h, w, rng)
  assert 0 <= left < right <= w and 0 <= top < bottom <= h
  for out in (image_ops.train_crop(data, size, rng, channels=channels),
              image_ops.eval_crop(data, size, channels=channels)):
    assert out.shape == (size, size, channels) and out.dtype == np.uint8


@pytest.mark.parametrize("data,match", [
    (b"", "unknown format"),
    (b"definitely not an image", "unknown format"),
    (encode(noise(64, 64))[:300], "not a readable image"),  # in the header
    (encode(noise(64, 64))[:2000], "cannot decode"),
    (encode(noise(64, 64), "PNG")[:100], "cannot decode"),
])
def test_corrupt_bytes_raise_value_error(data, match):
  with pytest.raises(ValueError, match=match):
    image_ops.eval_crop(data, 16)
  with pytest.raises(ValueError, match=match):
    image_ops.train_crop(data, 16, np.random.default_rng(0))


def test_bad_arguments_raise_value_error():
  with pytest.raises(ValueError, match="uint8"):
    image_ops.eval_crop(np.zeros((8, 8, 3), np.float32), 4)
  with pytest.raises(ValueError, match="channels"):
    image_ops.eval_crop(noise(8, 8), 4, channels=2)


def test_functions_pickle_for_worker_processes():
  for fn in (image_ops.train_crop, image_ops.eval_crop, image_ops.image_size):
    assert pickle.loads(pickle.dumps(fn)) is fn
