"""Schedules, q_sample, and the DDIM / DDPM `lax.scan` samplers against Python loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax import sampling
from bidm_jax.bidm import tbs
from bidm_jax.diffusion import (
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    dynamic_threshold_x0,
    epsilon_loss,
    make_schedule,
    process_x0,
    q_sample,
)
from bidm_jax.layers.packed import ALL_IMPLS
from bidm_jax.models.unet import UNetOutput

# ---------------------------------------------------------------------------------------------
# Schedules and the forward process


def test_linear_betas():
  s = make_schedule("linear", 1000, 1e-4, 0.02)
  i = np.arange(1000)
  betas = 1e-4 + (0.02 - 1e-4) * i / 999
  np.testing.assert_allclose(np.asarray(s.betas), betas, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), np.cumprod(1 - betas), rtol=1e-5)
  assert s.num_timesteps == 1000 and s.betas.dtype == jnp.float32
  assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)


@pytest.mark.parametrize("start,end", [(0.0015, 0.0195), (0.0015, 0.0155)])
def test_ldm_linear_betas(start, end):
  s = make_schedule("ldm_linear", 1000, start, end)
  i = np.arange(1000)
  betas = (np.sqrt(start) + (np.sqrt(end) - np.sqrt(start)) * i / 999) ** 2
  np.testing.assert_allclose(np.asarray(s.betas), betas, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), np.cumprod(1 - betas), rtol=1e-5)
  assert float(s.betas[0]) == pytest.approx(start) and float(s.betas[-1]) == pytest.approx(end)
  # differs from the plain linear schedule in the middle
  lin = np.linspace(start, end, 1000)
  assert betas[500] < lin[500] - 1e-4


def test_bad_schedules_raise():
  with pytest.raises(ValueError):
    make_schedule("cosine")
  with pytest.raises(ValueError):
    make_schedule("linear", 10, 0.5, 1.5)


def test_q_sample_closed_form():
  s = make_schedule()
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 1, 500, 999])
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
  expected = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  got = jax.jit(q_sample)(s, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  # at t = 0 almost the clean image, at T - 1 almost pure noise
  assert np.abs(np.asarray(got)[0] - x0[0]).max() < 0.05  # sqrt(1 - abar_0) = 0.01
  assert np.abs(np.asarray(got)[3] - noise[3]).max() < 0.05


def test_epsilon_loss_is_mse():
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((2, 3, 4, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(
      float(epsilon_loss(jnp.asarray(a), jnp.asarray(b))),
      np.mean((a.astype(np.float64) - b) ** 2),
      rtol=1e-6,
  )


def test_epsilon_loss_sum_reduction():
  """'sum': summed over each example's values, averaged over the batch (the ddim repo)."""
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((2, 3, 4, 4, 3)).astype(np.float32)
  sq = (a.astype(np.float64) - b) ** 2
  got = float(epsilon_loss(jnp.asarray(a), jnp.asarray(b), "sum"))
  np.testing.assert_allclose(got, sq.sum(axis=(1, 2, 3)).mean(), rtol=1e-6)
  np.testing.assert_allclose(
      got, 48 * float(epsilon_loss(jnp.asarray(a), jnp.asarray(b))), rtol=1e-6
  )
  with pytest.raises(ValueError, match="reduction"):
    epsilon_loss(jnp.asarray(a), jnp.asarray(b), "max")


# ---------------------------------------------------------------------------------------------
# DDIM


@pytest.mark.parametrize("steps", [1, 10, 100, 200, 1000])
def test_ddim_timesteps_uniform(steps):
  ts = ddim_timesteps(1000, steps)
  # the ddim repo's 'uniform' skip: range(0, T, T // steps), walked backwards
  expected = np.arange(0, 1000, 1000 // steps)[::-1]
  np.testing.assert_array_equal(ts, expected)
  assert ts.dtype == np.int32 and len(ts) == steps and ts[-1] == 0


def test_ddim_timesteps_properties_and_errors():
  for steps in (3, 7, 300, 999):
    ts = ddim_timesteps(1000, steps)
    assert len(ts) == steps and ts[-1] == 0 and ts.max() < 1000
    assert np.all(np.diff(ts) < 0)
  np.testing.assert_array_equal(ddim_timesteps(1000, 100)[:3], [990, 980, 970])
  for bad in (0, 1001):
    with pytest.raises(ValueError):
      ddim_timesteps(1000, bad)


def np_ddim_step(abar, x, eps, t, t_next, eta, noise):
  """Song et al. 2021 Eq. 12 in float64; t_next = -1 means alpha_bar = 1 (the clean image)."""
  a = abar[t]
  an = abar[t_next] if t_next >= 0 else 1.0
  x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
  sigma = eta * np.sqrt((1 - an) / (1 - a)) * np.sqrt(1 - a / an)
  return np.sqrt(an) * x0 + np.sqrt(1 - an - sigma**2) * eps + sigma * noise


@pytest.mark.parametrize("t,t_next", [(990, 980), (500, 250), (10, 0), (0, -1), (30, -1)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_formula(t, t_next, eta):
  s = make_schedule()
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  rng = np.random.default_rng(t)
  x, eps, noise = rng.standard_normal((3, 2, 4, 4, 3)).astype(np.float32)
  got = ddim_step(
      s, jnp.asarray(x), jnp.asarray(eps), jnp.int32(t), jnp.int32(t_next), eta, jnp.asarray(noise)
  )
  np.testing.assert_allclose(
      np.asarray(got), np_ddim_step(abar, x, eps, t, t_next, eta, noise), rtol=1e-4, atol=1e-4
  )


def test_ddim_step_eta1_is_ddpm_posterior_variance():
  """With eta = 1 and consecutive steps, sigma^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t)."""
  s = make_schedule()
  t = 400
  x = jnp.zeros((1, 1, 1, 1))
  eps = jnp.zeros_like(x)
  noise = jnp.ones_like(x)
  sigma = float(ddim_step(s, x, eps, jnp.int32(t), jnp.int32(t - 1), 1.0, noise).squeeze())
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  np.testing.assert_allclose(sigma**2, betas[t] * (1 - abar[t - 1]) / (1 - abar[t]), rtol=1e-3)


def test_ddim_step_eta0_ignores_noise():
  s = make_schedule()
  rng = np.random.default_rng(2)
  x, eps, n1, n2 = (jnp.asarray(a) for a in rng.standard_normal((4, 2, 4, 4, 3)))
  a = ddim_step(s, x, eps, jnp.int32(500), jnp.int32(490), 0.0, n1)
  b = ddim_step(s, x, eps, jnp.int32(500), jnp.int32(490), 0.0, n2)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def toy_model(num_connections: int):
  """A deterministic stand-in for a model with `num_connections` (0 or 1) TBS connection
  points: its connection is its second feature."""

  def apply(x, t, cache):
    h = jnp.tanh(x) + 1e-4 * t[:, None, None, None].astype(jnp.float32)
    if num_connections and cache is not None:
      h = tbs.blend(h, cache.features[0], jnp.where(cache.valid, 0.5, 0.0) * jnp.ones(x.shape[0]))
    return UNetOutput(0.5 * h, (x, h), connections=(h,)[:num_connections])

  return apply


toy_apply = toy_model(0)


def ddim_loop(apply_fn, schedule, shape, rng, steps, eta, num_connections, noise_rng=None):
  """The sampler as a Python loop, with the sampler's key splitting; cache carried by hand."""
  ts = ddim_timesteps(schedule.num_timesteps, steps)
  init_key, rng = jax.random.split(rng)
  x = jax.random.normal(init_key, shape, jnp.float32)
  keys = jax.random.split(rng if noise_rng is None else noise_rng, len(ts))
  cache = None
  for i, t in enumerate(ts):
    t_next = int(ts[i + 1]) if i + 1 < len(ts) else -1
    out = apply_fn(x, jnp.full((shape[0],), t, jnp.int32), cache)
    noise = jax.random.normal(keys[i], shape, jnp.float32)
    x = ddim_step(schedule, x, out.eps, jnp.int32(t), jnp.int32(t_next), eta, noise)
    if num_connections:
      cache = tbs.TBSCache(out.connections, jnp.ones((), bool))
  return x


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("num_connections", [0, 1])
def test_ddim_sample_matches_python_loop_toy(eta, num_connections):
  s = make_schedule()
  shape, rng = (2, 4, 4, 3), jax.random.key(3)
  got = ddim_sample(toy_model(num_connections), s, shape, rng, steps=20, eta=eta)
  ref = ddim_loop(toy_model(num_connections), s, shape, rng, 20, eta, num_connections)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # the carried cache changes the result (the blend is active after the first step)
  if num_connections:
    plain = ddim_loop(toy_apply, s, shape, rng, 20, eta, 0)
    assert not np.allclose(np.asarray(got), np.asarray(plain), atol=1e-3)


def test_ddim_eta0_is_deterministic():
  s = make_schedule()
  shape, rng = (2, 4, 4, 3), jax.random.key(4)
  a = ddim_sample(toy_apply, s, shape, rng, steps=5, eta=0.0)
  b = ddim_sample(toy_apply, s, shape, rng, steps=5, eta=0.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # same initial x, different per-step noise keys: identical at eta = 0, not at eta > 0
  k1, k2 = jax.random.key(10), jax.random.key(11)
  for eta, same in ((0.0, True), (1.0, False)):
    x1 = ddim_loop(toy_apply, s, shape, rng, 5, eta, 0, noise_rng=k1)
    x2 = ddim_loop(toy_apply, s, shape, rng, 5, eta, 0, noise_rng=k2)
    assert np.allclose(np.asarray(x1), np.asarray(x2), atol=0) == same
  # and a different rng gives a different sample (it draws a different x_T)
  c = ddim_sample(toy_apply, s, shape, jax.random.key(5), steps=5, eta=0.0)
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_ddim_sample_tiny_unet_matches_loop(tiny_fp):
  s = make_schedule()
  params, rng = tiny_fp.params, jax.random.key(6)
  scan_apply = lambda x, t, cache: tiny_fp.model.apply(params, x, t, cache=cache)
  got = jax.jit(lambda r: ddim_sample(scan_apply, s, H.TINY_SHAPE, r, steps=3, eta=0.5))(rng)
  loop_apply = lambda x, t, cache: tiny_fp.apply(params, x, t)
  ref = ddim_loop(loop_apply, s, H.TINY_SHAPE, rng, 3, 0.5, 0)
  # float32 round-off of a jitted scan vs eager calls, scaled by |x| (up to ~16 here)
  np.testing.assert_allclose(
      np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(np.abs(ref).max())
  )


def test_ddim_sample_tbs_unet_matches_loop_with_explicit_cache(micro_bidm):
  """TBS sampling: step i blends with step i - 1's (blended) connection features.

  The micro BiDM U-Net (conftest) has 2 connection points, its two decoder blocks.
  """
  s = make_schedule()
  params, rng = micro_bidm.params, jax.random.key(7)
  n = H.TBS_CONNECTIONS
  assert micro_bidm.model.num_connections == n
  scan_apply = lambda x, t, cache: micro_bidm.model.apply(params, x, t, cache=cache)
  got = jax.jit(lambda r: ddim_sample(scan_apply, s, H.MICRO_SHAPE, r, steps=3, eta=0.0))(rng)

  def loop_apply(x, t, cache):
    if cache is None:  # the first step runs without a cache
      return micro_bidm.apply(params, x, t)
    return micro_bidm.apply_cache(params, x, t, cache)

  ref = ddim_loop(loop_apply, s, H.MICRO_SHAPE, rng, 3, 0.0, n)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# DDPM


def np_ddpm_loop(shape, rng, betas32, variance, num_connections):
  """Ancestral sampling with the posterior mean written through x0 (DDPM Eq. 6-7), float64."""
  betas = np.asarray(betas32, np.float64)
  T = len(betas)
  abar = np.cumprod(1 - betas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  init_key, rng = jax.random.split(rng)
  x = np.asarray(jax.random.normal(init_key, shape, jnp.float32), np.float64)
  keys = jax.random.split(rng, T)
  cache = None
  for i, t in enumerate(range(T - 1, -1, -1)):
    h = np.tanh(x) + 1e-4 * t
    if cache is not None:
      h = 0.5 * h + 0.5 * cache
    eps = 0.5 * h
    if num_connections:
      cache = h
    x0 = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
    mean = (
        np.sqrt(abar_prev[t]) * betas[t] * x0 + np.sqrt(1 - betas[t]) * (1 - abar_prev[t]) * x
    ) / (1 - abar[t])
    var = betas[t] if variance == "fixedlarge" else betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
    noise = np.asarray(jax.random.normal(keys[i], shape, jnp.float32), np.float64)
    x = mean + (np.sqrt(var) * noise if t > 0 else 0.0)
  return x


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("num_connections", [0, 1])
def test_ddpm_sample_matches_python_loop_toy(variance, num_connections):
  s = make_schedule("linear", 40, 1e-3, 0.2)
  shape, rng = (2, 4, 4, 3), jax.random.key(8)
  got = ddpm_sample(toy_model(num_connections), s, shape, rng, variance=variance)
  assert got.shape == shape and np.all(np.isfinite(np.asarray(got)))
  ref = np_ddpm_loop(shape, rng, s.betas, variance, num_connections)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


def test_ddpm_bad_variance_raises():
  with pytest.raises(ValueError):
    ddpm_sample(
        toy_apply,
        make_schedule("linear", 10, 1e-3, 0.2),
        (1, 2, 2, 1),
        jax.random.key(0),
        variance="learned",
    )


# ---------------------------------------------------------------------------------------------
# x0 clipping and dynamic thresholding (sampling.clip_x0, sampling.dynamic_threshold)


def test_dynamic_threshold_exact():
  # sample 0: |x0| = 0.5, 1, 2, 4 -> 50th percentile (linear) 1.5 -> clip to [-1.5, 1.5], / 1.5
  # sample 1: all |x0| <= 1 -> s = max(s, 1) = 1: unchanged
  x0 = np.array([[0.5, -1.0, 2.0, -4.0], [0.2, -0.9, 1.0, 0.0]], np.float32).reshape(2, 2, 2, 1)
  got = np.asarray(dynamic_threshold_x0(jnp.asarray(x0), 50.0))
  expected = np.array([[0.5 / 1.5, -1.0 / 1.5, 1.0, -1.0], [0.2, -0.9, 1.0, 0.0]])
  np.testing.assert_allclose(got.reshape(2, 4), expected, rtol=1e-6)
  # percentile 100: s is the max |x0| (4), every value divided by it
  got = np.asarray(dynamic_threshold_x0(jnp.asarray(x0), 100.0))
  np.testing.assert_allclose(got[0].ravel(), [0.125, -0.25, 0.5, -1.0], rtol=1e-6)
  # process_x0: off is the identity; clip is [-1, 1]; thresholding first, then the clip
  np.testing.assert_array_equal(np.asarray(process_x0(jnp.asarray(x0))), x0)
  np.testing.assert_array_equal(
      np.asarray(process_x0(jnp.asarray(x0), clip_x0=True)), np.clip(x0, -1, 1)
  )
  np.testing.assert_allclose(
      np.asarray(process_x0(jnp.asarray(x0), True, 50.0)).reshape(2, 4), expected, rtol=1e-6
  )


@pytest.mark.parametrize("clip,percentile", [(True, 0.0), (False, 90.0)])
@pytest.mark.parametrize("t,t_next,eta", [(500, 250, 0.0), (500, 490, 1.0), (30, -1, 0.0)])
def test_ddim_step_with_x0_processing(clip, percentile, t, t_next, eta):
  """x0 processed, eps recomputed from it, then Eq. 12 (guided-diffusion's ddim_sample)."""
  s = make_schedule()
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  rng = np.random.default_rng(t)
  x, eps, noise = (3 * rng.standard_normal((3, 2, 4, 4, 3))).astype(np.float32)
  x0 = (x.astype(np.float64) - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
  if percentile:
    q = np.maximum(np.percentile(np.abs(x0), percentile, axis=(1, 2, 3), keepdims=True), 1.0)
    x0 = np.clip(x0, -q, q) / q
  else:
    x0 = np.clip(x0, -1, 1)
  assert np.abs(x0).max() <= 1 and (np.abs(x0) == 1).any()  # the processing is active
  eps_c = (x - np.sqrt(abar[t]) * x0) / np.sqrt(1 - abar[t])
  an = abar[t_next] if t_next >= 0 else 1.0
  sigma = eta * np.sqrt((1 - an) / (1 - abar[t])) * np.sqrt(1 - abar[t] / an)
  expected = np.sqrt(an) * x0 + np.sqrt(1 - an - sigma**2) * eps_c + sigma * noise
  got = ddim_step(
      s,
      jnp.asarray(x),
      jnp.asarray(eps),
      jnp.int32(t),
      jnp.int32(t_next),
      eta,
      jnp.asarray(noise),
      clip_x0=clip,
      dynamic_threshold=percentile,
  )
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)
  plain = ddim_step(
      s, jnp.asarray(x), jnp.asarray(eps), jnp.int32(t), jnp.int32(t_next), eta, jnp.asarray(noise)
  )
  assert not np.allclose(np.asarray(plain), expected, atol=1e-3)
  if t_next == -1:  # the last step returns the processed x0 itself
    np.testing.assert_allclose(np.asarray(got), x0, rtol=1e-5, atol=1e-5)


def big_apply(x, t, cache):
  """A stand-in model whose x0 predictions leave [-1, 1]: eps = -x."""
  del t, cache
  return UNetOutput(-x, (x,))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_clip_x0_bounds_the_sample(sampler):
  s = make_schedule("linear", 40, 1e-3, 0.2)
  shape, rng = (2, 4, 4, 3), jax.random.key(12)
  run = (
      (lambda **kw: ddim_sample(big_apply, s, shape, rng, steps=10, **kw))
      if sampler == "ddim"
      else (lambda **kw: ddpm_sample(big_apply, s, shape, rng, **kw))
  )
  plain, clipped, thresholded = run(), run(clip_x0=True), run(dynamic_threshold=99.5)
  assert np.abs(np.asarray(plain)).max() > 2
  for out in (clipped, thresholded):  # DDPM's last mean is x0 up to float32 round-off
    assert np.abs(np.asarray(out)).max() <= 1 + 1e-4
  assert not np.allclose(np.asarray(clipped), np.asarray(thresholded))
  with pytest.raises(ValueError, match="percentile"):
    run(dynamic_threshold=101.0)


def test_ddpm_clip_matches_posterior_mean_loop():
  """DDPM with clip_x0: the posterior mean of the clipped x0 (DDPM's clip_denoised=True)."""
  s = make_schedule("linear", 40, 1e-3, 0.2)
  shape, rng = (2, 4, 4, 3), jax.random.key(13)
  betas = np.asarray(s.betas, np.float64)
  abar = np.cumprod(1 - betas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  init_key, key = jax.random.split(rng)
  x = np.asarray(jax.random.normal(init_key, shape, jnp.float32), np.float64)
  keys = jax.random.split(key, len(betas))
  for i, t in enumerate(range(len(betas) - 1, -1, -1)):
    eps = 0.5 * (np.tanh(x) + 1e-4 * t)  # toy_apply without a cache
    x0 = np.clip((x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t]), -1, 1)
    mean = (
        np.sqrt(abar_prev[t]) * betas[t] * x0 + np.sqrt(1 - betas[t]) * (1 - abar_prev[t]) * x
    ) / (1 - abar[t])
    noise = np.asarray(jax.random.normal(keys[i], shape, jnp.float32), np.float64)
    x = mean + (np.sqrt(betas[t]) * noise if t > 0 else 0.0)
  got = ddpm_sample(toy_apply, s, shape, rng, clip_x0=True)
  np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)


def test_make_sampler_passes_x0_options():
  """config.sampling.clip_x0 / dynamic_threshold reach the jitted sampler; validation."""
  config = H.tiny_config("fp", micro=True)
  config.sampling.steps = 1
  model = builders.make_model(config)
  params = H.random_params(model, builders.image_shape(config, 1), seed=4)
  params = jax.tree_util.tree_map(lambda p: 20 * p, params)  # x0 predictions far outside [-1, 1]
  mesh = builders.make_mesh(config)
  schedule = builders.make_schedule(config)
  out = {}
  for clip, percentile in ((False, 0.0), (True, 0.0), (False, 99.5)):
    config.sampling.update(clip_x0=clip, dynamic_threshold=percentile)
    config_lib.validate(config)
    sample = sampling.make_sampler(config, model, schedule, mesh)
    out[clip, percentile] = np.asarray(sample(params, jax.random.key(0), 2))
  assert np.abs(out[False, 0.0]).max() > 1
  # one DDIM step from T - 1 to the clean image returns the processed x0
  np.testing.assert_allclose(out[True, 0.0], np.clip(out[False, 0.0], -1, 1), rtol=1e-4, atol=1e-4)
  q = np.maximum(np.percentile(np.abs(out[False, 0.0]), 99.5, axis=(1, 2, 3), keepdims=True), 1)
  np.testing.assert_allclose(
      out[False, 99.5], np.clip(out[False, 0.0], -q, q) / q, rtol=1e-4, atol=1e-4
  )
  config.sampling.dynamic_threshold = 150.0
  with pytest.raises(ValueError, match="sampling.dynamic_threshold"):
    config_lib.validate(config)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(checkpoint_step=-1), r"sampling.checkpoint_step: must be >= 0"),
        (dict(engine="packed", checkpoint_step=5), r"packed engine runs an export"),
        (dict(engine="packed", use_ema=False), r"packed engine runs an export"),
        (dict(packed_impl="bmma"), r"sampling.packed_impl: 'bmma' is not one of"),
    ],
)
def test_checkpoint_step_and_raw_parameters_are_validated(fields, message):
  assert config_lib.PACKED_IMPLS == ALL_IMPLS
  config = H.tiny_config("bidm")
  config.sampling.update(**fields)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)
