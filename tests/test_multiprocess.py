"""Two processes on one host (`--distributed` with a local coordinator), on CPU devices.

The multi-host path of training: jax.distributed.initialize, per-host data shards assembled by
make_array_from_process_local_data, Orbax checkpoints written by both processes (the data
iterator's state once per process), the preemption sync point (SIGTERM to one process: both
save the same step and exit 0), and a rerun of both that resumes from that step.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

import helpers as H

FLAGS = [
    *H.MICRO_FLAGS,
    "--config.binarization.method=fp",
    "--config.training.log_every=5",
    "--config.training.checkpoint_every=1000",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return H.subprocess_env(H.cache_dir(tmp_path_factory), devices=1)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, steps: int, env, tmp_path, tag: str) -> list[tuple[subprocess.Popen, str]]:
  """Both processes of one run; each writes its output to a file (returned with it)."""
  port = _free_port()
  procs = []
  for i in range(2):
    log = tmp_path / f"{tag}{i}.log"
    args = H.cli_args(
        workdir,
        "train",
        *FLAGS,
        f"--config.training.steps={steps}",
        "--distributed",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
    )
    with open(log, "w") as out:
      procs.append(
          (subprocess.Popen(args, cwd=H.REPO, env=env, stdout=out, stderr=subprocess.STDOUT), log)
      )
  return procs


def _finish(procs, timeout: float = 300) -> list[str]:
  """Waits for both; fails with their output unless both exit 0; returns their output."""
  deadline = time.monotonic() + timeout
  for proc, _ in procs:
    try:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p, _ in procs:
        p.kill()
  outputs = [log.read_text() for _, log in procs]
  codes = [proc.returncode for proc, _ in procs]
  assert codes == [0, 0], f"exit codes {codes}:\n" + "\n---\n".join(o[-3000:] for o in outputs)
  return outputs


def test_two_processes_preempt_save_and_resume(tmp_path, env):
  """SIGTERM to process 1 alone: both processes save the same step S (the data state of each)
  and exit 0; process 0 reports preempted at S. Both rerun with steps S + 5: they resume at S
  and the metrics continue from it."""
  workdir = tmp_path / "run"
  procs = _start(workdir, 1000, env, tmp_path, "first")
  deadline = time.monotonic() + 300
  while len(H.read_metrics(workdir)) < 2:
    assert time.monotonic() < deadline, "no metrics after 300 s"
    assert all(p.poll() is None for p, _ in procs), [log.read_text()[-2000:] for _, log in procs]
    time.sleep(0.1)
  procs[1][0].terminate()
  first = H.last_json(_finish(procs)[0])
  step = first["step"]
  assert first["preempted"] and 10 <= step < 1000
  assert H.checkpoint_steps(workdir) == [step]
  data = workdir / "checkpoints" / str(step) / "data"
  assert sorted(p.name for p in data.glob("process_*.json")) == [
      "process_0-of-2.json",
      "process_1-of-2.json",
  ]

  second = H.last_json(_finish(_start(workdir, step + 5, env, tmp_path, "second"))[0])
  assert second["start_step"] == step and second["step"] == step + 5
  assert not second["preempted"]
  assert H.checkpoint_steps(workdir) == [step, step + 5]
  logged = [m["step"] for m in H.read_metrics(workdir)]
  assert logged == sorted(set(logged)) and logged[-1] == step + 5


@pytest.mark.parametrize(
    "flags",
    [
        ["--num_processes=2"],
        ["--distributed", "--coordinator_address=localhost:1", "--process_id=0"],
    ],
)
def test_coordinator_flags_go_together(tmp_path, env, flags):
  proc = H.run(H.cli_args(tmp_path / "run", "train", *FLAGS, *flags), env, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "bidm_jax: error: --coordinator_address, --num_processes and --process_id go together, "
      "with --distributed"
  )
  assert not (tmp_path / "run").exists()
