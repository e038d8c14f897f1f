"""The digits demo (`--mode=pipeline`) is reproducible: report.json has the same bytes on any
number of CPU threads and after a rerun in the same workdir."""

from __future__ import annotations

import json
import os

import numpy as np

import pytest
from PIL import Image

import helpers as H


def _pipeline(workdir, env, cache="off"):
  proc = H.run(
      H.cli_args(workdir, "pipeline", *H.MICRO_FLAGS, f"--config.compilation_cache={cache}"),
      env,
      timeout=500,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _check_outputs(workdir, proc):
  """FP training, BiDM QAT from it, sampling: report.json's per-model entries (also the last
  stdout line), timing.json, samples.png and each stage's last checkpoint."""
  report = json.loads((workdir / "report.json").read_text())
  assert H.last_json(proc.stdout)["fp"] == report["fp"]
  timing = json.loads((workdir / "timing.json").read_text())
  assert "wall_time_s" in timing and timing["device"] == "cpu" and "cpu_model" in timing
  for name in ("fp", "bidm"):
    entry = report[name]
    assert entry["method"] == name and entry["training_steps"] == 10
    for key in ("final_loss", "digits_fd", "param_bytes"):
      assert np.isfinite(entry[key]) and entry[key] > 0, (name, key, entry[key])
    assert entry["sampler"] == "ddim 3 steps, x0 clipped to [-1, 1]"
    assert entry["digits_fd_unprocessed_x0"] != entry["digits_fd"]
    assert timing[f"{name}_sampling_images_per_s"] > 0
    assert H.checkpoint_steps(workdir / name)[-1] == 10
  ratio = report["fp"]["param_bytes"] / report["bidm"]["param_bytes"]
  assert 4 < ratio < 5  # the micro U-Net's first and last convs stay FP: 4.4x (the demo: 7.3x)
  assert report["size_ratio"] == pytest.approx(ratio, rel=0.01)
  baselines = report["digits_fd_baselines"]
  assert 0 < 5 * baselines["real_digits"] < baselines["uniform_noise"]  # 32 samples: 6.2, 71
  with Image.open(workdir / "samples.png") as img:
    img.verify()
  with Image.open(workdir / "samples.png") as img:
    assert img.format == "PNG" and img.width > 8 * 8 and img.height > 2 * 8


@pytest.mark.slow
def test_pipeline_report_is_bit_identical_across_thread_counts_and_reruns(tmp_path):
  """NPROC sets the size of XLA:CPU's intra-op thread pool, which is what a busy or a smaller
  machine changes. With YNNPACK's reductions (jaxlib's default), one thread and two give other
  sums in the last bits, and the W1A1 stage turns them into other losses and samples. The two
  runs compile for themselves (no shared compilation cache). The rerun, which loads its
  programs from the first run's cache, trains nothing and must write the same report, final
  losses included."""
  env = H.subprocess_env(None)
  cache = tmp_path / "cache"
  proc = _pipeline(tmp_path / "two", dict(env, NPROC="2"), cache)
  _check_outputs(tmp_path / "two", proc)
  two = (tmp_path / "two" / "report.json").read_bytes()
  _pipeline(tmp_path / "one", dict(env, NPROC="1"))
  assert (tmp_path / "one" / "report.json").read_bytes() == two
  before = os.stat(tmp_path / "two" / "bidm" / "logs" / "metrics.jsonl").st_mtime_ns
  _pipeline(tmp_path / "two", dict(env, NPROC="2"), cache)
  assert (tmp_path / "two" / "report.json").read_bytes() == two
  assert os.stat(tmp_path / "two" / "bidm" / "logs" / "metrics.jsonl").st_mtime_ns == before


def test_digits_judge_ranks_real_digits_above_degraded_ones():
  """The demo's quality score orders what it should: held-out real digits score near 0, the
  same digits blurred or with their strokes saturated score worse, noise worst (the first 256
  digits are not a uniform draw of the classes: 2.2, against 0.5-0.7 for random draws)."""
  from sklearn.datasets import load_digits

  from bidm_jax.evaluation.digits import DigitsJudge

  judge = DigitsJudge(0)
  real = load_digits().images[:256, :, :, None] / 16.0 * 2.0 - 1.0
  blurred = (real + np.roll(real, 1, 1) + np.roll(real, 1, 2) + np.roll(real, (1, 1), (1, 2))) / 4
  saturated = np.where(real > -0.5, 1.0, -1.0)
  fd = {
      name: judge.evaluate(x)["digits_fd"]
      for name, x in dict(real=real, blurred=blurred, saturated=saturated).items()
  }
  baselines = judge.baselines(256, 0)
  assert fd["real"] < 3 and baselines["real_digits"] < 2
  assert fd["real"] < fd["blurred"] < baselines["uniform_noise"]
  assert fd["real"] < fd["saturated"] < baselines["uniform_noise"]
