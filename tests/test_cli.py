"""The command line (`python -m bidm_jax.main`): config overrides, clean one-line failures for
bad flags, a missing teacher and a workdir of another model, and the end-to-end demo."""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import helpers as H
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
  shapes = jax.eval_shape(train_lib.make_model(config, FP).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct(train_lib.image_shape(config, 1), np.float32),
                          jax.ShapeDtypeStruct((1,), np.int32))["params"]
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


@pytest.mark.parametrize("flag,field", [("--config.training.steps=ten", "training.steps"),
                                        ("--config.training.learning_rate=fast",
                                         "training.learning_rate")])
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
  proc = H.run(H.cli_args(tmp_path / "run", "train", *H.TINY_FLAGS,
                          f"--config.training.teacher={path}"), env)
  assert proc.returncode == 1
  errors = _error_lines(proc.stderr, "bidm_jax: error:")
  assert len(errors) == 1 and "config.training.teacher" in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert H.checkpoint_steps(tmp_path / "run") == [] and H.read_metrics(tmp_path / "run") == []


def _fake_fp_run(workdir, config) -> None:
  """A workdir whose checkpoint (step 4) holds an FP run of `config`'s model, written with the
  manager, items and meta that train() uses, plus a metrics log."""
  model = train_lib.make_model(config, FP)
  tx = train_lib.make_optimizer(config)
  state = train_lib.create_state(H.random_params(model, config), tx)
  mngr = ckpt_lib.make_manager(workdir, keep=3)
  mngr.save(4, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave(train_lib.run_meta(config, FP, model))), force=True)
  mngr.wait_until_finished()
  mngr.close()
  (workdir / "logs").mkdir()
  (workdir / "logs" / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')


@pytest.mark.parametrize("flags,message", [
    (["--config.binarization.method=fp", "--config.model.ch=64"],
     "holds a different model (ch: checkpoint 32 vs config 64"),
    (["--config.binarization.method=bidm", "--config.training.teacher=unused"],
     "holds a run of method 'fp'"),
])
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


@pytest.mark.slow
def test_demo_pipeline(tmp_path, env):
  """`--mode=pipeline` on the digits smoke config (tiny model): FP training, BiDM QAT from it,
  sampling, report.json with the per-model entries and samples.png."""
  proc = H.run(H.cli_args(tmp_path, "pipeline", *H.TINY_FLAGS), env, timeout=500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert H.last_json(proc.stdout)["fp"] == report["fp"]
  for name, method in (("fp", "fp"), ("bidm", "bidm")):
    entry = report[name]
    assert entry["method"] == method and entry["training_steps"] == 10
    for key in ("final_loss", "digits_fd", "sampling_images_per_s", "param_bytes"):
      assert np.isfinite(entry[key]) and entry[key] > 0, (name, key, entry[key])
  assert report["bidm"]["param_bytes"] < report["fp"]["param_bytes"] / 5
  assert report["size_ratio"] > 5
  with Image.open(tmp_path / "samples.png") as img:
    img.verify()
  with Image.open(tmp_path / "samples.png") as img:
    assert img.format == "PNG" and img.width > 8 * 8 and img.height > 2 * 8
  for stage in ("fp", "bidm"):
    assert H.checkpoint_steps(tmp_path / stage)[-1] == 10


def test_load_config_file_reads_variants_like_the_flag():
  path = H.REPO / "configs"
  fp = config_lib.load_config_file(f"{path}/cifar10.py:fp")
  assert fp.binarization.method == "fp" and fp.training.steps == 800_000
  assert config_lib.load_config_file(f"{path}/cifar10.py").binarization.method == "bidm"
  with pytest.raises(ValueError, match="unknown cifar10 variant 'nope'"):
    config_lib.load_config_file(f"{path}/cifar10.py:nope")
  with pytest.raises(FileNotFoundError):
    config_lib.load_config_file(f"{path}/missing.py")
