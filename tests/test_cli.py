"""The command line (`python -m bidm_jax.main`): config overrides, clean one-line failures for
bad flags, a missing teacher, a workdir of another model, an export or a training run where the
other is expected, and OS errors; strict JSON output; the end-to-end demo."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers as H
from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax.binarize.methods import FP
from bidm_jax.training import checkpoint as ckpt_lib
from bidm_jax.training import train as train_lib


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return H.subprocess_env(H.cache_dir(tmp_path_factory))


def _error_lines(stderr: str, prefix: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith(prefix)]


def _param_count(config) -> int:
  shapes = jax.eval_shape(
      builders.make_model(config, FP).init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct(builders.image_shape(config, 1), np.float32),
      jax.ShapeDtypeStruct((1,), np.int32),
  )["params"]
  return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))


def test_override_changes_config(tmp_path, env):
  """--config.model.ch=64 reaches the model: the report counts the parameters of a ch=64
  U-Net, not of the config file's ch=32 one."""
  proc = H.run(H.cli_args(tmp_path, "report", *H.TINY_FLAGS, "--config.model.ch=64"), env)
  assert proc.returncode == 0, proc.stderr
  result = json.loads((tmp_path / "efficiency.json").read_text())
  assert H.last_json(proc.stdout) == result
  config = H.tiny_config("fp")
  default = _param_count(config)
  config.model.ch = 64
  assert result["fp"]["params"] == _param_count(config) != default


def test_unknown_field_fails_naming_it(tmp_path, env):
  proc = H.run(H.cli_args(tmp_path, "report", "--config.training.stpes=5"), env)
  assert proc.returncode != 0
  assert "stpes" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
  assert not (tmp_path / "efficiency.json").exists()


@pytest.mark.parametrize(
    "flag,field",
    [
        ("--config.training.steps=ten", "training.steps"),
        ("--config.training.learning_rate=fast", "training.learning_rate"),
    ],
)
def test_wrong_type_fails(tmp_path, env, flag, field):
  proc = H.run(H.cli_args(tmp_path, "report", flag), env)
  assert proc.returncode != 0
  assert field in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
  assert not (tmp_path / "efficiency.json").exists()


@pytest.mark.parametrize("teacher", ["", "missing_teacher"])
def test_qat_without_teacher_fails(tmp_path, env, teacher):
  """QAT with no teacher path, or one where nothing is: exit 1 and one error line that names
  config.training.teacher (no traceback, no training)."""
  path = str(tmp_path / teacher) if teacher else ""
  proc = H.run(
      H.cli_args(tmp_path / "run", "train", *H.TINY_FLAGS, f"--config.training.teacher={path}"), env
  )
  assert proc.returncode == 1
  errors = _error_lines(proc.stderr, "bidm_jax: error:")
  assert len(errors) == 1 and "config.training.teacher" in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert H.checkpoint_steps(tmp_path / "run") == [] and H.read_metrics(tmp_path / "run") == []


def _fake_fp_run(workdir, config) -> None:
  """A workdir whose checkpoint (step 4) holds an FP run of `config`'s model, written with the
  manager, items and meta that train() uses, plus a metrics log."""
  model = builders.make_model(config, FP)
  tx = builders.make_optimizer(config)
  state = train_lib.create_state(H.random_params(model, builders.image_shape(config, 1)), tx)
  mngr = ckpt_lib.make_manager(workdir, keep=3)
  mngr.save(
      4,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave(train_lib.run_meta(config, FP, model)),
      ),
      force=True,
  )
  mngr.wait_until_finished()
  mngr.close()
  (workdir / "logs").mkdir()
  (workdir / "logs" / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--config.binarization.method=fp", "--config.model.ch=64"],
            "holds a different model (ch: checkpoint 32 vs config 64",
        ),
        (
            ["--config.binarization.method=bidm", "--config.training.teacher=unused"],
            "holds a run of method 'fp'",
        ),
    ],
)
def test_workdir_of_another_model_fails_and_is_untouched(tmp_path, env, flags, message):
  """Training in a workdir whose checkpoint holds another architecture or method: exit 1 with
  one error line saying so, and every file and folder of the workdir unchanged."""
  workdir = tmp_path / "run"
  _fake_fp_run(workdir, H.tiny_config("fp"))
  before = H.snapshot(workdir)
  assert H.checkpoint_steps(workdir) == [4]
  proc = H.run(H.cli_args(workdir, "train", *H.TINY_FLAGS, *flags), env)
  assert proc.returncode == 1
  errors = _error_lines(proc.stderr, "bidm_jax: error:")
  assert len(errors) == 1 and message in errors[0] and str(workdir) in errors[0], proc.stderr
  assert H.snapshot(workdir) == before


def _one_error_line(proc) -> str:
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("bidm_jax: error: "), proc.stderr[-3000:]
  return lines[0]


def test_convert_refuses_a_training_workdir(tmp_path, env):
  """--mode=convert into a workdir that holds training checkpoints: exit 1, one line saying
  what the folder holds, and the workdir unchanged (sample/evaluate/teacher loading would
  otherwise read the export instead of the checkpoints)."""
  workdir = tmp_path / "run"
  _fake_fp_run(workdir, H.tiny_config("fp"))
  before = H.snapshot(workdir)
  proc = H.run(
      H.cli_args(
          workdir, "convert", *H.TINY_FLAGS, f"--config.convert.source={tmp_path / 'model.ckpt'}"
      ),
      env,
  )
  assert proc.returncode == 1
  line = _one_error_line(proc)
  assert str(workdir) in line and "holds a training workdir" in line, line
  assert H.snapshot(workdir) == before


def test_training_refuses_an_export(tmp_path, env):
  """Training with --workdir pointing at an exported parameter set: exit 1, one line saying so,
  nothing written."""
  export = tmp_path / "export"
  H.export_teacher(H.tiny_config("fp"), export)
  before = H.snapshot(export)
  proc = H.run(H.cli_args(export, "train", *H.TINY_FLAGS, "--config.binarization.method=fp"), env)
  assert proc.returncode == 1
  line = _one_error_line(proc)
  assert f"workdir {export} holds an exported parameter set" in line, line
  assert H.snapshot(export) == before


def _unwritable_folder(tmp_path) -> str:
  """A folder this process cannot create files in (root ignores file modes: /sys/kernel)."""
  if os.geteuid() == 0:
    if not os.path.isdir("/sys/kernel"):
      pytest.skip("no folder that root cannot write to")
    return "/sys/kernel"
  folder = tmp_path / "read_only"
  folder.mkdir()
  folder.chmod(0o500)
  return str(folder)


@pytest.mark.parametrize(
    "case", ["missing_config", "workdir_is_a_file", "workdir_in_a_file", "unwritable_workdir"]
)
def test_os_errors_are_one_line(tmp_path, env, case):
  """A missing config file, a workdir that is a file or lies inside one, and a workdir that
  cannot be written to: exit 1, one error line naming the path, no traceback, nothing written."""
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  config, workdir = "configs/digits.py:smoke", str(tmp_path / "run")
  if case == "missing_config":
    config = "configs/missing.py"
  elif case == "workdir_is_a_file":
    workdir = str(a_file)
  elif case == "workdir_in_a_file":
    workdir = str(a_file / "run")
  else:
    workdir = _unwritable_folder(tmp_path)
  before = H.snapshot(tmp_path)
  proc = H.run(
      H.cli_args(workdir, "train", *H.TINY_FLAGS, "--config.binarization.method=fp", config=config),
      env,
  )
  assert proc.returncode == 1
  line = _one_error_line(proc)
  assert (config.split(":")[0] if case == "missing_config" else workdir) in line, line
  assert H.snapshot(tmp_path) == before


STRICT_JSON = r"""
import sys
import numpy as np
from absl import app
from bidm_jax import main
main.run = lambda config, workdir, mode: {"images_per_s": float("nan"), "fid": np.float32("inf"),
                                          "steps": [1.5, float("-inf")], "ok": np.int64(3)}
sys.argv = ["bidm_jax.main", "--config=configs/digits.py:smoke", "--workdir=" + sys.argv[1],
            "--mode=sample"]
app.run(main.main, flags_parser=main.parse_flags)
"""


def test_printed_result_is_strict_json(tmp_path, env):
  """The result the command line prints is strict JSON: NaN and infinities become null (a
  single sampling batch has no measured images/s)."""
  proc = H.run([H.PYTHON, "-c", STRICT_JSON, str(tmp_path)], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout[proc.stdout.index("{") :]
  result = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))
  assert result == {"images_per_s": None, "fid": None, "steps": [1.5, None], "ok": 3}


def test_loader_says_what_it_found(tmp_path):
  """load_params takes an export or a training workdir, says which it read, and refuses a
  folder holding both, or neither, naming what it found there."""
  config = H.tiny_config("fp")
  model = builders.model_description(config)
  export = tmp_path / "export"
  H.export_teacher(config, export)
  assert ckpt_lib.load_params(export, model)[1]["kind"] == "export"
  (export / ckpt_lib.CHECKPOINTS).mkdir()
  with pytest.raises(ckpt_lib.CheckpointError, match=r"found both an exported parameter set"):
    ckpt_lib.load_params(export, model)
  (tmp_path / "empty").mkdir()
  with pytest.raises(
      ckpt_lib.CheckpointError,
      match=r"expected an exported parameter set "
      r"\(model.json, params/\) or a training workdir .* found an empty folder",
  ):
    ckpt_lib.load_params(tmp_path / "empty", model)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"found a folder holding notes.txt"):
    ckpt_lib.load_params(tmp_path / "other", model)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"found nothing \(no such path\)"):
    ckpt_lib.load_params(tmp_path / "missing", model)


def test_load_config_file_reads_variants_like_the_flag():
  path = H.REPO / "configs"
  fp = config_lib.load_config_file(f"{path}/cifar10.py:fp")
  assert fp.binarization.method == "fp" and fp.training.steps == 800_000
  assert config_lib.load_config_file(f"{path}/cifar10.py").binarization.method == "bidm"
  with pytest.raises(ValueError, match="unknown cifar10 variant 'nope'"):
    config_lib.load_config_file(f"{path}/cifar10.py:nope")
  with pytest.raises(FileNotFoundError):
    config_lib.load_config_file(f"{path}/missing.py")
