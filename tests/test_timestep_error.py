"""benchmarks/timestep_error.py: the eps a model predicts at each timestep, a TBS model as it
trains (at t + 1 first, then at t with that pass's cache)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import bidm_jax.main  # noqa: F401  # its absl flags are defined: importing the script must not clash
import helpers as H
from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax.bidm.tbs import TBSCache
from bidm_jax.diffusion import q_sample

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import timestep_error  # noqa: E402


def test_eps_predictor_one_call_and_paired():
  t = 500
  for name in ("fp", "bidm"):
    config = H.tiny_config(name, micro=True)
    schedule = builders.make_schedule(config)
    model = builders.make_model(config, config_lib.method_from_config(config))
    params = H.random_params(model, H.MICRO_SHAPE, seed=1)
    x0 = jnp.tanh(jax.random.normal(jax.random.key(2), H.MICRO_SHAPE))
    noise = jax.random.normal(jax.random.key(3), H.MICRO_SHAPE)
    eps = timestep_error.eps_predictor(model, schedule, x0, noise)(params, t)

    def apply(step, cache=None):
      ts = jnp.full((H.MICRO_SHAPE[0],), step, jnp.int32)
      return model.apply({"params": params}, q_sample(schedule, x0, ts, noise), ts, cache=cache)

    single = apply(t).eps
    if name == "fp":
      assert model.num_connections == 0
      np.testing.assert_allclose(eps, single, rtol=1e-5, atol=1e-5)
      continue
    assert model.num_connections > 0
    cache = TBSCache(tuple(apply(t + 1).connections), jnp.ones((), bool))
    np.testing.assert_allclose(eps, apply(t, cache).eps, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(eps - single))) > 1e-3  # the cache counts
