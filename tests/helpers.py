"""Helpers of every test module (plain functions and constants; the fixtures are in conftest.py).

Compile time dominates on the test CPUs, so:
- parameter trees are built from `jax.eval_shape(model.init)` shapes and filled with NumPy
  random values (`random_params`, `fill_params`): no init compile (a jitted Flax `init` is as
  slow as a forward because of the random initialisers), and every parameter (thresholds, k
  filters, shortcut scales, TBS table) is random and non-zero, so no term of the forward can
  hide behind a zero initial value;
- the in-process model tests share a few model sizes (`TINY_UNET`, `MICRO_UNET`) whose jitted
  apply functions are session fixtures (`model_bundle`);
- every run of `train()` or the CLI uses one of a few configs (`tiny_config`, `TINY_FLAGS`)
  whose jitted programs are identical across tests, and the subprocesses share a session-wide
  persistent XLA compilation cache (`subprocess_env`): a program compiled by one test's
  subprocess is loaded, not recompiled, by the next;
- subprocesses compile at XLA backend optimisation level 0 (about half the compile time;
  the comparisons in these tests are always between runs under the same flags).

`tiny_config` is the digits demo's U-Net (ch 32, ch_mult (1, 2), one res block per level)
without attention on 8x8 images, batch 8. `micro=True` drops to one level: about half the
compile time, for the tests whose subject does not depend on the model's depth.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
from typing import Any, Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PYTHON = sys.executable

TINY_OVERRIDES: dict[str, Any] = {
    "model.attn_resolutions": (),
    "data.image_size": 8,
    "training.batch_size": 8,
    "sampling.batch_size": 8,
}
"""The digits `:smoke` config shrunk for the tests (`QAT_FLAGS` on the command line trains the
same step as `tiny_config('bidm')` in process)."""
MICRO_OVERRIDES: dict[str, Any] = {**TINY_OVERRIDES, "model.ch_mult": (1,), "sampling.steps": 3}

QAT_STEPS = 10
"""training.steps of the QAT runs that share one compiled program (the pipeline's qat_steps)."""
QAT_LR = 1e-3
"""learning rate of those runs (the digits pipeline's qat_learning_rate)."""


def _flag_value(v) -> str:
  if isinstance(v, tuple):
    return "(" + "".join(f"{x}," for x in v) + ")"
  return str(v)


def config_flags(overrides: Mapping[str, Any]) -> list[str]:
  """`--config.<path>=<value>` flags for the command line."""
  return [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]


TINY_FLAGS = config_flags(TINY_OVERRIDES)
MICRO_FLAGS = config_flags(MICRO_OVERRIDES)
_QAT_TRAINING = [
    f"--config.training.steps={QAT_STEPS}",
    f"--config.training.learning_rate={QAT_LR}",
]
QAT_FLAGS = [*TINY_FLAGS, *_QAT_TRAINING]
"""Command-line flags giving `tiny_config('bidm')` (teacher aside)."""
MICRO_QAT_FLAGS = [*MICRO_FLAGS, *_QAT_TRAINING]
"""Command-line flags giving `tiny_config('bidm', micro=True)` (teacher aside)."""


def apply_overrides(config, overrides: Mapping[str, Any]):
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_config(
    method: str = "bidm",
    *,
    micro: bool = False,
    teacher: str = "",
    steps: int = QAT_STEPS,
    learning_rate: float = QAT_LR,
    **training,
):
  """The digits smoke config with the tiny (or micro) model; `training` overrides fields."""
  from configs import digits  # pylint: disable=import-outside-toplevel

  config = digits.get_config("smoke")
  apply_overrides(config, MICRO_OVERRIDES if micro else TINY_OVERRIDES)
  config.binarization.method = method
  config.training.update(steps=steps, learning_rate=learning_rate, teacher=teacher, **training)
  return config


TINY_UNET = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
"""The tiny U-Net: 2 levels (16x16 and 8x8), attention at 8x8 (and in the middle block)."""
TINY_SHAPE = (2, 16, 16, 3)
"""Batch of the tiny U-Net's inputs (B, H, W, C)."""

MICRO_UNET = dict(ch=64, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
"""An even smaller U-Net (one level, 2 decoder blocks) for the tests that differentiate it.

ch = 64, not 32: with 32 channels GroupNorm(32) normalises every channel on its own, which
removes the per-channel time-embedding shift of the res blocks entirely, and the output would
not depend on t.
"""
MICRO_SHAPE = (2, 8, 8, 3)

TBS_CONNECTIONS = 2


def leaf_name(path) -> str:
  """The last key of a tree path ('kernel', 'threshold', ...)."""
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def fill_params(shapes, seed: int = 0):
  """Random float32 values for a tree of ShapeDtypeStructs, chosen by parameter name.

  kernels ~ N(0, 1/fan_in); biases, thresholds ~ 0.1 N(0, 1); GroupNorm scales 1 + 0.1 N;
  XNOR k filters 1/(kh kw) (1 + 0.2 N); shortcut scales U(0.2, 0.5); TBS table U(0.2, 0.6).
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name, shape = leaf_name(path), tuple(s.shape)
    if name in ("kernel", "shortcut_kernel"):
      v = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[:-1])))
    elif name == "scale":  # GroupNorm
      v = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name == "scale_kernel":
      v = (1.0 + 0.2 * rng.standard_normal(shape)) / (shape[0] * shape[1])
    elif name == "shortcut_scale":
      v = rng.uniform(0.2, 0.5, shape)
    elif name == "tbs_table":
      v = rng.uniform(0.2, 0.6, shape)
    else:  # bias, threshold, anything new
      v = 0.1 * rng.standard_normal(shape)
    return jnp.asarray(v, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def random_params(model, x_shape, seed: int = 0):
  """Random parameters (the 'params' tree) of a U-Net for inputs of `x_shape` (B, H, W, C),
  without compiling init."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  t = jax.ShapeDtypeStruct(x_shape[:1], jnp.int32)
  return fill_params(jax.eval_shape(model.init, jax.random.key(0), x, t)["params"], seed)


def tiny_inputs(shape=TINY_SHAPE, seed: int = 0):
  """Random x (B, H, W, C) float32 and t (B,) int32 in distinct TBS buckets."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  t = jnp.asarray(rng.choice(1000, size=shape[0], replace=False), jnp.int32)
  return x, t


@dataclasses.dataclass
class ModelBundle:
  """A model, random parameters and jitted apply functions for one config.

  apply(params, x, t) -> UNetOutput without cache; apply_cache(params, x, t, cache) with one.
  """

  model: Any
  params: Any
  x_shape: tuple
  apply: Callable
  apply_cache: Callable


def model_bundle(model, x_shape, seed: int) -> ModelBundle:
  """`model` with random {'params': ...} for inputs of `x_shape`, and its jitted applies."""
  params = {"params": random_params(model, x_shape, seed)}
  apply = jax.jit(lambda p, x, t: model.apply(p, x, t))
  apply_cache = jax.jit(lambda p, x, t, cache: model.apply(p, x, t, cache=cache))
  return ModelBundle(model, params, x_shape, apply, apply_cache)


def export_teacher(config, directory, seed: int = 0) -> str:
  """Exports random FP parameters of the config's model (a QAT teacher) to `directory`."""
  from bidm_jax import builders  # pylint: disable=import-outside-toplevel
  from bidm_jax.training import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel

  params = random_params(builders.make_model(config), builders.image_shape(config, 1), seed)
  ckpt_lib.export_params(directory, params, builders.model_description(config))
  return str(directory)


def check_teacher_fills_table4_student(student, x_shape, teacher) -> None:
  """Lays the FP `teacher` parameters (a converted checkpoint) over random ones of `student`, a
  U-Net of the paper's Table 4 layout (binary skip convs, no width shortcut), as train() does
  before QAT: the skip convs' kernel and bias must be the teacher's, and the leaves it leaves
  unfilled only the binary layers' own (thresholds, k filters, shortcut scales, TBS table)."""
  from bidm_jax.training import train as train_lib  # pylint: disable=import-outside-toplevel

  named = lambda tree: {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  assert student.method.width_shortcut == "none" and student.method.binary_skip_conv
  params = named(train_lib.overlay_params(random_params(student, x_shape, seed=1), teacher))
  fp = named(teacher)
  skips = {k.rsplit("/", 1)[0] for k in params if "/nin_shortcut/" in k}
  assert skips
  for skip in skips:
    assert {k.rsplit("/", 1)[1] for k in params if k.startswith(skip + "/")} == {
        "kernel",
        "bias",
        "threshold",
        "scale_kernel",
    }
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(params[f"{skip}/{leaf}"], fp[f"{skip}/{leaf}"])
  unfilled = {k.rsplit("/", 1)[-1] for k in set(params) - set(fp)}
  assert unfilled == {"threshold", "scale_kernel", "shortcut_scale", "tbs_table"}, unfilled


def digits_batch(config, seed: int = 0) -> np.ndarray:
  """The first training batch (B, H, W, C) of the config's digits pipeline."""
  from bidm_jax import data as data_lib  # pylint: disable=import-outside-toplevel

  it = data_lib.make_train_iterator(
      config.data, global_batch_size=config.training.batch_size, seed=seed
  )
  return np.asarray(next(it)["image"], np.float32)


class ScriptedIterator(grain.DatasetIterator):
  """A grain iterator wrapper (train() still checkpoints its position: state is delegated)
  that counts batches since construction and
  - replaces the images of batch index `nan_at` (0-based) by NaN;
  - sends SIGTERM to this process while producing batch number `sigterm_after` (1-based), so
    train() stops (preempted) after that many steps of this run.
  """

  def __init__(
      self,
      parent: grain.DatasetIterator,
      *,
      nan_at: int | None = None,
      sigterm_after: int | None = None,
  ):
    super().__init__(parent)
    self._inner = parent
    self.nan_at, self.sigterm_after, self.count = nan_at, sigterm_after, 0

  def __next__(self):
    batch = dict(next(self._inner))
    if self.count == self.nan_at:
      batch["image"] = np.full_like(batch["image"], np.nan)
    self.count += 1
    if self.count == self.sigterm_after:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)


def scripted_data(config, **kwargs) -> ScriptedIterator:
  """The config's training iterator (as train() would build it), wrapped in ScriptedIterator."""
  from bidm_jax import data as data_lib  # pylint: disable=import-outside-toplevel

  return ScriptedIterator(
      data_lib.make_train_iterator(
          config.data, global_batch_size=config.training.batch_size, seed=config.seed
      ),
      **kwargs,
  )


def cache_dir(tmp_path_factory) -> pathlib.Path:
  """A compilation-cache folder shared by the xdist workers of this session (only)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  path = base / "bidm_test_xla_cache"
  path.mkdir(exist_ok=True)
  return path


def shared_result(tmp_path_factory, name: str, compute):
  """compute() once per session (across xdist workers); its picklable result is shared."""
  root = cache_dir(tmp_path_factory).parent
  path, lock = root / f"{name}.pkl", root / f"{name}.lock"
  with open(lock, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      if path.exists():
        return pickle.loads(path.read_bytes())
      result = compute()
      path.write_bytes(pickle.dumps(result))
      return result
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def subprocess_env(cache: pathlib.Path | None, *, devices: int | None = None) -> dict:
  """Environment of a test subprocess: the repo and tests/ importable, CPU, the shared
  compilation cache, optimisation level 0 and optionally `devices` host devices."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
  env["JAX_PLATFORMS"] = "cpu"
  xla = ["--xla_backend_optimization_level=0"]
  if devices:
    xla.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(xla)
  if cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env.pop("PYTEST_XDIST_WORKER", None)
  return env


def cli_args(workdir, mode: str, *flags: str, config: str = "configs/digits.py:smoke") -> list:
  return [
      PYTHON,
      "-m",
      "bidm_jax.main",
      f"--config={config}",
      f"--workdir={workdir}",
      f"--mode={mode}",
      *flags,
  ]


def run(args, env, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_python(script: str, *args, env, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `script` with `python -c` in the repo; fails the test with its output on error."""
  proc = run([PYTHON, "-c", script, *map(str, args)], env, timeout)
  assert proc.returncode == 0, f"script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
  return proc


def last_json(stdout: str) -> dict:
  """The JSON object the CLI prints last (its result)."""
  start = stdout.rindex("\n{") + 1 if "\n{" in stdout else stdout.index("{")
  return json.loads(stdout[start:])


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "logs" / "metrics.jsonl"
  if not path.exists():
    return []
  text = path.read_text()
  if not text.endswith("\n"):  # a line being written right now
    text = text[: text.rfind("\n") + 1]
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def checkpoint_steps(workdir) -> list[int]:
  """Steps of the complete checkpoints (orbax renames a finished step folder to its number)."""
  path = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def read_state(workdir, step: int) -> dict:
  """The TrainState tree saved at `step` of a training workdir, as NumPy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel

  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(
      epath.Path(workdir) / "checkpoints", options=options, item_names=("state", "meta")
  ) as mngr:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return jax.tree_util.tree_map(np.asarray, dict(out["state"]))


def flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def assert_trees_equal(a, b, what: str = "") -> None:
  """Same leaves, bit for bit (NaN never equal)."""
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys(), f"{what}: different trees"
  bad = [k for k in fa if fa[k].shape != fb[k].shape or not np.array_equal(fa[k], fb[k])]
  assert not bad, f"{what}: {len(bad)} leaves differ, e.g. {bad[:3]}"


def snapshot(directory) -> dict[str, tuple]:
  """(size, mtime_ns, sha256) of every file under `directory`, by relative path, and every
  folder (so a created empty folder shows too)."""
  root = pathlib.Path(directory)
  out = {}
  for p in sorted(root.rglob("*")):
    rel = str(p.relative_to(root))
    if p.is_dir():
      out[rel] = ("dir",)
    else:
      out[rel] = (
          p.stat().st_size,
          p.stat().st_mtime_ns,
          hashlib.sha256(p.read_bytes()).hexdigest(),
      )
  return out
