"""benchmarks/bench.py runs its packed-sampling group on the tiny preset and prints its figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench  # noqa: E402


def test_packed_group_prints_fp_packed_and_ratio(monkeypatch, capsys):
  argv = ["bench.py", "--preset=tiny", "--only", "packed", "--sample-batches", "2"]
  monkeypatch.setattr(sys, "argv", argv + ["--iters", "1", "--warmup", "0"])
  bench.main()
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  by_name = {(r["figure"], r.get("method")): r for r in rows}
  fp = by_name["ddim_sampling_throughput", "fp"]
  packed = by_name["packed_ddim_sampling_throughput", "bidm"]
  ratio = by_name["packed_over_fp_sampling", None]
  assert fp["tbs_connections"] == 0 and packed["tbs_connections"] > 0
  assert packed["impl"] == "int8" and fp["impl"] is None
  assert fp["value"] > 0 and packed["value"] > 0
  assert abs(ratio["value"] - packed["value"] / fp["value"]) < 1e-9
  assert [r["figure"] for r in rows] == [
      "ddim_sampling_throughput",
      "packed_ddim_sampling_throughput",
      "packed_over_fp_sampling",
  ]


def test_config_file_names_the_benchmarked_model(monkeypatch, capsys):
  """--config benchmarks a config file's model (the LDM configs for Table 9); every figure says
  which; a missing file is one usage error."""
  config = "configs/lsun_bedrooms_ldm4.py:tiny"
  argv = ["bench.py", "--preset=tiny", f"--config={config}", "--only", "floor", "--iters", "1"]
  monkeypatch.setattr(sys, "argv", argv)
  bench.main()
  (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert row["figure"] == "matmul_rate" and row["config"] == config and row["value"] > 0
  monkeypatch.setattr(sys, "argv", ["bench.py", "--config=configs/missing.py"])
  with pytest.raises(SystemExit):
    bench.main()
  assert "--config=configs/missing.py: [Errno 2] No such file" in capsys.readouterr().err


def test_profile_traces_each_timed_step(monkeypatch, capsys, tmp_path):
  """--profile DIR: after its timing, each train step is traced into DIR/<figure>, which
  benchmarks/profile_summary.py reads."""
  import profile_summary  # pylint: disable=import-outside-toplevel

  argv = ["bench.py", "--preset=tiny", "--config=configs/digits.py:smoke", "--train-batch=8"]
  argv += ["--only", "fp", "--iters", "1", "--warmup", "0", f"--profile={tmp_path}"]
  monkeypatch.setattr(sys, "argv", argv)
  bench.main()
  (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert row["figure"] == "fp_train_step" and row["batch"] == 8
  assert profile_summary.main([str(tmp_path / "fp_train_step"), "--steps", "5"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["steps"] == 5 and "/host:CPU" in summary["processes"]
