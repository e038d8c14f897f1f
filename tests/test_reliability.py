"""Preemption, resumption, kill -9, divergence, damaged checkpoints, reruns and the workdir
lock: the training loop's failure behaviour.

Every run here is a subprocess (signals, exit codes) sharing the session's compilation cache.
The QAT runs train the micro U-Net (one level: preemption and divergence do not depend on the
model); the CLI signal tests run a long FP schedule (1000 steps) that they stop early; the
damaged-checkpoint tests copy one tiny FP run (8 steps, stopped at 6) and damage its checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers as H
from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax.binarize.methods import FP
from bidm_jax.training import checkpoint as ckpt_lib
from bidm_jax.training import train as train_lib
from bidm_jax.training.logging import MetricWriter

LONG_FP_FLAGS = [
    *H.TINY_FLAGS,
    "--config.binarization.method=fp",
    "--config.training.steps=1000",
    "--config.training.log_every=1",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return H.subprocess_env(H.cache_dir(tmp_path_factory))


def _losses(workdir) -> dict[int, dict]:
  return {
      m["step"]: {k: v for k, v in m.items() if k != "steps_per_sec"}
      for m in H.read_metrics(workdir)
  }


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


FOREGROUND = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
)
"""Runs the rest of its argv as a terminal's foreground job would: SIGINT not ignored (this
process may be a shell's background job)."""


def _popen(args, env) -> subprocess.Popen:
  return subprocess.Popen(
      [H.PYTHON, "-c", FOREGROUND, *args[1:]],
      cwd=H.REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


RESUME = r"""
import json, sys
import helpers as H
from bidm_jax.training import train as T
root, n = sys.argv[1], int(sys.argv[2])
teacher = H.export_teacher(H.tiny_config("fp", micro=True), root + "/teacher")
cfg = H.tiny_config("bidm", micro=True, teacher=teacher, log_every=1, checkpoint_every=4)
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
  H.assert_trees_equal(
      H.read_state(tmp_path / "run", 2 * n), H.read_state(tmp_path / "whole", 2 * n), "final state"
  )


def test_sigterm_saves_and_exits_zero(tmp_path, env):
  """SIGTERM to `python -m bidm_jax.main --mode=train` once a step is logged: exit code 0, a
  complete checkpoint at the step it stopped at (and none other), the summary says preempted."""
  workdir = tmp_path / "run"
  proc = _popen(
      H.cli_args(workdir, "train", *LONG_FP_FLAGS, "--config.training.checkpoint_every=1000"), env
  )
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
teacher = H.export_teacher(H.tiny_config("fp", micro=True), root + "/teacher")
cfg = H.tiny_config("bidm", micro=True, teacher=teacher, checkpoint_every=2, log_every=3)
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
  flags = [
      *H.MICRO_QAT_FLAGS,
      "--config.training.checkpoint_every=2",
      "--config.training.log_every=3",
  ]
  proc = H.run([H.PYTHON, "-c", NAN, str(tmp_path), str(k), *flags], env, timeout=400)
  assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr[-3000:]}"
  expected = [
      f"non-finite loss at step {k}",
      f"last good checkpoint is step {k} in {tmp_path}/cli/checkpoints",
  ]
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
  (the killed run's lock file is still there) resumes from the latest complete checkpoint (a
  half-written one is ignored) and replays the steps after it with bit-identical losses;
  metrics.jsonl then has each step once."""
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
  assert (workdir / ckpt_lib.LOCK).exists()

  proc = _popen(args, env)
  try:
    _wait_for(
        lambda: H.read_metrics(workdir)[-1]["step"] > max(killed) + 2,
        proc,
        240,
        "the restarted run's first steps",
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  summary = H.last_json(out)
  assert summary["start_step"] == latest and summary["preempted"]
  rows = H.read_metrics(workdir)
  assert [m["step"] for m in rows] == list(range(1, len(rows) + 1))  # each step once
  replayed = {
      m["step"]: {k: v for k, v in m.items() if k != "steps_per_sec"}
      for m in rows
      if m["step"] > latest
  }
  for s in set(replayed) & set(killed):
    assert replayed[s] == killed[s], f"step {s}: {replayed[s]} vs {killed[s]}"
  assert summary["step"] in H.checkpoint_steps(workdir)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints, reruns, Ctrl-C, the workdir lock, the EMA guard.

FP_RUN = r"""
import sys
import helpers as H
from bidm_jax.training import train as T
cfg = H.tiny_config("fp", steps=8, checkpoint_every=2, log_every=1)
T.train(cfg, sys.argv[1], data_iterator=H.scripted_data(cfg, sigterm_after=6))
"""

FP_RUN_FLAGS = [
    *H.TINY_FLAGS,
    "--config.binarization.method=fp",
    "--config.training.steps=8",
    f"--config.training.learning_rate={H.QAT_LR}",
    "--config.training.checkpoint_every=2",
    "--config.training.log_every=1",
]
"""The command line of FP_RUN's config (the same compiled step)."""

DAMAGES = ("finite", "random", "truncate", "delete", "manifest", "no_meta")


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory, env):
  """A tiny FP run of 8 steps preempted after step 6: checkpoints 2, 4 and 6, metrics of steps
  1-6. Tests copy it."""
  root = tmp_path_factory.mktemp("fp_run") / "run"
  H.run_python(FP_RUN, root, env=env, timeout=300)
  assert H.checkpoint_steps(root) == [2, 4, 6]
  return root


def _copy(fp_run, tmp_path):
  return shutil.copytree(fp_run, tmp_path / "run")


def _damage(workdir, step: int, how: str) -> None:
  """Damages checkpoint `step`: 'finite' doubles the stored values of one array (they stay
  finite, as random bytes in a compressed chunk can decode to), 'random' writes 64 random bytes
  into the middle of the largest data file, 'truncate' halves it, 'delete' removes it,
  'manifest' fills the OCDBT manifests with random bytes, 'no_meta' removes the meta item."""
  folder = workdir / "checkpoints" / str(step)
  data = [p for p in (folder / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  largest = max(data, key=lambda p: p.stat().st_size)
  rng = np.random.default_rng(0)
  if how == "finite":  # the data files are compressed: rewrite the item with other values
    state = H.read_state(workdir, step)
    state["ema_params"]["conv_in"]["kernel"] = 2 * state["ema_params"]["conv_in"]["kernel"]
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(workdir.parent / "rewritten", state)
    shutil.rmtree(folder / "state")
    shutil.move(workdir.parent / "rewritten", folder / "state")
  elif how == "random":
    raw = bytearray(largest.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = rng.bytes(64)
    largest.write_bytes(bytes(raw))
  elif how == "truncate":
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
  elif how == "delete":
    largest.unlink()
  elif how == "manifest":
    for manifest in (folder / "state").rglob("manifest.ocdbt"):
      manifest.write_bytes(rng.bytes(manifest.stat().st_size))
  else:
    shutil.rmtree(folder / "meta")


def _stderr_lines(proc) -> list[str]:
  """The process's stderr lines, less Orbax's note that an async save waited for the previous
  one (it appears whenever the machine is busy, and says nothing about the checkpoint)."""
  return [
      line
      for line in proc.stderr.splitlines()
      if line.strip() and "Waiting for previous save to complete" not in line
  ]


@pytest.mark.parametrize("how", DAMAGES)
def test_load_params_skips_a_damaged_latest_checkpoint(fp_run, tmp_path, how, caplog):
  """load_params (teacher, sample, evaluate) on a workdir whose latest checkpoint (6) is damaged
  in any of six ways, including finite-but-wrong values that only the checksum catches: the EMA
  parameters of step 4, one warning line naming step 6, and nothing in the workdir changed."""
  run = _copy(fp_run, tmp_path)
  _damage(run, 6, how)
  before = H.snapshot(run)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    params, meta = ckpt_lib.load_params(run, builders.model_description(H.tiny_config("fp")))
  lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(lines) == 1 and "step 6" in lines[0] and "using step 4" in lines[0], lines
  assert meta["kind"] == "training" and meta["step"] == 4
  H.assert_trees_equal(params, H.read_state(run, 4)["ema_params"], "EMA of step 4")
  assert H.snapshot(run) == before


@pytest.mark.parametrize("how", ["finite", "truncate"])
def test_training_resumes_from_the_newest_good_checkpoint(fp_run, tmp_path, env, how):
  """Training on from a workdir whose latest checkpoint is damaged: exit 0 and one stderr line
  (step 6 damaged, moved, resuming from step 4); checkpoint 6 is moved, byte for byte, to
  damaged_checkpoints/6; the run replays steps 5-6 with the same losses and ends at step 8;
  metrics.jsonl has steps 1-8 once each."""
  run = _copy(fp_run, tmp_path)
  first = {
      m["step"]: {k: v for k, v in m.items() if k != "steps_per_sec"} for m in H.read_metrics(run)
  }
  _damage(run, 6, how)
  damaged = H.snapshot(run / "checkpoints" / "6")
  proc = H.run(H.cli_args(run, "train", *FP_RUN_FLAGS), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _stderr_lines(proc)
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "step 6" in lines[0] and "resuming from step 4" in lines[0], lines[0]
  summary = H.last_json(proc.stdout)
  assert summary["start_step"] == 4 and summary["step"] == 8
  assert H.checkpoint_steps(run) == [4, 6, 8]
  assert H.snapshot(run / ckpt_lib.DAMAGED / "6") == damaged
  rows = _losses(run)
  assert list(rows) == list(range(1, 9))
  assert all(rows[s] == first[s] for s in (5, 6))
  assert all(np.isfinite(v).all() for v in H.flat(H.read_state(run, 8)).values())


def test_teacher_with_only_damaged_checkpoints_is_one_line(fp_run, tmp_path, env):
  """QAT whose teacher workdir has every checkpoint damaged: exit 1, one error line naming
  config.training.teacher and each damaged step; the teacher's workdir is unchanged."""
  teacher = _copy(fp_run, tmp_path)
  for step, how in ((2, "no_meta"), (4, "truncate"), (6, "finite")):
    _damage(teacher, step, how)
  before = H.snapshot(teacher)
  proc = H.run(
      H.cli_args(tmp_path / "qat", "train", *H.QAT_FLAGS, f"--config.training.teacher={teacher}"),
      env,
  )
  assert proc.returncode == 1
  lines = _stderr_lines(proc)
  assert len(lines) == 1 and lines[0].startswith(
      "bidm_jax: error: config.training.teacher:"
  ), proc.stderr[-3000:]
  assert "no readable checkpoint" in lines[0]
  assert all(f"step {s}:" in lines[0] for s in (2, 4, 6)), lines[0]
  assert H.snapshot(teacher) == before


ROTATION = r"""
import pathlib, sys
import numpy as np
import orbax.checkpoint as ocp
import helpers as H
from bidm_jax.training import checkpoint as C
from bidm_jax.training import train as T
root, target = sys.argv[1], sys.argv[2]
wait = ocp.CheckpointManager.wait_until_finished

def corrupting_wait(self):
  # storage that corrupts checkpoint `target` once written: random bytes in its largest file
  wait(self)
  folder = pathlib.Path(str(self.directory)) / target
  if folder.exists():
    largest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(largest.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = np.random.default_rng(0).bytes(64)
    largest.write_bytes(bytes(raw))

ocp.CheckpointManager.wait_until_finished = corrupting_wait
cfg = H.tiny_config("fp", steps=8, checkpoint_every=4, log_every=1, keep_checkpoints=1)
try:
  T.train(cfg, root)
except C.CheckpointError as e:
  print("ERROR:", e)
"""


def test_rotation_keeps_the_last_good_checkpoint(tmp_path, env):
  """keep_checkpoints=1, checkpoints at 4 and 8, and storage that corrupts step 8 every time it
  is written: step 4 is never deleted, since step 8 never reads back intact; both copies of 8
  are moved to damaged_checkpoints/ and train() raises CheckpointError saying so."""
  proc = H.run_python(ROTATION, tmp_path / "run", 8, env=env, timeout=300)
  errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR:")]
  assert len(errors) == 1 and "step 8" in errors[0] and "twice" in errors[0], proc.stdout
  assert H.checkpoint_steps(tmp_path / "run") == [4]
  assert sorted(p.name for p in (tmp_path / "run" / ckpt_lib.DAMAGED).iterdir()) == ["8", "8.1"]
  assert all(np.isfinite(v).all() for v in H.flat(H.read_state(tmp_path / "run", 4)).values())


def test_load_params_at_a_step_and_raw(fp_run, tmp_path):
  """load_params reads exactly the step asked for (EMA or raw parameters, as saved), refuses a
  step the workdir lacks naming the steps it has, and refuses a step or raw parameters from an
  export, which holds one set."""
  model = builders.model_description(H.tiny_config("fp"))
  saved = {step: H.read_state(fp_run, step) for step in (4, 6)}
  params, meta = ckpt_lib.load_params(fp_run, model, step=4)
  assert meta["step"] == 4
  H.assert_trees_equal(params, saved[4]["ema_params"], "step 4, EMA")
  raw, _ = ckpt_lib.load_params(fp_run, model, step=4, use_ema=False)
  H.assert_trees_equal(raw, saved[4]["params"], "step 4, raw")
  newest, meta = ckpt_lib.load_params(fp_run, model, use_ema=False)
  assert meta["step"] == 6
  H.assert_trees_equal(newest, saved[6]["params"], "newest, raw")
  assert not np.array_equal(
      H.flat(raw)["['conv_in']['kernel']"], H.flat(newest)["['conv_in']['kernel']"]
  )
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no checkpoint step 5 in .*\[2, 4, 6\]"):
    ckpt_lib.load_params(fp_run, model, step=5)
  export = tmp_path / "export"
  H.export_teacher(H.tiny_config("fp"), export)
  for kwargs in (dict(step=4), dict(use_ema=False)):
    with pytest.raises(ckpt_lib.CheckpointError, match=r"is an export, which holds one set"):
      ckpt_lib.load_params(export, model, **kwargs)


@pytest.mark.parametrize("steps", [4, 6])
def test_rerun_with_fewer_or_equal_steps(fp_run, tmp_path, env, steps):
  """Rerunning on a checkpoint at step 6 with training.steps=4: exit 1, one error line naming
  both numbers; with training.steps=6: exit 0, one warning that there is nothing to train.
  Either way nothing in the workdir changes."""
  run = _copy(fp_run, tmp_path)
  before = H.snapshot(run)
  flags = [f for f in FP_RUN_FLAGS if "training.steps" not in f]
  proc = H.run(H.cli_args(run, "train", *flags, f"--config.training.steps={steps}"), env)
  lines = _stderr_lines(proc)
  assert len(lines) == 1, proc.stderr[-3000:]
  if steps < 6:
    assert proc.returncode == 1
    assert lines[0].startswith("bidm_jax: error: config.training.steps: 4 is below step 6")
  else:
    assert proc.returncode == 0 and "already at step 6" in lines[0], lines[0]
    assert H.last_json(proc.stdout)["step"] == 6
  assert H.snapshot(run) == before


def test_ctrl_c_saves_and_a_second_run_is_refused(tmp_path, env):
  """While a CLI training run holds the workdir, a second run on it exits 1 with one line naming
  the first run's pid (and changes nothing); Ctrl-C (SIGINT) then makes the first save the step
  it stopped at and exit 0, as SIGTERM does, and the lock file is gone."""
  workdir = tmp_path / "run"
  proc = _popen(
      H.cli_args(workdir, "train", *LONG_FP_FLAGS, "--config.training.checkpoint_every=1000"), env
  )
  try:
    _wait_for(lambda: H.read_metrics(workdir), proc, 240, "the first logged step")
    second = H.run(H.cli_args(workdir, "train", *LONG_FP_FLAGS), env)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert second.returncode == 1
  lines = _stderr_lines(second)
  assert len(lines) == 1 and f"in use by another run (pid {proc.pid} " in lines[0], second.stderr
  assert proc.returncode == 0, err[-3000:]
  summary = H.last_json(out)
  step = summary["step"]
  assert summary["preempted"] and 1 <= step < 1000
  assert H.checkpoint_steps(workdir) == [step]
  assert [m["step"] for m in H.read_metrics(workdir)] == list(range(1, step + 1))
  assert not (workdir / ckpt_lib.LOCK).exists()


def test_closed_loop_callbacks_of_a_failing_read_are_dropped(monkeypatch):
  """A TensorStore completion that reports 'Event loop is closed' while a checkpoint read is
  still failing (before the failure reaches the reader's handler) prints nothing; any other
  error of such a callback still reaches the previous unraisable hook."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel

  seen = []
  monkeypatch.setattr("sys.unraisablehook", lambda u: seen.append(str(u.exc_value)))

  def complete_with(message):
    promise, future = ts.Promise.new()

    def callback(_):
      raise RuntimeError(message)

    future.add_done_callback(callback)
    promise.set_result(0)

  def failing_read():
    complete_with("Event loop is closed")
    raise ValueError("OUT_OF_RANGE")

  with pytest.raises(ckpt_lib.DamagedCheckpoint, match="its state cannot be read"):
    ckpt_lib._read("state", failing_read)  # pylint: disable=protected-access
  complete_with("another callback error")
  assert seen == ["another callback error"]


def test_non_finite_ema_counts_as_divergence():
  """A train step whose loss and gradient are finite but whose EMA is not (an inf carried in
  the EMA tree): metrics['finite'] is False and params, EMA and optimizer keep their values."""
  config = H.tiny_config("fp", micro=True, warmup_steps=0)
  model = builders.make_model(config, FP)
  tx = builders.make_optimizer(config)
  state = train_lib.create_state(H.random_params(model, builders.image_shape(config, 1)), tx)
  ema = jax.tree_util.tree_map(jnp.copy, state.ema_params)
  ema["conv_in"]["bias"] = ema["conv_in"]["bias"].at[0].set(jnp.inf)
  state = state.replace(ema_params=ema)
  step = jax.jit(train_lib.make_train_step(config, model, builders.make_schedule(config), tx))
  new, metrics = step(state, jnp.asarray(H.digits_batch(config)), jax.random.PRNGKey(0), None)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  assert not bool(metrics["finite"])
  for name in ("params", "ema_params", "opt_state"):
    H.assert_trees_equal(getattr(state, name), getattr(new, name), name)


def test_metric_rows_are_strict_json_and_replayed_steps_are_dropped(tmp_path):
  """MetricWriter: a non-finite value is written as null; a writer resuming from step 2 drops
  the rows of steps 3 and 4 and a last row cut short, so every step appears once."""
  logdir = tmp_path / "logs"
  writer = MetricWriter(str(logdir))
  for step in (1, 2, 3, 4):
    writer.write_scalars(step, {"loss": 1.0 / step, "grad_norm": math.inf if step == 4 else 1.0})
  writer.close()
  with open(logdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')
  text = (logdir / "metrics.jsonl").read_text()
  strict = lambda t: [
      json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}"))
      for line in t.splitlines()
      if line.endswith("}")
  ]
  assert strict(text)[3]["grad_norm"] is None
  writer = MetricWriter(str(logdir), resume_step=2)
  writer.write_scalars(3, {"loss": 0.5})
  writer.close()
  rows = strict((logdir / "metrics.jsonl").read_text())
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == 0.5


def test_damaged_export_is_one_error(tmp_path):
  """An exported parameter set whose stored values changed (finite, so only the checksum in
  model.json shows it): load_params raises one CheckpointError naming the array."""
  config = H.tiny_config("fp")
  export = tmp_path / "export"
  H.export_teacher(config, export)
  params = jax.tree_util.tree_map(np.asarray, ckpt_lib.load_params(export)[0])
  params["conv_in"]["kernel"] = 2 * params["conv_in"]["kernel"]
  shutil.rmtree(export / "params")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(export / "params", params)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"damaged: .* e\.g\. conv_in/kernel"):
    ckpt_lib.load_params(export, builders.model_description(config))


def test_method_fields_a_checkpoint_predates_hold_their_defaults(tmp_path):
  """A checkpoint written before width_shortcut / binary_skip_conv existed was trained with their
  defaults: it resumes under the default config and is refused, in one line naming the field,
  under another value (not later, at the restore of a different parameter tree)."""

  def meta_of(**overrides):
    config = H.tiny_config("bidm")
    config.binarization.update(**overrides)
    method = config_lib.method_from_config(config)
    return train_lib.run_meta(config, method, builders.make_model(config, method))

  old = meta_of()
  del old["method"]["width_shortcut"], old["method"]["binary_skip_conv"]
  train_lib._check_run_meta(json.loads(json.dumps(old)), meta_of(), str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    train_lib._check_run_meta(old, meta_of(width_shortcut="none"), str(tmp_path))
  message = str(e.value)
  assert (
      "\n" not in message and "method.width_shortcut: checkpoint 'conv' vs config 'none'" in message
  )
