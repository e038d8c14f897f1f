"""benchmarks/study_session.sh: which runs it plans, on which GPUs, and its one-line refusals.

Nothing trains here (docs/results.md has the script's CPU dry run, a few minutes long): `plan`
prints what `start` would start, and the refusals come before anything is detached.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "study_session.sh"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash script")

_SETTINGS = ("DATA", "INC", "TEACHER", "SEEDS", "TABLE1", "RUNS", "GPUS", "EVAL_AT_ONCE", "EXTRA")


def study(*args, **env) -> subprocess.CompletedProcess:
  base = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
  return subprocess.run(
      ["bash", str(SCRIPT), *args],
      env={**base, **{k: str(v) for k, v in env.items()}},
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )


def plan(**env) -> tuple[dict[str, tuple[int, str]], list[str]]:
  """{run name: (GPU, flags)} and the runs compiled ahead, as `study_session.sh plan` says."""
  r = study("plan", **env)
  assert r.returncode == 0, r.stderr
  *lines, warm = r.stdout.splitlines()
  runs = {}
  for line in lines:
    head, flags = line.split(": ", 1)
    name, _, gpu = head.split(" ")
    runs[name] = (int(gpu), flags)
  assert warm.startswith("compiled ahead: ")
  return runs, warm.removeprefix("compiled ahead: ").split()


def test_table3_runs_and_one_warm_up_per_program(tmp_path):
  runs, warm = plan(GPUS=1, JOBS=tmp_path)
  variants = ["xnor", "xnor+tbs", "xnor+spd", "bidm"]
  assert list(runs) == [f"{v}-s{s}" for s in (0, 1) for v in variants]
  assert warm == [f"{v}-s0" for v in variants]  # the seed is not part of the program
  assert {gpu for gpu, _ in runs.values()} == {0}
  assert runs["bidm-s1"][1] == "--config.binarization.method=bidm --config.seed=1"


@pytest.mark.parametrize("gpus", [2, 3, 4, 8])
def test_runs_spread_evenly_and_seeds_part(tmp_path, gpus):
  runs, warm = plan(GPUS=gpus, TABLE1=1, JOBS=tmp_path)
  table1 = ["xnorpp", "dorefa", "reactnet", "reste", "bbcu", "efficientdm"]
  assert [n for n in runs if not n.endswith("-s1")][4:] == [f"{m}-s0" for m in table1]
  assert len(runs) == 14 and len(warm) == 10
  load = collections.Counter(gpu for gpu, _ in runs.values())
  assert set(load) == set(range(min(gpus, 14))) and max(load.values()) - min(load.values()) <= 1
  for variant in ["xnor", "xnor+tbs", "xnor+spd", "bidm"]:
    assert runs[f"{variant}-s0"][0] != runs[f"{variant}-s1"][0], variant


def test_runs_file_and_refusals(tmp_path):
  runs_file = tmp_path / "runs.txt"
  runs_file.write_text("a --config.seed=0\n\nb --config.seed=1\n")
  runs, warm = plan(GPUS=2, RUNS=runs_file, JOBS=tmp_path)
  assert runs == {"a": (0, "--config.seed=0"), "b": (1, "--config.seed=1")} and warm == ["a"]

  empty = tmp_path / "empty.txt"
  empty.write_text("\n")
  data = tmp_path / "data"
  (data / "train").mkdir(parents=True)
  jobs = tmp_path / "jobs"
  for env, message in [
      (dict(RUNS=tmp_path / "missing.txt"), "RUNS: no file"),
      (dict(RUNS=empty), "RUNS: no runs in"),
      (dict(DATA=tmp_path / "nowhere"), "DATA: no folder"),
      (dict(TEACHER=tmp_path), "is no exported teacher"),
  ]:
    r = study("start", **{"DATA": data, "INC": runs_file, "JOBS": jobs, **env})
    assert r.returncode == 2 and message in r.stderr, (env, r.stdout, r.stderr)
    assert not (jobs / "t0").exists()  # nothing was started
  for command in (["watch", "1"], ["collect", str(tmp_path / "out")]):
    r = study(*command, JOBS=jobs)
    assert r.returncode == 3 and "no study in" in r.stdout
