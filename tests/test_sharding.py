"""Data parallelism: on 8 (host-platform) devices the QAT step and the sampler compute what they
compute on 1 device, for the same global batch.

The device count must be set before jax starts, so the computation runs in a subprocess
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`), once per session; its results are
shared by the tests of this module through a result file.
"""

from __future__ import annotations

import pickle

import numpy as np
import optax
import pytest

import helpers as H

SHARDED = r"""
import pickle, sys
import jax, jax.numpy as jnp, numpy as np
import helpers as H
from bidm_jax import builders
from bidm_jax import config as CL
from bidm_jax import sampling
from bidm_jax.binarize.methods import FP
from bidm_jax.training import train as T

assert jax.device_count() == 8, jax.devices()
cfg = H.tiny_config("bidm", micro=True, warmup_steps=0)
method = CL.method_from_config(cfg)
model, teacher = builders.make_model(cfg, method), builders.make_model(cfg, FP)
shape = builders.image_shape(cfg, 1)
teacher_params = H.random_params(teacher, shape, seed=0)
params = T.overlay_params(H.random_params(model, shape, seed=1), teacher_params)
tx = builders.make_optimizer(cfg)
state0 = T.create_state(params, tx)
images = H.digits_batch(cfg)
rng = jax.random.PRNGKey(0)
out = {}
for n in (8, 1):
  cfg.mesh.data = n
  mesh = builders.make_mesh(cfg)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(T.make_train_step(cfg, model, builders.make_schedule(cfg), tx, teacher))
  state, tp = jax.device_put(state0, repl), jax.device_put(teacher_params, repl)
  batch = T.global_batch(mesh, images)
  state1, metrics1 = step(state, batch, rng, tp)
  state2, metrics2 = step(state1, batch, rng, tp)
  samples, _ = sampling.generate(cfg, model, params, 8, seed=0, mesh=mesh, progress_bar=False)
  out[n] = dict(
      mesh_devices=mesh.devices.size,
      batch_shards=sorted(s.data.shape[0] for s in batch.addressable_shards),
      param_devices=len(jax.tree_util.tree_leaves(state1.params)[0].sharding.device_set),
      metrics=[jax.device_get(metrics1), jax.device_get(metrics2)],
      state1=jax.tree_util.tree_map(np.asarray, jax.device_get(state1)),
      samples=np.asarray(samples))
out["params0"] = jax.tree_util.tree_map(np.asarray, params)
with open(sys.argv[1], "wb") as f:
  pickle.dump(out, f)
"""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  def compute():
    path = tmp_path_factory.mktemp("sharded") / "out.pkl"
    env = H.subprocess_env(H.cache_dir(tmp_path_factory), devices=8)
    H.run_python(SHARDED, path, env=env, timeout=500)
    return pickle.loads(path.read_bytes())

  return H.shared_result(tmp_path_factory, "sharded_results", compute)


def test_qat_step_on_8_devices_matches_1_device(sharded):
  """BiDM QAT (TBS + SPD, teacher replicated) with the global batch of 8 split one example per
  device computes what one device computes: the losses and metrics of two steps, and after the
  first step the gradient moments (Adam's mu, nu), the EMA and the parameters, to 1e-5.

  Parameters are compared where the gradient is above round-off (|g| >= 1e-7): where it is
  mathematically zero (e.g. a conv bias that the next one-channel-per-group GroupNorm
  removes) the float32 round-off residue (|g| < 1e-9) differs between the two reduction
  orders, and Adam normalises it into an update of up to lr * |g| / (|g| + eps); those
  elements are only checked to move by at most the learning rate.
  """
  multi, single = sharded[8], sharded[1]
  assert multi["mesh_devices"] == 8 and single["mesh_devices"] == 1
  assert multi["batch_shards"] == [1] * 8 and single["batch_shards"] == [8]
  assert multi["param_devices"] == 8
  for m, s in zip(multi["metrics"], single["metrics"]):
    assert bool(m["finite"]) and bool(s["finite"])
    for k in ("loss", "loss_dm", "loss_distill", "grad_norm"):
      np.testing.assert_allclose(m[k], s[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert multi["metrics"][0]["loss"] != multi["metrics"][1]["loss"]
  sm, ss = multi["state1"], single["state1"]
  assert int(sm.step) == int(ss.step) == 1
  for name in ("opt_state", "ema_params"):
    fm, fs = H.flat(getattr(sm, name)), H.flat(getattr(ss, name))
    assert fm.keys() == fs.keys()
    for k in fm:
      np.testing.assert_allclose(fm[k], fs[k], rtol=1e-5, atol=1e-5, err_msg=name + k)
  b1, lr = 0.9, 1e-3  # optax.adam's default b1; tiny_config's learning rate
  grads = {
      k: v / (1 - b1) for k, v in H.flat(optax.tree_utils.tree_get(ss.opt_state, "mu")).items()
  }
  pm, ps, p0 = H.flat(sm.params), H.flat(ss.params), H.flat(sharded["params0"])
  compared = 0
  for k in ps:
    signal = np.abs(grads[k]) >= 1e-7
    compared += int(signal.sum())
    np.testing.assert_allclose(pm[k][signal], ps[k][signal], rtol=1e-5, atol=1e-5, err_msg=k)
    assert np.all(np.abs(pm[k] - p0[k]) <= 1.01 * lr), k
    assert np.all(np.abs(ps[k] - p0[k]) <= 1.01 * lr), k
  total = sum(v.size for v in ps.values())
  assert compared > 0.5 * total, (compared, total)
  changed = sum(int(np.sum(ps[k] != p0[k])) for k in ps)
  assert changed > 0.5 * total, "the step left most parameters unchanged"


def test_sampling_on_8_devices_matches_1_device(sharded):
  """generate() (DDIM with the TBS cache, batch 8 sharded one image per device) gives the same
  images as on one device, to 1e-5."""
  multi, single = sharded[8]["samples"], sharded[1]["samples"]
  assert multi.shape == single.shape == (8, 8, 8, 1)
  assert np.isfinite(multi).all() and multi.std() > 0
  np.testing.assert_allclose(multi, single, rtol=1e-5, atol=1e-5)
