"""The QAT train step (BiDM: TBS + SPD from a frozen FP teacher), EMA, gradient clipping, the
non-finite guard, and a checkpoint save/restore round trip through train().

The step-level tests share one jitted step of the micro U-Net, compiled once per session: the
`qat_results` fixture runs every computation they check and stores the results as NumPy arrays
(an xdist worker that needs them while the other computes them waits and loads them).
"""

from __future__ import annotations

import gzip
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers as H
from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax.bidm import spd, tbs
from bidm_jax.binarize.methods import ACTIVATION_MEAN_ABS, FP
from bidm_jax.diffusion.schedules import q_sample
from bidm_jax.training import train as train_lib

QAT_UPDATES = 20


def _numpy(tree):
  return jax.tree_util.tree_map(lambda a: np.array(a, copy=True), jax.device_get(tree))


def _compute_qat_results():
  config = H.tiny_config("bidm", micro=True, warmup_steps=0)
  method = config_lib.method_from_config(config)
  model = builders.make_model(config, method)
  teacher = builders.make_model(config, FP)
  shape = builders.image_shape(config, 1)
  teacher_params = H.random_params(teacher, shape, seed=0)
  params0 = train_lib.overlay_params(H.random_params(model, shape, seed=1), teacher_params)
  tx = builders.make_optimizer(config)
  state0 = train_lib.create_state(params0, tx)
  # a distinct EMA start, so that the EMA check sees which tree each term comes from
  state0 = state0.replace(ema_params=H.random_params(model, shape, seed=2))
  step = jax.jit(
      train_lib.make_train_step(config, model, builders.make_schedule(config), tx, teacher)
  )
  images = jnp.asarray(H.digits_batch(config))
  rng = jax.random.PRNGKey(0)
  teacher_before = _numpy(teacher_params)

  # 20 updates on the fixed batch with a fixed key: step is reset to 0 before each call, so
  # every call draws the same timesteps and noise (the step folds state.step into the key).
  state, losses, metrics = state0, [], None
  for _ in range(QAT_UPDATES + 1):
    state, metrics = step(state.replace(step=jnp.zeros((), jnp.int32)), images, rng, teacher_params)
    losses.append(float(metrics["loss"]))
  state1, metrics1 = step(state0, images, rng, teacher_params)
  doubled = jax.tree_util.tree_map(lambda p: 2 * p, teacher_params)
  _, metrics_doubled = step(state0, images, rng, doubled)
  nan_state, nan_metrics = step(state0, jnp.full_like(images, jnp.nan), rng, teacher_params)
  return dict(
      decay=config.training.ema_decay,
      num_connections=model.num_connections,
      distillation=method.distillation,
      losses=losses,
      metric_keys=sorted(metrics),
      state0=_numpy(state0),
      state1=_numpy(state1),
      metrics1=_numpy(metrics1),
      final_params=_numpy(state.params),
      teacher_before=teacher_before,
      teacher_after=_numpy(teacher_params),
      distill_doubled=float(metrics_doubled["loss_distill"]),
      nan_state=_numpy(nan_state),
      nan_metrics=_numpy(nan_metrics),
  )


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
  return H.shared_result(tmp_path_factory, "qat_step_results", _compute_qat_results)


def test_qat_step_decreases_loss(qat):
  """BiDM QAT (TBS paired forward + SPD against the FP teacher): 20 Adam updates on one batch
  with fixed timesteps/noise lower the loss clearly."""
  assert qat["num_connections"] == 2 and qat["distillation"] == "spd"
  assert {"loss", "loss_dm", "loss_distill", "grad_norm", "finite"} <= set(qat["metric_keys"])
  losses = np.array(qat["losses"])
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses
  assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses


def test_ema_is_exact(qat):
  """After one step, ema = d * ema0 + (1 - d) * params1 exactly: every element is the float32
  value of that expression (evaluated plainly or with a fused multiply-add), ema0 != params0."""
  d = qat["decay"]
  s0, s1 = qat["state0"], qat["state1"]
  assert int(s1.step) == 1 and bool(qat["metrics1"]["finite"])
  ema0, p0, p1, ema1 = (H.flat(t) for t in (s0.ema_params, s0.params, s1.params, s1.ema_params))
  assert any(not np.array_equal(p0[k], p1[k]) for k in p0), "the step did not update params"
  d32, c32 = np.float32(d), np.float32(1 - d)
  for k in ema1:
    plain = d32 * ema0[k] + c32 * p1[k]
    # XLA may contract to fma(d, ema0, (1 - d) * p1): the float32 product d * ema0 is exact
    # in float64, so this is that fused result (one rounding of the sum)
    fused = (np.float64(d32) * ema0[k] + np.float64(c32 * p1[k])).astype(np.float32)
    exact = (ema1[k] == plain) | (ema1[k] == fused)
    assert exact.all(), (k, ema1[k][~exact][:5], plain[~exact][:5])
  assert any(not np.array_equal(ema1[k], p1[k]) for k in p1), "EMA equals the parameters"


def test_teacher_is_frozen(qat):
  """The teacher's parameters are an argument of the step, not part of the state: bit-identical
  after 22 steps, while the student's overlaid copies of them trained; and the teacher is used
  (doubling its parameters changes the distillation loss)."""
  assert set(train_lib.TrainState.__dataclass_fields__) == {
      "step",
      "params",
      "ema_params",
      "opt_state",
  }
  H.assert_trees_equal(qat["teacher_before"], qat["teacher_after"], "teacher")
  teacher, student = H.flat(qat["teacher_before"]), H.flat(qat["final_params"])
  shared = [k for k in teacher if k in student and teacher[k].shape == student[k].shape]
  assert shared and any(not np.array_equal(teacher[k], student[k]) for k in shared)
  assert qat["distill_doubled"] != float(qat["metrics1"]["loss_distill"])


def test_non_finite_step_changes_nothing(qat):
  """A NaN batch: metrics['finite'] is False and params, EMA and optimizer state keep their
  previous values bit for bit (only the step counter moves)."""
  s0, s = qat["state0"], qat["nan_state"]
  assert not bool(qat["nan_metrics"]["finite"]) and not np.isfinite(qat["nan_metrics"]["loss"])
  assert int(s.step) == 1
  for name in ("params", "ema_params", "opt_state"):
    H.assert_trees_equal(getattr(s0, name), getattr(s, name), name)


def _first_moment_and_update(config, grads, params):
  tx = builders.make_optimizer(config)
  updates, state = tx.update(grads, tx.init(params), params)
  return optax.tree_utils.tree_get(state, "mu"), updates


def test_gradient_clipping():
  """make_optimizer clips by global norm: Adam's first moment after one update is
  (1 - b1) * clipped gradient: norm (1 - b1) * c for a gradient of norm 13 > c, same direction;
  unchanged below the threshold; grad_clip = 0 turns clipping off."""
  config = H.tiny_config("bidm", micro=True, warmup_steps=0)
  params = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
  grads = {"a": jnp.array([3.0, 0.0, -4.0]), "b": jnp.array([[0.0, 12.0], [0.0, 0.0]])}
  assert float(optax.tree.norm(grads)) == pytest.approx(13.0)
  b1 = 0.9  # optax.adam's default

  config.training.grad_clip = 0.0
  mu_off, up_off = _first_moment_and_update(config, grads, params)
  config.training.grad_clip = 1.3
  mu_on, up_on = _first_moment_and_update(config, grads, params)
  config.training.grad_clip = 100.0
  mu_loose, _ = _first_moment_and_update(config, grads, params)

  assert float(optax.tree.norm(mu_off)) == pytest.approx((1 - b1) * 13.0, rel=1e-6)
  assert float(optax.tree.norm(mu_on)) == pytest.approx((1 - b1) * 1.3, rel=1e-6)
  for k in grads:
    np.testing.assert_allclose(mu_on[k], mu_off[k] * (1.3 / 13.0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mu_loose[k], mu_off[k], rtol=1e-7)
    # the applied update keeps the gradient's direction (descent, sign by sign)
    np.testing.assert_array_equal(np.sign(up_on[k]), -np.sign(grads[k]))
    np.testing.assert_array_equal(np.sign(up_off[k]), -np.sign(grads[k]))


ROUND_TRIP = r"""
import json, sys
import helpers as H
from bidm_jax.training import train as T
root, n = sys.argv[1], int(sys.argv[2])
teacher = H.export_teacher(H.tiny_config("fp", micro=True), root + "/teacher")
cfg = lambda steps: H.tiny_config("bidm", micro=True, teacher=teacher, steps=steps, log_every=1,
                                  checkpoint_every=1000)
out = {}
out["split_1"] = T.train(cfg(n), root + "/split")
out["split_2"] = T.train(cfg(2 * n), root + "/split")
out["whole"] = T.train(cfg(2 * n), root + "/whole")
print(json.dumps({k: {a: b for a, b in v.items() if a != "state"} for k, v in out.items()}))
"""


def _losses(workdir):
  return {
      m["step"]: {k: v for k, v in m.items() if k != "steps_per_sec"}
      for m in H.read_metrics(workdir)
  }


def test_checkpoint_round_trip_is_bit_identical(tmp_path, tmp_path_factory):
  """train() for N = 5 steps, then train() to 2N in the same workdir resumes from the step-N
  checkpoint (state, data position, teacher) and logs the same losses, bit for bit, as an
  uninterrupted 2N-step run, ending in the same state."""
  n = H.QAT_STEPS // 2
  env = H.subprocess_env(H.cache_dir(tmp_path_factory))
  proc = H.run_python(ROUND_TRIP, tmp_path, n, env=env, timeout=400)
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["split_1"]["step"] == n and summary["split_1"]["start_step"] == 0
  assert summary["split_2"]["start_step"] == n and summary["split_2"]["step"] == 2 * n
  assert summary["whole"]["step"] == 2 * n
  split, whole = _losses(tmp_path / "split"), _losses(tmp_path / "whole")
  assert sorted(whole) == list(range(1, 2 * n + 1)) and sorted(split) == sorted(whole)
  for s in range(1, 2 * n + 1):
    assert split[s] == whole[s], f"step {s}: {split[s]} vs {whole[s]}"
  assert H.checkpoint_steps(tmp_path / "split") == [n, 2 * n]
  H.assert_trees_equal(
      H.read_state(tmp_path / "split", 2 * n),
      H.read_state(tmp_path / "whole", 2 * n),
      "final state",
  )


def test_train_applies_the_method_fp_init(tmp_path):
  """train() runs method.init_from_fp right after loading the teacher: XNOR++ starts its Gamma
  at mean|W_teacher| / sqrt(2 pi) (one step at lr 1e-9 moves it by ~1e-9)."""
  teacher = H.export_teacher(H.tiny_config("fp", micro=True), tmp_path / "teacher", seed=5)
  config = H.tiny_config(
      "xnorpp",
      micro=True,
      teacher=teacher,
      steps=1,
      learning_rate=1e-9,
      warmup_steps=0,
      log_every=1,
      checkpoint_every=1000,
  )
  state = train_lib.train(config, str(tmp_path / "run"))["state"]
  flat = H.flat(jax.device_get(state.params))
  scales = [k for k in flat if k.endswith("['output_scale']")]
  assert len(scales) >= 5  # the res block convs, its time projection, the decoder convs
  for key in scales:
    kernel = flat[key.replace("['output_scale']", "['kernel']")]
    alpha = np.mean(np.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
    np.testing.assert_allclose(
        flat[key], alpha * ACTIVATION_MEAN_ABS, rtol=1e-4, atol=1e-7, err_msg=key
    )


def test_loss_reduction_sum():
  """distill.reduction='sum': L_DM summed over each image's H*W*C values (the authors' CIFAR
  code), the distillation term unchanged; 'eps_mse' reports the per-value MSE."""
  config = H.tiny_config("bidm", micro=True)
  method = config_lib.method_from_config(config)
  model, teacher = builders.make_model(config, method), builders.make_model(config, FP)
  shape = builders.image_shape(config, 1)
  teacher_params = H.random_params(teacher, shape, seed=0)
  params = train_lib.overlay_params(H.random_params(model, shape, seed=1), teacher_params)
  schedule = builders.make_schedule(config)
  images = jnp.asarray(H.digits_batch(config))
  fns = {}
  for reduction in ("mean", "sum"):
    config.distill.reduction = reduction
    config_lib.validate(config)
    fns[reduction] = train_lib.make_loss_fn(config, model, schedule, teacher)
  both = jax.jit(
      lambda r: {k: f(params, teacher_params, images, r, 0.5)[1] for k, f in fns.items()}
  )(jax.random.PRNGKey(3))
  mean, total = jax.device_get(both["mean"]), jax.device_get(both["sum"])
  values = int(np.prod(images.shape[1:]))
  assert values == 64
  np.testing.assert_allclose(total["loss_dm"], values * mean["loss_dm"], rtol=1e-5)
  np.testing.assert_allclose(total["eps_mse"], mean["loss_dm"], rtol=1e-5)
  assert "eps_mse" not in mean
  np.testing.assert_allclose(total["loss_distill"], mean["loss_distill"], rtol=1e-6)
  w = config.distill.weight
  np.testing.assert_allclose(total["loss"], total["loss_dm"] + w * total["loss_distill"], rtol=1e-6)
  config.distill.reduction = "none"
  with pytest.raises(ValueError, match="distill.reduction"):
    config_lib.validate(config)


def test_release_spd_points_and_tbs_structure_in_the_loss():
  """distill.points='release' distils the model's release points (not the block outputs);
  tbs.structure='release' makes the student carry its upsample output between the passes."""
  config = H.tiny_config("bidm")
  config.tbs.structure = "release"
  config.distill.points = "release"
  config_lib.validate(config)
  method = config_lib.method_from_config(config)
  model, teacher = builders.make_model(config, method), builders.make_model(config, FP)
  assert model.tbs_structure == "release" and model.num_connections == 1
  assert model.release_points == (
      "down_0_downsample",
      "down_1_block_0/conv2",
      "mid_block_2/conv2",
      "up_1_upsample",
  )
  shape = builders.image_shape(config, 1)
  teacher_params = H.random_params(teacher, shape, seed=0)
  params = train_lib.overlay_params(H.random_params(model, shape, seed=1), teacher_params)
  assert "tbs_release_table" in params and "tbs_table" not in params
  schedule = builders.make_schedule(config)
  images = jnp.asarray(H.digits_batch(config))
  loss_fn = train_lib.make_loss_fn(config, model, schedule, teacher)
  rng = jax.random.PRNGKey(5)

  def reference():
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    t = jax.random.randint(k_t, (images.shape[0],), 0, 1000)
    noise = jax.random.normal(k_noise, images.shape, jnp.float32)
    x_t = q_sample(schedule, images, t, noise)
    t_prev = jnp.minimum(t + 1, 999)
    apply = lambda p, x, tt, cache, r: model.apply(
        {"params": p}, x, tt, cache=cache, train=True, progress=0.5, rngs={"dropout": r}
    )
    out = tbs.paired_timestep_forward(
        apply, params, q_sample(schedule, images, t_prev, noise), t_prev, x_t, t, k_drop
    )
    target = teacher.apply({"params": teacher_params}, x_t, t)
    names = model.release_points
    return (
        spd.spd_loss([out.points[k] for k in names], [target.points[k] for k in names], 4),
        spd.spd_loss(out.features, target.features, 4),
    )

  metrics, (release, blocks) = jax.jit(
      lambda: (loss_fn(params, teacher_params, images, rng, 0.5)[1], reference())
  )()
  np.testing.assert_allclose(float(metrics["loss_distill"]), float(release), rtol=1e-5)
  assert abs(float(release) - float(blocks)) > 1e-3
  config.distill.points = "all"
  with pytest.raises(ValueError, match="distill.points"):
    config_lib.validate(config)
  config.distill.points, config.tbs.structure = "blocks", "chain"
  with pytest.raises(ValueError, match="tbs.structure"):
    config_lib.validate(config)
  config.tbs.structure, config.model.ch_mult = "release", (1,)
  with pytest.raises(ValueError, match="at least 2 levels"):
    config_lib.validate(config)
  # the demo's U-Net: attention at level 0 (32 wide), up_1_upsample entering it 64 wide
  config.model.update(ch_mult=(1, 2), attn_resolutions=(8,))
  with pytest.raises(ValueError, match="tbs.structure.*widths must be equal"):
    config_lib.validate(config)
  model = builders.make_model(config, method)
  with pytest.raises(ValueError, match="level 0's attention outputs .* widths must be equal"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))


def test_profile_traces_the_chosen_steps(tmp_path):
  """training.profile_start/profile_steps write one jax.profiler trace of those steps, and
  benchmarks/profile_summary.py reads it: the host ran exactly that many train-step dispatches."""
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
  import profile_summary  # pylint: disable=import-outside-toplevel

  config = H.tiny_config("fp", micro=True, steps=4, log_every=1, checkpoint_every=1000)
  config.training.update(profile_start=1, profile_steps=2)
  train_lib.train(config, str(tmp_path / "run"))
  trace = profile_summary.newest_trace(str(tmp_path / "run" / "profile"))
  with gzip.open(trace, "rt") as f:
    events = json.load(f)["traceEvents"]
  calls = [e for e in events if e.get("ph") == "X" and e["name"] == "PjitFunction(train_step)"]
  outermost, end = 0, float("-inf")  # jax nests one PjitFunction event in each call's
  for e in sorted(calls, key=lambda e: e["ts"]):
    if e["ts"] >= end:
      outermost, end = outermost + 1, e["ts"] + e["dur"]
  assert outermost == 2
  summary = profile_summary.summarize(events, steps=2, top=5)
  host = summary["processes"]["/host:CPU"]
  assert 0 < host["busy_ms"] <= host["span_ms"] and len(host["top_names"]) == 5
  every = profile_summary.summarize(events, steps=2, top=10_000)["processes"]["/host:CPU"]
  assert any(n["name"] == "PjitFunction(train_step)" for n in every["top_names"])
  with pytest.raises(FileNotFoundError, match="no perfetto_trace"):
    profile_summary.newest_trace(str(tmp_path / "run" / "logs"))
  config.training.profile_steps = 0
  with pytest.raises(ValueError, match="training.profile_steps"):
    config_lib.validate(config)
  config.training.update(profile_steps=1, profile_start=4)  # = steps: would trace nothing
  with pytest.raises(ValueError, match="training.profile_start"):
    config_lib.validate(config)
