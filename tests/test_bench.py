"""benchmarks/bench.py runs its packed-sampling group on the tiny preset and prints its figures;
benchmarks/open_figures.sh keeps its deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_config_file_names_the_benchmarked_model(monkeypatch, capsys):
  """--config benchmarks a config file's model (the LDM configs for Table 9); every figure says
  which; a missing file is one usage error."""
  config = "configs/lsun_bedrooms_ldm4.py:tiny"
  argv = ["bench.py", "--preset=tiny", f"--config={config}", "--only", "floor", "--iters", "1"]
  monkeypatch.setattr(sys, "argv", argv)
  bench.main()
  (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert row["figure"] == "matmul_rate" and row["config"] == config and row["value"] > 0
  monkeypatch.setattr(sys, "argv", ["bench.py", "--config=configs/missing.py"])
  with pytest.raises(SystemExit):
    bench.main()
  assert "--config=configs/missing.py: [Errno 2] No such file" in capsys.readouterr().err


def test_profile_traces_each_timed_step(monkeypatch, capsys, tmp_path):
  """--profile DIR: after its timing, each train step is traced into DIR/<figure>, which
  benchmarks/profile_summary.py reads; the figure counts the compiled step's work."""
  import profile_summary  # pylint: disable=import-outside-toplevel

  argv = ["bench.py", "--preset=tiny", "--config=configs/digits.py:smoke", "--train-batch=8"]
  argv += ["--only", "fp", "--iters", "1", "--warmup", "0", f"--profile={tmp_path}"]
  monkeypatch.setattr(sys, "argv", argv)
  bench.main()
  (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert row["figure"] == "fp_train_step" and row["batch"] == 8
  program = row["program"]  # the compiled step's work, counted from its optimized HLO
  assert program["launches"] >= sum(program["by_kind"].values()) > 0 and program["reductions"] > 0
  assert program["by_kind"].get("fusion", 0) > 0 and "parameter" not in program["by_kind"]
  assert profile_summary.main([str(tmp_path / "fp_train_step"), "--steps", "5"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["steps"] == 5 and "/host:CPU" in summary["processes"]


def test_compilation_cache_is_filled_and_named(tmp_path):
  """--compilation-cache DIR turns JAX's persistent cache on for the run (a subprocess: the
  cache is process-wide); every figure names the folder and the XLA_FLAGS in effect, and the
  step's executable lands in the folder."""
  cache = tmp_path / "xla"
  argv = [sys.executable, str(Path(bench.__file__)), "--preset=tiny", "--train-batch=8"]
  argv += ["--config=configs/digits.py:smoke", "--only", "fp", "--iters", "1", "--warmup", "0"]
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  out = subprocess.run(
      argv + [f"--compilation-cache={cache}"],
      env=env,
      cwd=Path(__file__).parents[1],
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  (row,) = [json.loads(line) for line in out.splitlines()]
  assert row["figure"] == "fp_train_step" and row["compilation_cache"] == str(cache)
  assert row["xla_flags"].startswith("--xla_cpu_enable_fast_math=false")
  assert cache.is_dir()
  if row["compile_s"] > 1.5:  # JAX stores executables that took over a second to compile
    assert any(cache.iterdir())


def test_profile_summary_counts_kinds_and_kernels_outside_command_buffers():
  """On a device, kernels XLA attributes to a command buffer ran inside a CUDA graph; the rest
  (here a cuDNN convolution) were launched one by one. A process without op names (the host)
  has no such count."""
  import profile_summary  # pylint: disable=import-outside-toplevel

  def event(pid, name, ts, dur, hlo_op=None):
    return dict(
        ph="X", pid=pid, tid=1, name=name, ts=ts, dur=dur, args={"hlo_op": hlo_op} if hlo_op else {}
    )

  events = [
      dict(name="process_name", pid=1, args={"name": "/device:GPU:0"}),
      dict(name="process_name", pid=2, args={"name": "/host:CPU"}),
      event(1, "loop_add_fusion", 0, 2, "command_buffer_7"),
      event(1, "input_reduce_fusion", 2, 4, "command_buffer_7"),
      event(1, "sm90_xmma_fprop_implicit_gemm", 10, 30, "custom-call.3"),
      event(1, "input_reduce_fusion", 50, 4, "command_buffer_8"),
      event(2, "GpuExecutable::ExecuteThunks", 0, 60),
  ]
  summary = profile_summary.summarize(events, steps=2, top=5)["processes"]
  gpu, host = summary["/device:GPU:0"], summary["/host:CPU"]
  assert gpu["count_by_kind_per_step"] == {
      "convolution": 0.5,
      "reduction": 1.0,
      "fusion/other": 0.5,
  }
  assert gpu["time_by_kind_ms"]["convolution"] == 0.03
  assert gpu["events_outside_command_buffers_per_step"] == 0.5
  assert host["events_outside_command_buffers_per_step"] is None


def test_peak_memory_is_unknown_when_the_analysis_reads_zero(monkeypatch):
  """An executable loaded from the persistent compilation cache reports a peak of 0 bytes on
  the GPU (seen on an H200): that is no figure, so none is printed."""
  import types  # pylint: disable=import-outside-toplevel

  def compiled(peak):
    analysis = types.SimpleNamespace(peak_memory_in_bytes=peak)
    return types.SimpleNamespace(memory_analysis=lambda: analysis)

  monkeypatch.setattr(bench.jax, "default_backend", lambda: "gpu")
  assert bench.compiled_peak_gib(compiled(0)) is None
  assert bench.compiled_peak_gib(compiled(3 * 2**30)) == 3.0
  monkeypatch.setattr(bench.jax, "default_backend", lambda: "cpu")
  assert bench.compiled_peak_gib(compiled(3 * 2**30)) is None


def test_second_start_export_path_matches_jit(tmp_path):
  """benchmarks/second_start.py's two paths on a small step with optax state (pytree types an
  export cannot serialize itself): the export is written once, read back by the second start,
  and computes what the jitted step does."""
  import jax
  import jax.numpy as jnp
  import optax

  import second_start

  tx = optax.adam(1e-2)

  def step_fn(state, images, key, teacher_params):
    params, opt_state = state
    noise = jax.random.normal(key, images.shape)

    def loss_fn(p):
      return jnp.mean((images * p["w"] + p["b"] - noise - teacher_params) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

  def inputs():
    params = {"w": jnp.ones((3,)), "b": jnp.zeros((3,))}
    images = jnp.linspace(-1, 1, 24).reshape(2, 4, 3)
    return ((params, tx.init(params)), images, jax.random.PRNGKey(1), jnp.float32(0.5))

  expected = second_start.run_jit(step_fn, inputs())
  cold = second_start.run_export(step_fn, inputs(), str(tmp_path))
  second = second_start.run_export(step_fn, inputs(), str(tmp_path))
  assert (tmp_path / second_start.EXPORT_FILE).exists()
  assert {"export_s", "serialize_s"} <= set(cold) and "load_s" not in cold
  assert "load_s" in second and "export_s" not in second
  assert cold["loss"] == second["loss"] == expected["loss"]
  assert expected["loss"] > 0 and set(expected) == {"trace_s", "lower_s", "compile_s", "loss"}


def test_open_figures_keeps_its_deadline(tmp_path):
  """benchmarks/open_figures.sh starts no command within 10 s of its deadline and says so."""
  script = Path(__file__).parents[1] / "benchmarks" / "open_figures.sh"
  r = subprocess.run(
      ["bash", str(script), str(tmp_path), "5"], capture_output=True, text=True, timeout=60
  )
  assert r.returncode == 0, r.stderr
  log = (tmp_path / "open_figures.log").read_text().splitlines()
  assert log[0] == "study-steps: not started (deadline)"
  assert len(log) == 11 and all(line.endswith("not started (deadline)") for line in log[:-1])
  assert log[-1].startswith("done after ")


def test_replicas_step_trains_each_run_as_alone():
  """--replicas: the vmapped step of two runs gives each run the loss and update of its own
  step (same images and key), to float rounding."""
  import jax
  import numpy as np

  import helpers as H

  config = H.tiny_config("xnor", micro=True, warmup_steps=0)  # the first step moves
  *_, step2, (state2, images2, keys2, teacher2) = bench.train_step_setup(config, "xnor", 2, 2)
  new2, metrics2 = jax.jit(step2)(state2, images2, keys2, teacher2)
  *_, step1, (state1, _, _, teacher1) = bench.train_step_setup(config, "xnor", 2)
  new1, metrics1 = jax.jit(step1)(state1, images2[1], keys2[1], teacher1)
  np.testing.assert_allclose(metrics2["loss"][1], metrics1["loss"], rtol=1e-5)
  assert abs(float(metrics2["loss"][0] - metrics2["loss"][1])) > 1e-4  # two different runs
  # Adam's first update is lr * g / (|g| + eps): coordinates whose gradient is near eps or
  # changes sign by rounding differ by up to 2 lr, so the updates are compared as wholes
  # (global L2 norms): replica 1 against its own step, and replica 0 (another run) against it
  norm = lambda tree: np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(tree)))
  dist = lambda i, ref: norm(jax.tree_util.tree_map(lambda a, b: a[i] - b, new2.params, ref))
  moved, own, other = dist(1, state1.params), dist(1, new1.params), dist(0, new1.params)
  assert own < 0.05 * moved and other > 0.25 * moved, (own, other, moved)
