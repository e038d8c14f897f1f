"""benchmarks/bench.py runs its packed-sampling group on the tiny preset and prints its figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
