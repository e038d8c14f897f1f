"""Preemption, resumption, kill -9 and divergence: the training loop's failure behaviour.

Every run here is a subprocess (signals, exit codes) sharing the session's compilation cache.
The QAT runs compile the same step as the demo pipeline's QAT stage (tiny config, 10 steps);
the CLI signal tests run a long FP schedule (1000 steps) that they stop early.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest

import helpers as H

LONG_FP_FLAGS = [*H.TINY_FLAGS, "--config.binarization.method=fp", "--config.training.steps=1000",
                 "--config.training.log_every=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return H.subprocess_env(H.cache_dir(tmp_path_factory))


def _losses(workdir) -> dict[int, dict]:
  return {m["step"]: {k: v for k, v in m.items() if k != "steps_per_sec"}
          for m in H.read_metrics(workdir)}


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"run ended ({proc.returncode}) before {what}:\n{out}\n{err[-3000:]}")
    time.sleep(0.02)
  proc.kill()
  pytest.fail(f"timed out waiting for {what}")


def _popen(args, env) -> subprocess.Popen:
  return subprocess.Popen(args, cwd=H.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


RESUME = r"""
import json, sys
import helpers as H
from bidm_jax.training import train as T
root, n = sys.argv[1], int(sys.argv[2])
teacher = H.export_teacher(H.tiny_config("fp"), root + "/teacher")
cfg = H.tiny_config("bidm", teacher=teacher, log_every=1, checkpoint_every=4)
out = {}
# SIGTERM arrives while the n-th batch is read: the run saves step n and returns
out["first"] = T.train(cfg, root + "/run", data_iterator=H.scripted_data(cfg, sigterm_after=n))
out["resumed"] = T.train(cfg, root + "/run")
out["whole"] = T.train(cfg, root + "/whole")
print(json.dumps({k: {a: b for a, b in v.items() if a != "state"} for k, v in out.items()}))
"""


def test_preempted_run_resumes_bit_identically(tmp_path, env):
  """QAT preempted (SIGTERM from inside the data iterator) after N = 5 of 2N steps, then resumed
  in the same workdir: the logged per-step metrics of all 2N steps and the final state (params,
  EMA, optimizer) equal those of an uninterrupted run bit for bit."""
  n = H.QAT_STEPS // 2
  proc = H.run_python(RESUME, tmp_path, n, env=env, timeout=400)
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["first"]["preempted"] and summary["first"]["step"] == n
  assert summary["resumed"]["start_step"] == n and summary["resumed"]["step"] == 2 * n
  assert not summary["resumed"]["preempted"] and summary["whole"]["step"] == 2 * n
  run, whole = _losses(tmp_path / "run"), _losses(tmp_path / "whole")
  assert sorted(run) == sorted(whole) == list(range(1, 2 * n + 1))
  for s in whole:
    assert run[s] == whole[s], f"step {s}: {run[s]} vs {whole[s]}"
  assert H.checkpoint_steps(tmp_path / "run") == [n, 8, 2 * n]  # 4 and the keep-3 policy
  H.assert_trees_equal(H.read_state(tmp_path / "run", 2 * n),
                       H.read_state(tmp_path / "whole", 2 * n), "final state")


def test_sigterm_saves_and_exits_zero(tmp_path, env):
  """SIGTERM to `python -m bidm_jax.main --mode=train` once a step is logged: exit code 0, a
  complete checkpoint at the step it stopped at (and none other), the summary says preempted."""
  workdir = tmp_path / "run"
  proc = _popen(H.cli_args(workdir, "train", *LONG_FP_FLAGS,
                           "--config.training.checkpoint_every=1000"), env)
  try:
    _wait_for(lambda: H.read_metrics(workdir), proc, 240, "the first logged step")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  summary = H.last_json(out)
  step = summary["step"]
  assert summary["preempted"] and 1 <= step < 1000
  assert H.checkpoint_steps(workdir) == [step]
  assert H.read_metrics(workdir)[-1]["step"] == step
  state = H.read_state(workdir, step)
  assert int(state["step"]) == step
  assert all(np.isfinite(v).all() for v in H.flat(state["params"]).values())


NAN = r"""
import sys
import helpers as H
from bidm_jax.training import train as T
root, k, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
teacher = H.export_teacher(H.tiny_config("fp"), root + "/teacher")
cfg = H.tiny_config("bidm", teacher=teacher, checkpoint_every=2, log_every=3)
# the reference: the same run stopped (preempted) after k good steps
T.train(cfg, root + "/reference", data_iterator=H.scripted_data(cfg, sigterm_after=k))
# the library: train() raises TrainingDiverged
try:
  T.train(cfg, root + "/api", data_iterator=H.scripted_data(cfg, nan_at=k))
except T.TrainingDiverged as e:
  print("API:", e, flush=True)
# the command line, with the NaN batch injected into the iterator it builds
from absl import app
from bidm_jax import data as data_lib
from bidm_jax import main
make = data_lib.make_train_iterator
data_lib.make_train_iterator = lambda *a, **kw: H.ScriptedIterator(make(*a, **kw), nan_at=k)
sys.argv = ["bidm_jax.main", "--config=configs/digits.py:smoke", "--workdir=" + root + "/cli",
            "--mode=train", "--config.training.teacher=" + teacher, *flags]
app.run(main.main, flags_parser=main.parse_flags)
"""


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tmp_path, env):
  """A NaN image batch at step k = 4 (0-based; checkpoints every 2 steps, logs every 3, so the
  NaN is caught by the lagged check of the next step): train() raises TrainingDiverged naming
  step 4 and the last good checkpoint (step 4); the CLI exits 1 with that message; nothing is
  saved after it, and checkpoint 4 holds finite parameters equal, bit for bit, to those of the
  same run stopped cleanly after 4 steps."""
  k = 4
  flags = [*H.QAT_FLAGS, "--config.training.checkpoint_every=2", "--config.training.log_every=3"]
  proc = H.run([H.PYTHON, "-c", NAN, str(tmp_path), str(k), *flags], env, timeout=400)
  assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr[-3000:]}"
  expected = [f"non-finite loss at step {k}",
              f"last good checkpoint is step {k} in {tmp_path}/cli/checkpoints"]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("bidm_jax: error:")]
  assert len(errors) == 1 and all(e in errors[0] for e in expected), proc.stderr[-3000:]
  api = [l for l in proc.stdout.splitlines() if l.startswith("API:")]
  assert len(api) == 1 and f"non-finite loss at step {k}" in api[0], proc.stdout
  assert f"last good checkpoint is step {k} in {tmp_path}/api/checkpoints" in api[0]
  assert H.checkpoint_steps(tmp_path / "reference") == [2, k]
  reference = H.read_state(tmp_path / "reference", k)
  for run in ("cli", "api"):
    assert H.checkpoint_steps(tmp_path / run) == [2, k], run
    assert [m["step"] for m in H.read_metrics(tmp_path / run)] == [3], run
    state = H.read_state(tmp_path / run, k)
    assert all(np.isfinite(v).all() for v in H.flat(state).values())
    H.assert_trees_equal(state, reference, f"{run} checkpoint {k}")


def test_kill9_restart_resumes_from_latest_complete_checkpoint(tmp_path, env):
  """SIGKILL a CLI training run once a checkpoint is complete; restarting the same command
  resumes from the latest complete checkpoint (a half-written one is ignored) and replays the
  steps after it with bit-identical losses."""
  workdir = tmp_path / "run"
  args = H.cli_args(workdir, "train", *LONG_FP_FLAGS, "--config.training.checkpoint_every=3")
  proc = _popen(args, env)
  try:
    _wait_for(lambda: H.checkpoint_steps(workdir), proc, 240, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  latest = H.checkpoint_steps(workdir)[-1]
  killed = _losses(workdir)
  logged = len(H.read_metrics(workdir))

  proc = _popen(args, env)
  try:
    _wait_for(lambda: len(H.read_metrics(workdir)) > logged + 2, proc, 240,
              "the restarted run's first steps")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  summary = H.last_json(out)
  assert summary["start_step"] == latest and summary["preempted"]
  new = H.read_metrics(workdir)[logged:]
  assert [m["step"] for m in new] == list(range(latest + 1, latest + 1 + len(new)))
  replayed = {m["step"]: {k: v for k, v in m.items() if k != "steps_per_sec"} for m in new}
  for s in set(replayed) & set(killed):
    assert replayed[s] == killed[s], f"step {s}: {replayed[s]} vs {killed[s]}"
  assert summary["step"] in H.checkpoint_steps(workdir)
