"""The cluster launchers in launch/: Cloud TPU pod (tpu_pod.sh) and SLURM GPU (slurm_gpu.sbatch).

Nothing here reaches a cloud or a cluster: the scripts run with DRY_RUN=1 and their printed
commands are checked; the real-mode paths run against stand-in `gcloud`, `srun`, `scancel`
and `scontrol` programs put first on PATH. When the real gcloud is installed, the printed
gcloud commands are also parsed by it, with an empty configuration and no credentials, so a
misspelt flag fails here and no API is ever called.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_pod.sh"
SLURM = REPO / "launch" / "slurm_gpu.sbatch"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash scripts")

# Variables of the scripts and of SLURM that must not leak in from the caller's environment.
_SCRIPT_VARS = (
    "PROJECT",
    "ZONE",
    "TPU_NAME",
    "ACCELERATOR",
    "RUNTIME_VERSION",
    "SPOT",
    "PREEMPTIBLE",
    "SERVICE_ACCOUNT",
    "CREATE_FLAGS",
    "BUCKET",
    "CONFIG",
    "RUN_NAME",
    "WORKDIR",
    "DATA_DIR",
    "TFDS_DATASET",
    "TEACHER",
    "TEACHER_SOURCE",
    "TEACHER_GCS",
    "EXTRA_FLAGS",
    "REPO_URL",
    "REPO_REF",
    "REMOTE_DIR",
    "REMOTE_VENV",
    "PYTHON_VERSION",
    "WORKER",
    "LINES",
    "FOLLOW",
    "STOP_SIGNAL",
    "YES",
    "DRY_RUN",
    "REPO_DIR",
    "VENV",
    "PYTHON",
    "GPUS_PER_NODE",
    "STOP_GRACE",
    "REQUEUE",
    "JAX_LOCAL_DEVICE_IDS",
    "NCCL_NVLS_ENABLE",
)


def _env(**overrides) -> dict:
  env = {
      k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS and not k.startswith("SLURM_")
  }
  env.update({k: str(v) for k, v in overrides.items()})
  return env


def _script(path, *args, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
      ["bash", str(path), *args],
      env=_env(**env),
      capture_output=True,
      text=True,
      timeout=30,
      check=False,
  )


def tpu(*args, **env) -> subprocess.CompletedProcess:
  env.setdefault("DRY_RUN", "1")
  return _script(TPU, *args, **env)


def tpu_ok(*args, **env) -> list[str]:
  """The commands (one per line) that `tpu_pod.sh ARGS` prints under DRY_RUN=1."""
  r = tpu(*args, **env)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines, r.stderr
  return lines


def slurm(*args, **env) -> subprocess.CompletedProcess:
  return _script(SLURM, *args, **env)


def remote_script(line: str) -> str:
  """The --command script of a printed `gcloud compute tpus tpu-vm ssh` line."""
  words = shlex.split(line)
  return words[words.index("--command") + 1]


def assert_bash_syntax(script: str) -> None:
  r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
  assert r.returncode == 0, f"{r.stderr}\n{script}"


BASE = dict(
    BUCKET="bkt", PROJECT="proj", ZONE="us-central2-b", TPU_NAME="bidm-test", ACCELERATOR="v4-32"
)
QAT = dict(BASE, TEACHER="gs://bkt/teachers/ddpm-cifar10")


# --- both scripts -------------------------------------------------------------------------


@pytest.mark.parametrize("script", [TPU, SLURM], ids=lambda p: p.name)
def test_bash_syntax(script):
  r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", [TPU, SLURM], ids=lambda p: p.name)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  r = subprocess.run(
      ["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, check=False
  )
  assert r.returncode == 0, r.stdout + r.stderr


# --- tpu_pod.sh ---------------------------------------------------------------------------


def test_tpu_help_and_unknown_subcommand():
  r = tpu("help")
  assert r.returncode == 0 and "prepare-data" in r.stdout and "DRY_RUN" in r.stdout
  r = tpu("launch-rockets")
  assert r.returncode != 0 and "unknown subcommand 'launch-rockets'" in r.stderr
  r = tpu()
  assert r.returncode != 0 and "Usage:" in r.stderr


def test_tpu_create():
  (line,) = tpu_ok("create", **BASE)
  assert line == (
      "gcloud compute tpus tpu-vm create bidm-test --zone=us-central2-b "
      "--project=proj --accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
  )
  (line,) = tpu_ok(
      "create",
      **dict(
          BASE,
          ACCELERATOR="v5p-64",
          ZONE="europe-west4-b",
          SPOT=1,
          SERVICE_ACCOUNT="sa@proj.iam.gserviceaccount.com",
      ),
  )
  assert "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot" in line
  assert "--zone=europe-west4-b" in line
  assert "--service-account=sa@proj.iam.gserviceaccount.com" in line
  (line,) = tpu_ok("create", **dict(BASE, ACCELERATOR="v5litepod-16", PREEMPTIBLE=1))
  assert "--version=v2-alpha-tpuv5-lite --preemptible" in line
  (line,) = tpu_ok("create", **dict(BASE, ACCELERATOR="v6e-16", RUNTIME_VERSION="custom-rt"))
  assert "--version=custom-rt" in line
  r = tpu("create", **dict(BASE, SPOT=1, PREEMPTIBLE=1))
  assert r.returncode != 0 and "choose one" in r.stderr
  r = tpu("create", **dict(BASE, ACCELERATOR="v9x-8"))
  assert r.returncode != 0 and "RUNTIME_VERSION" in r.stderr


def test_tpu_install_copies_checkout_to_all_workers(tmp_path):
  lines = tpu_ok("install", TMPDIR=tmp_path, **BASE)
  assert len(lines) == 3
  tar, scp, ssh = lines
  assert tar.startswith(f"cd {REPO} && git ls-files -z") and "tar --null -T - -czf" in tar
  assert scp.startswith("gcloud compute tpus tpu-vm scp ")
  assert f"{tmp_path}/bidm-jax-src.tar.gz bidm-test:bidm-jax-src.tar.gz" in scp
  assert scp.endswith("--zone=us-central2-b --project=proj --worker=all")
  assert ssh.startswith(
      "gcloud compute tpus tpu-vm ssh bidm-test --zone=us-central2-b "
      "--project=proj --worker=all --command "
  )
  script = remote_script(ssh)
  assert_bash_syntax(script)
  assert 'uv venv --quiet --python 3.11 "$HOME"/bidm-venv' in script
  assert '-e "$HOME"/bidm-jax "jax[tpu]" gcsfs "array_record>=0.8.6"' in script
  assert not list(tmp_path.iterdir()), "DRY_RUN=1 must not build the tarball"


def test_tpu_install_from_git():
  (ssh,) = tpu_ok("install", REPO_URL="https://example.com/bidm-jax.git", REPO_REF="v1", **BASE)
  script = remote_script(ssh)
  assert_bash_syntax(script)
  assert "--worker=all" in ssh
  assert 'git clone --quiet https://example.com/bidm-jax.git "$HOME"/bidm-jax' in script
  assert "checkout --quiet v1" in script


def test_tpu_prepare_data_builds_array_record_and_publishes_to_gcs():
  (ssh,) = tpu_ok("prepare-data", **dict(BASE, BUCKET="gs://bkt/"))
  assert "--worker=0 " in ssh
  script = remote_script(ssh)
  assert_bash_syntax(script)
  assert "tensorflow-cpu tensorflow-datasets" in script
  assert (
      "tfds build cifar10 --file_format=array_record "
      '--data_dir="$HOME/tensorflow_datasets" --publish_dir=gs://bkt/tfds'
  ) in script


def test_tpu_prepare_data_follows_the_config():
  """The LDM configs' TFDS datasets (LSUN with tensorflow-io for its lmdb archives); FFHQ is
  an image folder and is refused in one line, as is a config with no known dataset."""
  for config, name in [
      ("configs/lsun_bedrooms_ldm4.py", "lsun/bedroom"),
      ("configs/lsun_churches_ldm8.py:tiny", "lsun/church_outdoor"),
  ]:
    (ssh,) = tpu_ok("prepare-data", **dict(BASE, CONFIG=config))
    script = remote_script(ssh)
    assert_bash_syntax(script)
    assert "tensorflow-datasets tensorflow-io;" in script
    assert f"tfds build {name} --file_format=array_record" in script
  (ssh,) = tpu_ok("prepare-data", **dict(BASE, CONFIG="configs/x.py", TFDS_DATASET="mnist"))
  assert "tfds build mnist --file_format" in remote_script(ssh)
  for config, message in [
      ("configs/ffhq_ldm4.py", "reads an image folder"),
      ("configs/x.py", "set TFDS_DATASET"),
  ]:
    r = tpu("prepare-data", **dict(BASE, CONFIG=config))
    assert r.returncode == 2 and message in r.stderr and r.stdout == "", r.stderr


def test_tpu_ldm_teacher_follows_the_config():
  """convert-teacher uploads an LDM config's teacher under the run's name, and a QAT train
  without TEACHER names that path."""
  env = dict(BASE, CONFIG="configs/lsun_bedrooms_ldm4.py")
  *_, ssh = tpu_ok("convert-teacher", TEACHER_SOURCE="/d/lsun_bedrooms/model.ckpt", **env)
  script = remote_script(ssh)
  assert "--config=configs/lsun_bedrooms_ldm4.py --config.convert.source=" in script
  assert "teacher-out/lsun_bedrooms_ldm4 gs://bkt/teachers/" in script
  r = tpu("train", **env)
  assert r.returncode == 2 and "set TEACHER=gs://bkt/teachers/lsun_bedrooms_ldm4 " in r.stderr


def test_tpu_train_command():
  (ssh,) = tpu_ok(
      "train",
      "--",
      "--config.training.steps=20",
      **dict(QAT, EXTRA_FLAGS="--config.training.log_every=5 --config.training.progress_bar=false"),
  )
  words = shlex.split(ssh)
  assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert "--worker=all" in words and "--zone=us-central2-b" in words
  script = remote_script(ssh)
  assert_bash_syntax(script)
  main = script[script.index("nohup ") + len("nohup ") : script.index(" >>")]
  assert shlex.split(main) == [
      "python",
      "-m",
      "bidm_jax.main",
      "--distributed",
      "--mode=train",
      "--config=configs/cifar10.py",
      "--workdir=gs://bkt/runs/cifar10",
      "--config.data.data_dir=gs://bkt/tfds",
      "--config.training.teacher=gs://bkt/teachers/ddpm-cifar10",
      "--config.training.log_every=5",
      "--config.training.progress_bar=false",
      "--config.training.steps=20",
  ]
  assert '>>"$HOME"/bidm-logs/cifar10.log 2>&1 </dev/null &' in script
  assert 'export PATH="$HOME"/bidm-venv/bin:"$PATH"; cd "$HOME"/bidm-jax' in script


def test_tpu_train_names_and_overrides():
  (ssh,) = tpu_ok("train", **dict(BASE, CONFIG="configs/cifar10.py:fp"))  # FP: no teacher
  script = remote_script(ssh)
  assert "--config=configs/cifar10.py:fp --workdir=gs://bkt/runs/cifar10-fp" in script
  assert "--config.training.teacher" not in script
  (ssh,) = tpu_ok(
      "train", **dict(QAT, RUN_NAME="exp 1", WORKDIR="gs://other/w", DATA_DIR="gs://data/tfds")
  )
  script = remote_script(ssh)
  assert_bash_syntax(script)
  assert "--workdir=gs://other/w --config.data.data_dir=gs://data/tfds" in script
  assert "bidm-logs/'exp 1'.log" in script


def test_tpu_train_refuses_qat_without_teacher_and_bad_batch():
  r = tpu("train", **BASE)
  assert r.returncode != 0 and "TEACHER is not set" in r.stderr and not r.stdout
  # v4-32 is 16 JAX devices: a global batch of 24 does not split over them, 32 does.
  r = tpu("train", "--", "--config.training.batch_size=24", **QAT)
  assert r.returncode != 0 and "16 devices of v4-32" in r.stderr
  assert tpu("train", "--", "--config.training.batch_size=32", **QAT).returncode == 0


@pytest.mark.parametrize("sub", ["prepare-data", "convert-teacher", "train"])
def test_tpu_missing_bucket_fails_with_message(sub):
  env = {k: v for k, v in QAT.items() if k != "BUCKET"}
  r = tpu(sub, TEACHER_SOURCE="/nonexistent", **env)
  assert r.returncode != 0
  assert "BUCKET is not set" in r.stderr
  assert not r.stdout, "nothing may be printed or run before the check"


def test_tpu_convert_teacher():
  r = tpu("convert-teacher", **BASE)
  assert r.returncode != 0 and "TEACHER_SOURCE is not set" in r.stderr
  mkdir, scp, ssh = tpu_ok("convert-teacher", TEACHER_SOURCE="/data/ddpm-cifar10-32/", **BASE)
  assert "--worker=0" in mkdir and "--worker=0" in ssh
  assert scp.endswith(
      "/data/ddpm-cifar10-32 bidm-test:teacher-src/ --zone=us-central2-b "
      "--project=proj --worker=0 --recurse"
  )
  script = remote_script(ssh)
  assert_bash_syntax(script)
  assert (
      "JAX_PLATFORMS=cpu python -m bidm_jax.main --mode=convert --config=configs/cifar10.py"
      ' --config.convert.source="$HOME"/teacher-src/ddpm-cifar10-32'
      ' --workdir="$HOME"/teacher-out/ddpm-cifar10'
  ) in script
  assert script.endswith(
      'gcloud storage cp --recursive "$HOME"/teacher-out/ddpm-cifar10 ' "gs://bkt/teachers/"
  )


def test_tpu_status_logs_stop_delete():
  describe, ssh = tpu_ok("status", **BASE)
  assert describe == (
      "gcloud compute tpus tpu-vm describe bidm-test --zone=us-central2-b --project=proj"
  )
  assert "--worker=all" in ssh
  assert_bash_syntax(remote_script(ssh))
  (logs,) = tpu_ok("logs", WORKER=2, LINES=7, **BASE)
  assert "--worker=2" in logs and remote_script(logs).endswith("tail -n 7")
  (follow,) = tpu_ok("logs", FOLLOW=1, **BASE)
  assert "tail -n 100 -f" in remote_script(follow)
  (stop,) = tpu_ok("stop", **BASE)
  assert "--worker=all" in stop and "kill -TERM" in remote_script(stop)
  assert_bash_syntax(remote_script(stop))
  (kill,) = tpu_ok("stop", STOP_SIGNAL="KILL", **BASE)
  assert "kill -KILL" in remote_script(kill)
  (delete,) = tpu_ok("delete", **BASE)
  assert delete == (
      "gcloud compute tpus tpu-vm delete bidm-test --zone=us-central2-b --project=proj"
  )
  (delete,) = tpu_ok("delete", YES=1, **BASE)
  assert delete.endswith(" --quiet")
  r = tpu("status", "--", "--x", **BASE)
  assert r.returncode != 0 and "takes no arguments" in r.stderr


def _fake_gcloud(tmp_path) -> tuple[Path, Path]:
  """A `gcloud` that records its arguments (one per line) instead of doing anything."""
  bindir, record = tmp_path / "bin", tmp_path / "gcloud.args"
  bindir.mkdir()
  fake = bindir / "gcloud"
  fake.write_text(
      f'#!/bin/bash\nprintf "%s\\n" "$@" >>{shlex.quote(str(record))}\n'
      'echo "---" >>' + shlex.quote(str(record)) + "\n"
  )
  fake.chmod(0o755)
  return bindir, record


def test_tpu_runs_exactly_what_dry_run_prints(tmp_path):
  bindir, record = _fake_gcloud(tmp_path)
  path = f"{bindir}{os.pathsep}{os.environ['PATH']}"
  for sub in ("create", "train", "stop"):
    (printed,) = tpu_ok(sub, PATH=path, **QAT)
    assert not record.exists(), "DRY_RUN=1 ran gcloud"
    r = tpu(sub, PATH=path, DRY_RUN=0, **QAT)
    assert r.returncode == 0, r.stderr
    calls = record.read_text().split("---\n")[:-1]
    assert len(calls) == 1
    assert ["gcloud", *calls[0].splitlines()] == shlex.split(printed)
    assert f"+ {printed}" in r.stderr  # echoed as it runs
    record.unlink()


def test_tpu_install_tarball_holds_the_checkout(tmp_path):
  """Real-mode install builds the archive of the checkout that scp sends."""
  if shutil.which("git") is None or not (REPO / ".git").exists():
    pytest.skip("needs the git checkout")
  bindir, record = _fake_gcloud(tmp_path)
  r = tpu(
      "install",
      PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
      DRY_RUN=0,
      TMPDIR=tmp_path,
      **BASE,
  )
  assert r.returncode == 0, r.stderr
  names = subprocess.run(
      ["tar", "-tzf", str(tmp_path / "bidm-jax-src.tar.gz")],
      capture_output=True,
      text=True,
      check=True,
  ).stdout.split()
  assert "bidm_jax/main.py" in names and "launch/tpu_pod.sh" in names
  assert not any(n.startswith(".git/") for n in names)
  assert len(record.read_text().split("---\n")[:-1]) == 2  # scp, then ssh


def test_tpu_gcloud_accepts_the_printed_flags(tmp_path):
  """gcloud itself parses each printed command (no account, no project API is reached)."""
  if shutil.which("gcloud") is None:
    pytest.skip("gcloud is not installed")
  # One command of each shape with flags beyond --zone/--project: create with every
  # optional flag, scp and ssh (--worker, --recurse, --command).
  lines = [
      *tpu_ok("create", **dict(QAT, SPOT=1, SERVICE_ACCOUNT="sa@proj.iam.gserviceaccount.com")),
      *tpu_ok("convert-teacher", TEACHER_SOURCE="/d/ddpm", **QAT)[1:],
  ]
  cfg = tmp_path / "gcloud-config"
  cfg.mkdir()
  env = _env(
      CLOUDSDK_CONFIG=cfg,
      CLOUDSDK_CORE_DISABLE_PROMPTS=1,
      CLOUDSDK_CORE_CHECK_GCE_METADATA="false",
      CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU="http://127.0.0.1:9/",
  )

  def parse(line):
    r = subprocess.run(
        shlex.split(line), env=env, capture_output=True, text=True, timeout=60, check=False
    )
    return line, r.returncode, r.stderr

  with ThreadPoolExecutor(len(lines)) as pool:
    for line, rc, err in pool.map(parse, lines):
      assert rc != 0  # it stops at the missing account, after parsing the flags
      assert "You do not currently have an active account selected" in err, f"{line}\n{err}"


# --- slurm_gpu.sbatch ---------------------------------------------------------------------

SLURM_RUN = dict(
    WORKDIR="/shared/runs/cifar10", TEACHER="/shared/teachers/ddpm-cifar10", DATA_DIR="/shared/tfds"
)


def test_slurm_header():
  header = [l for l in SLURM.read_text().splitlines() if l.startswith("#SBATCH")]
  options = {l.split()[1].split("=")[0] for l in header}
  assert {
      "--nodes",
      "--ntasks-per-node",
      "--gpus-per-node",
      "--cpus-per-task",
      "--time",
      "--signal",
      "--requeue",
  } <= options
  assert "#SBATCH --ntasks-per-node=1" in header
  assert "#SBATCH --signal=B:USR1@300" in header
  text = SLURM.read_text()
  assert text.index("#SBATCH") < text.index("set -euo pipefail")  # sbatch stops at code


def test_slurm_dry_run():
  r = slurm(
      "--config.training.steps=1000",
      DRY_RUN=1,
      EXTRA_FLAGS="--config.training.progress_bar=false",
      **SLURM_RUN,
  )
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[0] == "# 2 nodes x 1 process x 8 GPUs = 16 JAX devices"
  assert lines[1:4] == [
      "export NCCL_NVLS_ENABLE=0",
      "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
      f"cd {REPO}",
  ]
  assert shlex.split(lines[4]) == [
      "srun",
      "--export=ALL",
      "--kill-on-bad-exit=1",
      "--ntasks-per-node=1",
      f"{REPO}/.venv/bin/python",
      "-m",
      "bidm_jax.main",
      "--distributed",
      "--mode=train",
      "--config=configs/cifar10.py",
      "--workdir=/shared/runs/cifar10",
      "--config.data.data_dir=/shared/tfds",
      "--config.training.teacher=/shared/teachers/ddpm-cifar10",
      "--config.training.progress_bar=false",
      "--config.training.steps=1000",
  ]


def test_slurm_dry_run_settings():
  r = slurm(
      DRY_RUN=1,
      GPUS_PER_NODE=4,
      SLURM_JOB_NUM_NODES=3,
      WORKDIR="gs://b/runs/fp",
      CONFIG="configs/cifar10.py:fp",
      PYTHON="/opt/venv/bin/python",
  )
  assert r.returncode == 0, r.stderr
  assert "# 3 nodes x 1 process x 4 GPUs = 12 JAX devices" in r.stdout
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in r.stdout
  assert (
      "/opt/venv/bin/python -m bidm_jax.main --distributed --mode=train "
      "--config=configs/cifar10.py:fp --workdir=gs://b/runs/fp"
  ) in r.stdout
  r = slurm("--config.training.batch_size=64", DRY_RUN=1, GPUS_PER_NODE=6, **SLURM_RUN)
  assert r.returncode != 0 and "must divide by the 12 GPUs" in r.stderr


def test_slurm_refuses_bad_settings():
  r = slurm(**SLURM_RUN)
  assert r.returncode != 0 and "not inside a SLURM job" in r.stderr and not r.stdout
  r = slurm(DRY_RUN=1)
  assert r.returncode != 0 and "WORKDIR is not set" in r.stderr
  r = slurm(DRY_RUN=1, WORKDIR="/w")
  assert r.returncode != 0 and "TEACHER is not set" in r.stderr
  r = slurm(DRY_RUN=1, REPO_DIR="/nonexistent", **SLURM_RUN)
  assert r.returncode != 0 and "not the bidm-jax checkout" in r.stderr


# The batch script's signal handling, with stand-ins for srun (runs its command, and stops
# it with SIGKILL when it gets SIGTERM, as srun ends a step), scancel (SIGTERM to the
# training process, as `scancel --signal=TERM JOB` signals the job's steps) and scontrol.
_FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
"$@" & child=$!
trap 'kill -KILL $child' TERM
wait $child; wait $child
"""
_FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >>"$LOG"
kill -TERM "$(cat "$PIDFILE")"
"""
_FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >>"$LOG"
"""
_FAKE_PYTHON = """#!/bin/bash
echo "train $* NVLS=$NCCL_NVLS_ENABLE IDS=$JAX_LOCAL_DEVICE_IDS" >>"$LOG"
if [[ $IGNORE_TERM == 1 ]]; then trap 'echo "ignored TERM" >>"$LOG"' TERM
else trap 'echo "saved checkpoint" >>"$LOG"; exit 0' TERM; fi
echo $$ >"$PIDFILE"
while :; do sleep 0.05; done
"""


def _slurm_job(tmp_path, signum, **env):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  for name, text in (
      ("srun", _FAKE_SRUN),
      ("scancel", _FAKE_SCANCEL),
      ("scontrol", _FAKE_SCONTROL),
      ("python", _FAKE_PYTHON),
  ):
    (bindir / name).write_text(text)
    (bindir / name).chmod(0o755)
  log, pidfile = tmp_path / "log", tmp_path / "pid"
  proc = subprocess.Popen(
      ["bash", str(SLURM)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=_env(
          PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
          LOG=log,
          PIDFILE=pidfile,
          SLURM_JOB_ID=4242,
          SLURM_SUBMIT_DIR=REPO,
          SLURM_JOB_NUM_NODES=1,
          SLURM_GPUS_ON_NODE=2,
          PYTHON=bindir / "python",
          **SLURM_RUN,
          **env,
      ),
  )
  try:
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
      time.sleep(0.02)
    assert pidfile.exists(), "training never started"
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=15)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, out, log.read_text()


def test_slurm_time_limit_checkpoints_then_requeues(tmp_path):
  rc, out, log = _slurm_job(tmp_path, signal.SIGUSR1)
  assert rc == 0, out
  assert "NVLS=0 IDS=0,1" in log and "--distributed" in log
  assert log.splitlines()[1:] == [
      "scancel --signal=TERM 4242",
      "saved checkpoint",
      "scontrol requeue 4242",
  ]
  assert "requeueing job 4242" in out


def test_slurm_stuck_training_is_ended_and_requeued(tmp_path):
  rc, out, log = _slurm_job(tmp_path, signal.SIGUSR1, IGNORE_TERM=1, STOP_GRACE=1)
  assert "ignored TERM" in log and "still running 1s after SIGTERM" in out
  assert log.splitlines()[-1] == "scontrol requeue 4242"
  assert rc != 0  # the step was killed


def test_slurm_sigterm_checkpoints_without_requeue(tmp_path):
  rc, out, log = _slurm_job(tmp_path, signal.SIGTERM)
  assert rc == 0, out
  assert "saved checkpoint" in log and "scontrol" not in log
