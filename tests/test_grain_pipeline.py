"""The grain pipeline: determinism, process sharding, workers, resume, folders."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from mesp_jax.data import records as records_lib
from mesp_jax.data.pipeline import GrainLoader
from mesp_jax.data.sources import ArraySource, get_source
from mesp_jax.train import checkpoint as ckpt


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


class BytesRecords:
  """PNG-encoded random images of random sizes, labels = index % 7."""

  def __init__(self, n=40, seed=0):
    rng = np.random.default_rng(seed)
    self.items = []
    for _ in range(n):
      h, w = rng.integers(20, 60, 2)
      self.items.append(_png(rng.integers(0, 256, (h, w, 3), np.uint8)))
    self.name = "bytes"

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return {"image": self.items[i], "label": i % 7}


def make_loader(records, batch=8, seed=3, **kw):
  kw.setdefault("augment", "inception")
  return GrainLoader(records, image_size=16, channels=3,
                     global_batch_size=batch, seed=seed, **kw)


def take(loader, n):
  return [next(loader) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_batches_are_a_seeded_permutation_per_epoch():
  records = BytesRecords(n=24)
  batches = take(make_loader(records), 6)  # two epochs of 3 batches
  assert batches[0]["image"].shape == (8, 16, 16, 3)
  assert batches[0]["image"].dtype == np.float32
  assert -1.0 <= batches[0]["image"].min() and batches[0]["image"].max() <= 1
  labels = [np.concatenate([b["label"] for b in batches[e * 3:e * 3 + 3]])
            for e in range(2)]
  expected = np.sort(np.arange(24) % 7)
  for epoch in labels:  # every example once per epoch
    np.testing.assert_array_equal(np.sort(epoch), expected)
  assert not np.array_equal(labels[0], labels[1])  # reshuffled
  assert_same(batches, take(make_loader(records), 6))  # same seed
  other = take(make_loader(records, seed=4), 1)
  assert not np.array_equal(other[0]["image"], batches[0]["image"])


def test_processes_split_the_same_global_batches():
  """Process p's rows are rows [pL, (p+1)L) of the 1-process batch, crops
  included."""
  records = BytesRecords(n=30)
  whole = take(make_loader(records, batch=12), 5)
  parts = [take(make_loader(records, batch=12, process_index=p,
                            process_count=3), 5) for p in range(3)]
  for s in range(5):
    joined = np.concatenate([parts[p][s]["image"] for p in range(3)])
    np.testing.assert_array_equal(joined, whole[s]["image"])


def test_workers_give_the_same_batches():
  records = BytesRecords(n=24)
  loader = make_loader(records, workers=2)
  try:
    assert_same(take(loader, 4), take(make_loader(records), 4))
  finally:
    loader.close()


def test_resume_through_an_orbax_checkpoint_gives_identical_batches(tmp_path):
  """Kill after a checkpoint, resume: the batches continue exactly."""
  records = BytesRecords(n=24)
  uninterrupted = take(make_loader(records), 7)

  first = make_loader(records, workers=1)
  take(first, 3)
  manager = ckpt.make_manager(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(manager, 3, {"w": np.zeros(2, np.float32)}, first.get_state(),
            {"stage": "test"})
  manager.wait_until_finished()
  first.close()
  del first  # the "killed" run
  files = os.listdir(tmp_path / "ckpt" / "3" / "loader")
  assert "process_0-of-1.json" in files

  manager = ckpt.make_manager(str(tmp_path / "ckpt"), async_save=False)
  abstract = {"w": np.zeros(2, np.float32)}
  import jax
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(
                                         jax.devices()[0])), abstract)
  step, _, position = ckpt.restore_latest(manager, abstract, {"stage": "test"})
  assert step == 3 and position["step"] == 3
  resumed = make_loader(records, workers=1)
  try:
    resumed.set_state(position)
    assert_same(take(resumed, 4), uninterrupted[3:])
  finally:
    resumed.close()


def test_resume_refuses_another_data_set():
  loader = make_loader(BytesRecords(n=24))
  state = make_loader(BytesRecords(n=32)).get_state()
  with pytest.raises(ValueError, match="num_examples=32"):
    loader.set_state(state)


def test_small_sets_pass_through_unchanged():
  """The in-memory sets through grain: images at size are not resampled."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (20, 16, 16, 3), np.uint8)
  source = ArraySource(images, np.arange(20))
  loader = make_loader(records_lib.ArrayRecords(source), batch=5,
                       augment="none")
  batch = next(loader)
  rows = images[batch["label"]].astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(batch["image"], rows, atol=1e-6)


def write_folder(root, n_per_class=3, classes=("cat", "dog"), size=(24, 30)):
  rng = np.random.default_rng(0)
  for c in classes:
    os.makedirs(root / c, exist_ok=True)
    for i in range(n_per_class):
      img = rng.integers(0, 256, size + (3,), np.uint8)
      Image.fromarray(img).save(root / c / f"{i}.png")
  (root / classes[0] / "notes.txt").write_text("not an image")


def test_folder_source(tmp_path):
  write_folder(tmp_path / "data")
  source = get_source("folder", "train", image_size=16,
                      data_dir=str(tmp_path / "data"))
  assert len(source) == 6 and source.records.classes == ["cat", "dog"]
  batch = source.read(np.arange(6))
  assert batch["image"].shape == (6, 16, 16, 3)
  np.testing.assert_array_equal(batch["label"], [0, 0, 0, 1, 1, 1])
  grey = get_source("folder", "train", image_size=16, channels=1,
                    data_dir=str(tmp_path / "data"))
  assert grey.read(np.arange(2))["image"].shape == (2, 16, 16, 1)


def test_folder_errors(tmp_path):
  from mesp_jax.data import DataNotFoundError
  with pytest.raises(DataNotFoundError, match="not a folder"):
    get_source("folder", "train", data_dir=str(tmp_path / "missing"))
  (tmp_path / "empty" / "a").mkdir(parents=True)
  with pytest.raises(DataNotFoundError, match="no images"):
    get_source("folder", "train", data_dir=str(tmp_path / "empty"))
  write_folder(tmp_path / "bad", n_per_class=1)
  (tmp_path / "bad" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
  source = get_source("folder", "train", image_size=16,
                      data_dir=str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="broken.jpg"):
    source.read(np.arange(len(source)))
