"""Tests of the grain input pipelines in bidm_jax.data (digits, mocked TFDS, image folders)."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from bidm_jax import data as D
from bidm_jax.data import preprocess

CIFAR_ARCHIVE = (
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.xz"
)


@contextlib.contextmanager
def closing_iter(it):
  """Closes a grain iterator (threads/processes) when the block ends."""
  try:
    yield it
  finally:
    it.close()


def take(it, n):
  return [next(it) for _ in range(n)]


def train(cfg, batch=16, seed=0, **kw):
  return D.make_train_iterator(
      cfg,
      global_batch_size=batch,
      seed=seed,
      process_index=kw.pop("process_index", 0),
      process_count=kw.pop("process_count", 1),
      **kw,
  )


def evaluate(cfg, batch=32, **kw):
  return D.make_eval_iterator(
      cfg,
      batch_size=batch,
      process_index=kw.pop("process_index", 0),
      process_count=kw.pop("process_count", 1),
      **kw,
  )


def write_image(path: pathlib.Path, value: int, size=(12, 10)):
  """A solid RGB image whose colour encodes `value`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, (value, 255 - value, value // 2)).save(path)


# ---------------------------------------------------------------------------------- digits


def test_digits_train_batches_shape_range_and_seed_determinism():
  cfg = D.default_data_config()
  assert D.dataset_size(cfg) == 1797
  with (
      closing_iter(train(cfg, seed=0)) as a,
      closing_iter(train(cfg, seed=0)) as b,
      closing_iter(train(cfg, seed=1)) as c,
  ):
    ba, bb, bc = take(a, 3), take(b, 3), take(c, 3)
  x = ba[0]["image"]
  assert x.shape == (16, 32, 32, 1) and x.dtype == np.float32
  assert ba[0]["label"].shape == (16,) and ba[0]["label"].dtype == np.int32
  assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() == -1.0 and x.max() > 0.9
  for p, q in zip(ba, bb):
    np.testing.assert_array_equal(p["image"], q["image"])
    np.testing.assert_array_equal(p["label"], q["label"])
  assert not np.array_equal(ba[0]["image"], bc[0]["image"])


def test_digits_rgb_resize_and_flip_deterministic():
  cfg = D.default_data_config()
  cfg.channels, cfg.image_size, cfg.random_flip = 3, 16, True
  with (
      closing_iter(train(cfg, batch=8, seed=5)) as a,
      closing_iter(train(cfg, batch=8, seed=5)) as b,
  ):
    xa, xb = next(a)["image"], next(b)["image"]
  assert xa.shape == (8, 16, 16, 3)
  np.testing.assert_array_equal(xa, xb)
  np.testing.assert_array_equal(xa[..., 0], xa[..., 2])  # gray replicated to RGB


def test_digits_eval_one_pass_uint8_partial_last_batch():
  cfg = D.default_data_config()
  cfg.random_flip = True  # ignored by evaluation
  with closing_iter(evaluate(cfg, batch=32, num_examples=100)) as it:
    batches = list(it)
  assert [b["image"].shape[0] for b in batches] == [32, 32, 32, 4]
  x = np.concatenate([b["image"] for b in batches])
  assert x.dtype == np.uint8 and x.shape == (100, 32, 32, 1) and x.max() == 255
  with closing_iter(evaluate(cfg, batch=32, num_examples=100)) as it:  # same order again
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in it]), x)


def _rows(batches):
  x = np.concatenate([b["image"] for b in batches])
  return sorted(r.tobytes() for r in x.reshape(len(x), -1))


def test_eval_sharding_two_hosts_partition_the_dataset():
  cfg = D.default_data_config()
  cfg.image_size = 8
  with closing_iter(evaluate(cfg, batch=256)) as it:
    everything = _rows(list(it))
  shards = []
  for host in range(2):
    with closing_iter(evaluate(cfg, batch=256, process_index=host, process_count=2)) as it:
      shards.append(_rows(list(it)))
  assert [len(s) for s in shards] == [899, 898]
  assert sorted(shards[0] + shards[1]) == everything  # as multisets: disjoint, union = all


def test_train_sharding_two_hosts_disjoint_first_epoch(tmp_path):
  for k in range(8):
    write_image(tmp_path / f"{k:02d}.png", 30 * k)
  cfg = D.default_data_config("folder")
  cfg.data_dir, cfg.image_size, cfg.random_flip = str(tmp_path), 8, False
  seen = []
  for host in range(2):
    with closing_iter(train(cfg, batch=4, seed=3, process_index=host, process_count=2)) as it:
      batches = take(it, 2)  # one epoch of this host's 4-image shard
    assert batches[0]["image"].shape == (2, 8, 8, 3)
    seen.append({int(round((v[0, 0, 0] + 1) * 127.5)) for b in batches for v in b["image"]})
  assert len(seen[0]) == len(seen[1]) == 4
  assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == {30 * k for k in range(8)}


@pytest.mark.parametrize(
    "field,value",
    [
        ("source", "imagenet"),
        ("image_size", 0),
        ("image_size", -4),
        ("channels", 2),
        ("on_bad_file", "ignore"),
        ("num_workers", -1),
        ("cache_in_memory", "sometimes"),
        ("cache_budget_mb", -1.0),
    ],
)
def test_bad_config_values_raise_value_error_naming_field(field, value):
  cfg = D.default_data_config()
  cfg[field] = value
  with pytest.raises(ValueError, match=f"data.{field}=.*valid values"):
    train(cfg)


def test_global_batch_must_divide_by_process_count():
  with pytest.raises(ValueError, match="global_batch_size=6 .*process_count=4"):
    train(D.default_data_config(), batch=6, process_count=4)
  with pytest.raises(ValueError, match="source.*valid values: digits, tfds, folder"):
    D.default_data_config("lsun")


# -------------------------------------------------------------------------------- tfds


def test_tfds_mock_cifar10_batches():
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = D.default_data_config("tfds")
  cfg.name = "cifar10"
  with tfds.testing.mock_data(num_examples=20):
    assert D.dataset_size(cfg) == 20
    with closing_iter(train(cfg, batch=8, seed=0)) as it:
      batches = take(it, 3)
    cfg.image_size = 16
    with closing_iter(evaluate(cfg, batch=8)) as it:
      ev = list(it)
  x = batches[0]["image"]
  assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32
  assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1
  assert batches[0]["label"].dtype == np.int32 and batches[0]["label"].max() < 10
  assert [b["image"].shape for b in ev] == [(8, 16, 16, 3), (8, 16, 16, 3), (4, 16, 16, 3)]
  assert ev[0]["image"].dtype == np.uint8


def test_tfds_unprepared_dataset_error_names_prepare_command(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  cfg = D.default_data_config("tfds")
  cfg.name, cfg.data_dir = "cifar10", str(tmp_path / "tfds")
  with pytest.raises(D.DatasetNotPreparedError) as e:
    train(cfg)
  msg = str(e.value)
  assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path / 'tfds'}" in msg
  assert "download_and_prepare(file_format='array_record')" in msg
  cfg.name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="data.name='no_such_dataset_xyz'"):
    train(cfg)


# ------------------------------------------------------------------------------ folders


def _class_tree(root: pathlib.Path) -> pathlib.Path:
  """root/train/{cat,dog}/NNNN.jpg (3 + 3 images) and one corrupt file dog/0003.jpg."""
  for cls, base in (("cat", 10), ("dog", 150)):
    for k in range(3):
      write_image(root / "train" / cls / f"{k:04d}.jpg", base + k, size=(40, 20))
  bad = root / "train" / "dog" / "0003.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  write_image(root / "test" / "cat" / "0000.jpg", 0)
  (root / "train" / "notes.txt").write_text("ignored")
  return bad


def test_folder_fail_names_corrupt_file(tmp_path):
  bad = _class_tree(tmp_path)
  cfg = D.default_data_config("folder")
  cfg.data_dir, cfg.image_size = str(tmp_path), 16
  assert D.dataset_size(cfg) == 7  # train/ is read: 6 images + the corrupt one
  with closing_iter(evaluate(cfg, batch=4)) as it:
    with pytest.raises(D.BadImageError, match=str(bad)):
      list(it)
  cfg.cache_in_memory = "never"
  with closing_iter(train(cfg, batch=4)) as it:
    with pytest.raises(D.BadImageError, match=str(bad)):
      take(it, 2)  # 8 examples > one epoch of 7 files
  cfg.cache_in_memory = "auto"  # decoding the whole split up front finds it at once
  with pytest.raises(D.BadImageError, match=str(bad)):
    train(cfg, batch=4)


def test_folder_skip_counts_corrupt_file_and_labels_classes(tmp_path, caplog):
  bad = _class_tree(tmp_path)
  cfg = D.default_data_config("folder")
  cfg.data_dir, cfg.image_size, cfg.channels, cfg.on_bad_file = str(tmp_path), 16, 1, "skip"
  with caplog.at_level(logging.WARNING), closing_iter(evaluate(cfg, batch=4)) as it:
    batches = list(it)
    assert it.skipped == 1
  assert str(bad) in caplog.text
  assert [b["image"].shape for b in batches] == [(4, 16, 16, 1), (2, 16, 16, 1)]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), [0, 0, 0, 1, 1, 1])
  with closing_iter(train(cfg, batch=4, seed=0)) as it:
    assert take(it, 3)[-1]["image"].shape == (4, 16, 16, 1)
    assert it.skipped >= 1


def test_folder_missing_or_empty_raises_naming_path(tmp_path):
  cfg = D.default_data_config("folder")
  cfg.data_dir = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
    train(cfg)
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  cfg.data_dir = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="holds no"):
    D.dataset_size(cfg)


@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason="no shared CIFAR-10 JPEG archive")
def test_folder_reads_cifar10_jpeg_archive_layout(tmp_path):
  with tarfile.open(CIFAR_ARCHIVE, "r:xz") as tar:  # the first few members only
    members = []
    for m in tar:
      if m.isfile():
        members.append(m)
        if len(members) == 10:
          break
    tar.extractall(tmp_path, members=members, filter="data")
  split = members[0].name.split("/")[0]
  cfg = D.default_data_config("folder")
  cfg.data_dir, cfg.split = str(tmp_path), split
  assert D.dataset_size(cfg) == 10
  with closing_iter(evaluate(cfg, batch=4)) as it:
    b = next(it)
  assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
  assert b["image"].std() > 10 and b["label"].tolist() == [0, 0, 0, 0]


def test_resize_center_crop_keeps_the_middle():
  x = np.zeros((20, 60, 3), np.uint8)
  x[:, 20:40] = 255  # white middle third of a wide image
  out = np.asarray(preprocess.resize_center_crop(Image.fromarray(x), 10))
  assert out.shape == (10, 10, 3) and out[:, 2:8].min() > 200


# ------------------------------------------------------------------------- checkpointing


def test_iterator_state_restore_continues_identically():
  cfg = D.default_data_config()
  cfg.random_flip = True
  with closing_iter(train(cfg, batch=8, seed=7)) as it:
    take(it, 5)
    state = D.iterator_state(it)
    expected = take(it, 3)
  with closing_iter(train(cfg, batch=8, seed=7)) as it:
    D.restore_iterator_state(it, state)
    got = take(it, 3)
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e["image"], g["image"])
    np.testing.assert_array_equal(e["label"], g["label"])


def test_orbax_checkpoint_manager_roundtrip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  cfg = D.default_data_config()
  opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
  with closing_iter(train(cfg, batch=8, seed=2)) as it:
    take(it, 5)
    with ocp.CheckpointManager(tmp_path, options=opts, item_names=("state", "data")) as mngr:
      mngr.save(
          5,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave({"w": np.ones(3)}), data=D.orbax_save_args(it)
          ),
      )
      expected = take(it, 3)  # advancing while the save completes must not change it
      mngr.wait_until_finished()
  with closing_iter(train(cfg, batch=8, seed=2)) as it:
    with ocp.CheckpointManager(tmp_path, item_names=("state", "data")) as mngr:
      restored = mngr.restore(5, args=ocp.args.Composite(data=D.orbax_restore_args(it)))
    assert restored["data"] is it
    got = take(it, 3)
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e["image"], g["image"])


def test_worker_processes_same_order_and_restorable():
  cfg = D.default_data_config()
  cfg.random_flip = True
  with closing_iter(train(cfg, batch=8, seed=4)) as it:
    reference = [b["image"] for b in take(it, 8)]
  cfg.num_workers = 2
  with closing_iter(train(cfg, batch=8, seed=4)) as it:
    got = [b["image"] for b in take(it, 5)]
    state = D.iterator_state(it)
  with closing_iter(train(cfg, batch=8, seed=4)) as it:
    D.restore_iterator_state(it, state)
    got += [b["image"] for b in take(it, 3)]
  for r, g in zip(reference, got):
    np.testing.assert_array_equal(r, g)


# -------------------------------------------------------------------------- memory cache


def _values(batches):
  """The colour code of every image of `batches`, in order (see write_image)."""
  return [int(round((v[0, -1, 0] + 1) * 127.5)) for b in batches for v in b["image"]]


def test_memory_cache_gives_the_streamed_batches(tmp_path):
  for k in range(10):
    write_image(tmp_path / f"{k:02d}.png", 20 * k + 3, size=(9, 8))
  cfg = D.default_data_config("folder")
  cfg.data_dir, cfg.image_size, cfg.random_flip = str(tmp_path), 8, True
  for host in range(2):
    got = {}
    for policy in ("never", "always"):
      cfg.cache_in_memory = policy
      with closing_iter(train(cfg, batch=4, seed=3, process_index=host, process_count=2)) as it:
        got[policy] = take(it, 6)  # 12 images per host: more than one epoch of its 5
    for s, c in zip(got["never"], got["always"]):
      np.testing.assert_array_equal(s["image"], c["image"])
      np.testing.assert_array_equal(s["label"], c["label"])
    assert len(set(_values(got["always"]))) == 5


def test_memory_cache_auto_streams_over_budget_and_restores(tmp_path, caplog, monkeypatch):
  for k in range(6):
    write_image(tmp_path / f"{k:02d}.png", 40 * k)
  cfg = D.default_data_config("folder")
  cfg.data_dir, cfg.image_size = str(tmp_path), 8
  with closing_iter(train(cfg, batch=4, seed=1)) as it:  # 6 x 192 bytes: fits, decoded once
    monkeypatch.setattr(preprocess, "load", lambda *a, **k: pytest.fail("decoded again"))
    take(it, 2)
    state = D.iterator_state(it)
    expected = take(it, 3)  # two epochs
  monkeypatch.undo()
  cfg.cache_budget_mb = 1e-4  # 105 bytes < 6 decoded images
  with caplog.at_level(logging.INFO), closing_iter(train(cfg, batch=4, seed=1)) as it:
    D.restore_iterator_state(it, state)
    got = take(it, 3)
  assert "streaming the training data" in caplog.text
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e["image"], g["image"])


def test_epoch_batches_cover_every_example_once_per_epoch():
  batches = preprocess.EpochBatches(n=10, batch_size=4, seed=3)
  stream = np.concatenate([batches[b][1] for b in range(10)])  # 40 positions = 4 epochs
  epochs = stream.reshape(4, 10)
  for e in epochs:
    assert sorted(e) == list(range(10))
  assert len({tuple(e) for e in epochs}) == 4  # a new order every epoch
  np.testing.assert_array_equal(preprocess.EpochBatches(10, 4, 3)[7][1], batches[7][1])


def test_batch_loader_flips_about_half_deterministically():
  images = np.arange(64 * 2 * 3).reshape(64, 1, 2, 3).astype(np.uint8)
  source = preprocess.DecodedArraySource(images, None, np.zeros(64, np.int32))
  item = (5, np.arange(64))
  a, b = preprocess.BatchLoader(source, 9)(item), preprocess.BatchLoader(source, 9)(item)
  np.testing.assert_array_equal(a["image"], b["image"])
  flipped = [not np.array_equal(x, y) for x, y in zip(a["image"], images)]
  assert 16 <= sum(flipped) <= 48
  for x, y, f in zip(a["image"], images, flipped):
    np.testing.assert_array_equal(x, y[:, ::-1] if f else y)
  np.testing.assert_array_equal(preprocess.BatchLoader(source, None)(item)["image"], images)
  np.testing.assert_array_equal(  # the flips went to the batch, not to the decoded source
      images, np.arange(64 * 2 * 3).reshape(64, 1, 2, 3).astype(np.uint8)
  )
