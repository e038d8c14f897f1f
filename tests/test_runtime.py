"""The persistent compilation cache that the command line turns on (bidm_jax/runtime.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import pytest

import helpers as H
from bidm_jax import runtime

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert runtime.default_cache_dir() == str(tmp_path / "bidm_jax" / "xla")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert runtime.default_cache_dir().endswith(os.path.join(".cache", "bidm_jax", "xla"))


@pytest.mark.parametrize("setting", ["off", "", "None"])
def test_off_settings_leave_the_cache_off(setting):
  assert runtime.enable_compilation_cache(setting) is None


def test_unwritable_cache_dir_is_a_warning_not_an_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  assert runtime.enable_compilation_cache(str(blocker / "xla")) is None


def test_host_description_names_what_the_bits_depend_on(monkeypatch):
  jax.devices()  # the backend reads XLA_FLAGS once, at its start (it aborts on unknown flags)
  monkeypatch.setenv("XLA_FLAGS", "--xla_example=1")
  host = runtime.host_description()
  assert host["device"] == "cpu" and host["cpus"] >= 1 and host["xla_flags"] == "--xla_example=1"
  assert host["jax"] == jax.__version__ and host["jaxlib"].count(".") >= 2
  assert isinstance(host["cpu_model"], str)


def _train(workdir, cache, steps=2):
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "bidm_jax.main",
          "--config=configs/digits.py:smoke",
          f"--workdir={workdir}",
          "--config.binarization.method=fp",
          f"--config.training.steps={steps}",
          f"--config.compilation_cache={cache}",
          *H.MICRO_FLAGS,
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )


@pytest.mark.slow
def test_command_line_stores_and_reuses_the_train_step(tmp_path):
  cache = tmp_path / "xla"
  first = _train(tmp_path / "a", cache)
  assert first.returncode == 0, first.stderr[-2000:]
  stored = sorted(p.name for p in cache.iterdir())
  assert any(name.startswith("jit_train_step") for name in stored), stored
  second = _train(tmp_path / "b", cache)  # same shapes: the step is loaded, nothing new stored
  assert second.returncode == 0, second.stderr[-2000:]
  assert [p for p in sorted(p.name for p in cache.iterdir()) if p.startswith("jit_train_step")] == [
      p for p in stored if p.startswith("jit_train_step")
  ]
