"""Outputs on a URI workdir (bidm_jax/io/files.py and its users), without network.

`gs://` paths go through etils epath's fsspec backend, as on a machine with gcsfs and no
TensorFlow; the `fake_gcs` fixture points that backend at a fresh in-memory fsspec filesystem,
so the code under test runs the same epath calls as with a real bucket. Each test also checks
that nothing landed in a local `gs:` folder (what the local file APIs used to create).
"""

from __future__ import annotations

import io
import json
import struct

import ml_collections
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

import helpers as H
from bidm_jax import main
from bidm_jax.evaluation import ref_stats as ref_stats_lib
from bidm_jax.evaluation.metrics import FeatureStats
from bidm_jax.export import convert_ddpm
from bidm_jax.io import files
from bidm_jax.training import checkpoint as ckpt_lib
from bidm_jax.training import logging as log_lib


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """gs:// served by an empty in-memory fsspec filesystem; the cwd is tmp_path."""

  class _Memory(MemoryFileSystem):
    store = {}  # a fresh store, not MemoryFileSystem's process-wide one
    pseudo_dirs = [""]

  fs = _Memory(skip_instance_cache=True)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath's fsspec backend
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: fs)
  monkeypatch.chdir(tmp_path)
  yield fs
  assert not (tmp_path / "gs:").exists(), "a gs:// output went to the local folder gs:/"


def _records(data: bytes) -> list[bytes]:
  """The records of a TFRecord file, their CRCs checked."""
  out, i = [], 0
  while i < len(data):
    header = data[i : i + 8]
    assert data[i + 8 : i + 12] == log_lib._masked_crc(header)
    n = struct.unpack("<Q", header)[0]
    record = data[i + 12 : i + 12 + n]
    assert data[i + 12 + n : i + 16 + n] == log_lib._masked_crc(record)
    out.append(record)
    i += 16 + n
  return out


def test_round_trip_on_gs(fake_gcs):
  base = "gs://bucket/run"
  assert files.is_remote(base) and not files.is_remote("runs/gs")
  files.makedirs(base)  # nothing to make on an object store
  assert not files.exists(f"{base}/a.json")
  files.write_json(f"{base}/a.json", {"x": 1, "y": [1.5, "z"]})
  files.write_bytes(f"{base}/deep/b.bin", b"\x00\x01")
  files.write_bytes(f"{base}/deep/b.bin", b"\x02")  # replaced, not appended
  files.write_npz(f"{base}/c.npz", images=np.arange(6, dtype=np.uint8).reshape(2, 3))
  assert files.exists(f"{base}/a.json")
  assert json.loads(files.read_bytes(f"{base}/a.json")) == {"x": 1, "y": [1.5, "z"]}
  assert files.read_bytes(epath.Path(base) / "deep" / "b.bin") == b"\x02"
  with np.load(io.BytesIO(files.read_bytes(f"{base}/c.npz"))) as data:
    np.testing.assert_array_equal(data["images"], np.arange(6).reshape(2, 3))
  assert sorted(fake_gcs.find("gs://bucket")) == [
      "gs://bucket/run/a.json",
      "gs://bucket/run/c.npz",
      "gs://bucket/run/deep/b.bin",
  ]


def test_local_writes_are_whole_and_leave_no_temporary(tmp_path):
  path = tmp_path / "new" / "dir" / "m.json"
  files.write_json(path, {"a": 1})
  assert path.read_text() == json.dumps({"a": 1}, indent=2)
  files.write_bytes(str(path), b"{}")
  assert path.read_bytes() == b"{}"
  files.write_npz(tmp_path / "s.npz", images=np.zeros((1, 2), np.uint8))
  assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["m.json", "s.npz"]


def _write_run(logdir: str) -> None:
  """Two steps, then a resumed writer adds a third."""
  writer = log_lib.MetricWriter(logdir)
  writer.write_scalars(1, {"loss": 0.5})
  writer.write_scalars(2, {"loss": 0.25, "lr": 1e-3})
  writer.close()
  writer = log_lib.MetricWriter(logdir)
  writer.write_scalars(3, {"loss": 0.125})
  writer.close()


def test_metric_writer_on_gs_keeps_history_across_writers(fake_gcs, tmp_path):
  _write_run("gs://bucket/run/logs")
  _write_run(str(tmp_path / "local" / "logs"))  # the local append behaviour, as a reference
  jsonl = files.read_bytes("gs://bucket/run/logs/metrics.jsonl").decode()
  assert [json.loads(line)["step"] for line in jsonl.splitlines()] == [1, 2, 3]
  assert jsonl == (tmp_path / "local" / "logs" / "metrics.jsonl").read_text()
  events = [p for p in fake_gcs.find("gs://bucket/run/logs") if "tfevents" in p]
  assert events
  records = [r for p in events for r in _records(files.read_bytes(p))]
  assert len(records) == 5  # per writer: the file_version event, then one per step
  assert sum(b"brain.Event:2" in r for r in records) == 2
  assert sum(b"loss" in r for r in records) == 3


def test_metric_writer_on_gs_resumes_an_existing_jsonl(fake_gcs):
  files.write_bytes("gs://bucket/run/logs/metrics.jsonl", b'{"step": 4, "loss": 1.0}\n')
  writer = log_lib.MetricWriter("gs://bucket/run/logs")
  writer.write_scalars(5, {"loss": 0.5})
  writer.close()
  lines = files.read_bytes("gs://bucket/run/logs/metrics.jsonl").decode().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [4, 5]


def test_image_grids_on_gs_decode_like_local_ones(fake_gcs, tmp_path):
  images = np.random.default_rng(0).uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
  log_lib.save_grid(images, "gs://bucket/run/samples_1.png", ncols=4, scale=2)
  log_lib.save_grid(images, str(tmp_path / "samples_1.png"), ncols=4, scale=2)
  rows = {"a": images, "b": images[:2]}
  log_lib.save_labelled_rows(rows, "gs://bucket/run/samples.png")
  log_lib.save_labelled_rows(rows, str(tmp_path / "samples.png"))
  for name in ("samples_1.png", "samples.png"):
    remote = Image.open(io.BytesIO(files.read_bytes(f"gs://bucket/run/{name}")))
    local = Image.open(tmp_path / name)
    assert remote.format == local.format == "PNG"
    np.testing.assert_array_equal(np.asarray(remote), np.asarray(local))


def test_reference_stats_round_trip_on_gs(fake_gcs):
  rng = np.random.default_rng(0)
  pool = FeatureStats.from_features(rng.normal(size=(6, 2048)))
  spatial = FeatureStats.from_features(rng.normal(size=(6, 2023)))
  desc = {"source": "digits", "count": 6}
  ref = ref_stats_lib.Reference(
      "", pool, 6, spatial, rng.normal(size=(3, 2048)).astype(np.float32), desc, "w.npz"
  )
  config = ml_collections.ConfigDict({"eval": {"reference": ""}})
  path = ref_stats_lib.reference_path(config, "gs://bucket/run")
  assert str(path) == "gs://bucket/run/reference_stats.npz"
  ref_stats_lib._write_reference(ref, path, skipped=0)
  loaded = ref_stats_lib.Reference.load("gs://bucket/run/reference_stats.npz")
  assert loaded.path == "gs://bucket/run/reference_stats.npz"
  assert loaded.count == 6 and loaded.description == desc and loaded.inception_weights == "w.npz"
  np.testing.assert_allclose(loaded.pool.mean, pool.mean)
  np.testing.assert_allclose(loaded.spatial.cov, spatial.cov)
  np.testing.assert_array_equal(loaded.pr_features, ref.pr_features)
  with pytest.raises(ValueError, match="not reference statistics"):
    ref_stats_lib.Reference.load("gs://bucket/run/missing.npz")


def test_report_mode_writes_to_gs(fake_gcs):
  """An entry point end to end: --mode=report with a gs:// workdir."""
  result = main.run(H.tiny_config("bidm"), "gs://bucket/run", "report")
  assert json.loads(files.read_bytes("gs://bucket/run/efficiency.json")) == result


def test_convert_to_gs_exports_in_place(fake_gcs, monkeypatch):
  """No local temporary folder for a URI: export_params writes the gs:// folder itself (Orbax
  on gs:// needs tensorstore's GCS driver, so export_params is stubbed here)."""
  calls = []
  monkeypatch.setattr(ckpt_lib, "export_params", lambda *args: calls.append(args))
  convert_ddpm.export_atomically(epath.Path("gs://bucket/teacher"), {"w": 1}, {"ch": 32})
  assert [(str(a[0]), a[1], a[2]) for a in calls] == [("gs://bucket/teacher", {"w": 1}, {"ch": 32})]


def test_write_json_is_strict_json(tmp_path):
  path = tmp_path / "r.json"
  files.write_json(
      path,
      {
          "nan": float("nan"),
          "inf": np.float32("inf"),
          "ok": np.float64(1.5),
          "rows": (np.arange(2), [float("-inf")]),
      },
  )
  text = path.read_text()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"nan": None, "inf": None, "ok": 1.5, "rows": [[0, 1], [None]]}
