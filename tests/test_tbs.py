"""TBS cross-timestep connections (paper section 3.2): blend, cached forward, paired forward.

The U-Net tests use the micro BiDM U-Net of conftest (one level; its 2 decoder blocks are the 2
connection points; a down block and the middle block precede them): the cached-forward logic
is the same as in the larger models and its compiles are a fraction of the tiny U-Net's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import MICRO_SHAPE, TBS_CONNECTIONS, random_params, tiny_inputs

from bidm_jax.bidm import tbs
from bidm_jax.binarize.methods import get_method
from bidm_jax.diffusion import ddim_sample, ddim_step, ddim_timesteps, make_schedule
from bidm_jax.models.unet import UNet, UNetOutput

N = TBS_CONNECTIONS


def with_table(params, table):
  p = {"params": dict(params["params"])}  # shallow copy
  p["params"]["tbs_table"] = jnp.asarray(table, jnp.float32)
  return p


def random_cache(bundle, x, t, seed, valid=True):
  """A cache of random features shaped like the model's N connections."""
  shapes = jax.eval_shape(bundle.apply, bundle.params, x, t).connections
  rng = np.random.default_rng(seed)
  feats = tuple(jnp.asarray(rng.standard_normal(s.shape), jnp.float32) for s in shapes)
  return tbs.TBSCache(feats, jnp.asarray(valid))


def assert_outputs_equal(a, b, atol=0.0):
  check = (
      np.testing.assert_array_equal
      if atol == 0
      else lambda u, v: np.testing.assert_allclose(u, v, rtol=0, atol=atol)
  )
  check(np.asarray(a.eps), np.asarray(b.eps))
  assert len(a.features) == len(b.features)
  for u, v in zip(a.features, b.features):
    check(np.asarray(u), np.asarray(v))


# ---------------------------------------------------------------------------------------------
# Table indexing and the blend


def test_blend_weights():
  table = jnp.asarray(np.random.default_rng(0).uniform(size=(100, 3)), jnp.float32)
  t = jnp.array([0, 9, 10, 555, 999])
  a = np.asarray(tbs.blend_weights(table, t, jnp.array(True), 1000))
  np.testing.assert_array_equal(a, np.asarray(table)[[0, 0, 1, 55, 99]])
  np.testing.assert_array_equal(
      np.asarray(tbs.blend_weights(table, t, jnp.array(False), 1000)), np.zeros((5, 3))
  )
  valid = jnp.array([True, False, True, False, True])
  a = np.asarray(tbs.blend_weights(table, t, valid, 1000))
  np.testing.assert_array_equal(a[[1, 3]], 0.0)
  np.testing.assert_array_equal(a[[0, 2, 4]], np.asarray(table)[[0, 1, 99]])


def test_blend_formula_and_stop_gradient():
  rng = np.random.default_rng(1)
  h, c = rng.standard_normal((2, 3, 4, 4, 5)).astype(np.float32)
  a = np.array([0.0, 0.3, 1.0], np.float32)
  got = np.asarray(tbs.blend(jnp.asarray(h), jnp.asarray(c), jnp.asarray(a)))
  ar = a[:, None, None, None]
  np.testing.assert_allclose(got, (1 - ar) * h + ar * c, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[0], h[0])  # a = 0: exactly h
  np.testing.assert_array_equal(got[2], c[2])  # a = 1: exactly the cache
  g = rng.standard_normal(h.shape).astype(np.float32)
  gh, gc, ga = jax.grad(lambda hh, cc, aa: jnp.sum(tbs.blend(hh, cc, aa) * g), argnums=(0, 1, 2))(
      jnp.asarray(h), jnp.asarray(c), jnp.asarray(a)
  )
  np.testing.assert_allclose(np.asarray(gh), (1 - ar) * g, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(gc), 0.0)
  np.testing.assert_allclose(np.asarray(ga), ((c - h) * g).sum((1, 2, 3)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The cached forward of the U-Net


def test_zero_table_cached_forward_equals_plain_forward(micro_bidm):
  x, t = tiny_inputs(MICRO_SHAPE, seed=1)
  params = with_table(micro_bidm.params, np.zeros((100, N)))
  cache = random_cache(micro_bidm, x, t, seed=2)
  plain = micro_bidm.apply(params, x, t)
  cached = micro_bidm.apply_cache(params, x, t, cache)
  assert_outputs_equal(cached, plain)


def test_invalid_cache_is_the_identity(micro_bidm):
  x, t = tiny_inputs(MICRO_SHAPE, seed=3)
  cache = random_cache(micro_bidm, x, t, seed=4, valid=False)
  plain = micro_bidm.apply(micro_bidm.params, x, t)
  assert_outputs_equal(micro_bidm.apply_cache(micro_bidm.params, x, t, cache), plain)
  # (per-sample validity is covered by test_blend_weights, without another U-Net compile)


def test_unit_table_connection_features_equal_cache(micro_bidm):
  x, t = tiny_inputs(MICRO_SHAPE, seed=5)
  params = with_table(micro_bidm.params, np.ones((100, N)))
  cache = random_cache(micro_bidm, x, t, seed=6)
  out = micro_bidm.apply_cache(params, x, t, cache)
  plain = micro_bidm.apply(params, x, t)
  assert len(out.connections) == N
  for got, c in zip(out.connections, cache.features):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(c))
  # the blocks before the connection points are untouched
  for got, ref in zip(out.features[:-N], plain.features[:-N]):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  # the eps then depends on the cache only through the last point: a different input gives the
  # same eps (everything after the last connection point reads only the cached feature)
  x2 = x + 1.0
  out2 = micro_bidm.apply_cache(params, x2, t, cache)
  np.testing.assert_allclose(np.asarray(out2.eps), np.asarray(out.eps), rtol=0, atol=1e-6)


def test_first_connection_point_blend_uses_table_row_of_bucket(micro_bidm):
  x, t = tiny_inputs(MICRO_SHAPE, seed=7)
  t = jnp.array([17, 804], jnp.int32)  # buckets 1 and 80
  table = np.random.default_rng(8).uniform(0.1, 0.9, (100, N)).astype(np.float32)
  params = with_table(micro_bidm.params, table)
  cache = random_cache(micro_bidm, x, t, seed=9)
  out = micro_bidm.apply_cache(params, x, t, cache)
  plain = micro_bidm.apply(params, x, t)
  a = table[[1, 80], 0][:, None, None, None]
  expected = (1 - a) * np.asarray(plain.connections[0]) + a * np.asarray(cache.features[0])
  np.testing.assert_allclose(np.asarray(out.connections[0]), expected, rtol=1e-5, atol=1e-5)


def test_no_gradient_into_cache(micro_bidm):
  x, t = tiny_inputs(MICRO_SHAPE, seed=10)
  cache = random_cache(micro_bidm, x, t, seed=11)
  g = jnp.asarray(np.random.default_rng(12).standard_normal(MICRO_SHAPE), jnp.float32)

  def loss(params, feats):
    out = micro_bidm.model.apply(params, x, t, cache=tbs.TBSCache(feats, cache.valid))
    return jnp.sum(out.eps * g) + sum(jnp.mean(f**2) for f in out.features)

  g_params, g_cache = jax.jit(jax.grad(loss, argnums=(0, 1)))(micro_bidm.params, cache.features)
  for gc in g_cache:
    np.testing.assert_array_equal(np.asarray(gc), 0.0)
  assert np.any(np.asarray(g_params["params"]["tbs_table"]) != 0)


# ---------------------------------------------------------------------------------------------
# The paired-timestep training forward


def paired_inputs(shape, seed):
  rng = np.random.default_rng(seed)
  x_prev, x_t = (jnp.asarray(a, jnp.float32) for a in rng.standard_normal((2,) + shape))
  t = jnp.asarray([3, 999][: shape[0]] + [500] * (shape[0] - 2), jnp.int32)
  t_prev = jnp.minimum(t + 1, 999)
  return x_prev, t_prev, x_t, t


def test_paired_forward_equals_two_explicit_calls(micro_bidm):
  model, params = micro_bidm.model, micro_bidm.params
  x_prev, t_prev, x_t, t = paired_inputs(MICRO_SHAPE, seed=13)
  apply_fn = lambda p, x, tt, cache, rng: model.apply(p, x, tt, cache=cache)
  paired = jax.jit(lambda p, r, tp: tbs.paired_timestep_forward(apply_fn, p, x_prev, tp, x_t, t, r))
  # t' = min(t + 1, T - 1) as in training, and a distant t' (a binary model's output barely
  # moves between t and t + 1, so only the latter shows that the first pass runs at t')
  for tp in (t_prev, jnp.asarray([403, 10], jnp.int32)):
    out = paired(params, jax.random.key(0), tp)
    first = micro_bidm.apply(params, x_prev, tp)  # at t', no cache
    cache = tbs.TBSCache(first.connections, jnp.ones((), bool))
    second = micro_bidm.apply_cache(params, x_t, t, cache)
    assert_outputs_equal(out, second, atol=1e-5)
  # the cache did matter, and so did t'
  alone = micro_bidm.apply(params, x_t, t)
  assert not np.allclose(np.asarray(out.eps), np.asarray(alone.eps), atol=1e-4)
  adjacent = paired(params, jax.random.key(0), t_prev)
  assert not np.allclose(np.asarray(out.eps), np.asarray(adjacent.eps), atol=1e-4)


def test_paired_forward_gradient_equals_explicit_stop_gradient(micro_bidm):
  model, params = micro_bidm.model, micro_bidm.params
  x_prev, t_prev, x_t, t = paired_inputs(MICRO_SHAPE, seed=14)
  noise = jnp.asarray(np.random.default_rng(15).standard_normal(MICRO_SHAPE), jnp.float32)
  apply_fn = lambda p, x, tt, cache, rng: model.apply(p, x, tt, cache=cache)

  def loss_of(out):
    return jnp.mean((out.eps - noise) ** 2) + 0.1 * sum(jnp.mean(f**2) for f in out.features)

  def paired_loss(p):
    return loss_of(
        tbs.paired_timestep_forward(apply_fn, p, x_prev, t_prev, x_t, t, jax.random.key(1))
    )

  def explicit_loss(p):
    first = model.apply(p, x_prev, t_prev)
    cache = tbs.TBSCache(
        tuple(jax.lax.stop_gradient(f) for f in first.connections), jnp.ones((), bool)
    )
    return loss_of(model.apply(p, x_t, t, cache=cache))

  lp, gp = jax.jit(jax.value_and_grad(paired_loss))(params)
  le, ge = jax.jit(jax.value_and_grad(explicit_loss))(params)
  np.testing.assert_allclose(float(lp), float(le), rtol=1e-5)
  flat_p = jax.tree_util.tree_flatten_with_path(gp)[0]
  flat_e = dict(jax.tree_util.tree_flatten_with_path(ge)[0])
  assert len(flat_p) == len(flat_e)
  for path, g in flat_p:
    np.testing.assert_allclose(
        np.asarray(g),
        np.asarray(flat_e[path]),
        rtol=1e-4,
        atol=1e-6,
        err_msg=jax.tree_util.keystr(path),
    )
  assert np.any(np.asarray(gp["params"]["tbs_table"]) != 0)


# ---------------------------------------------------------------------------------------------
# The release's TBS structure (tbs_structure='release')

RELEASE_CONFIG = dict(
    ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0
)
"""Three levels (16, 8, 4) with attention at level 1, like CIFAR-10's (32, 16, 8, 4) with
attention at 16x16: up_2_upsample enters level 1, up_1_upsample leaves it."""
RELEASE_SHAPE = (2, 16, 16, 3)


@pytest.fixture(scope="module")
def release_bidm():
  model = UNet(
      **RELEASE_CONFIG, method=get_method("bidm"), tbs_connections=5, tbs_structure="release"
  )
  params = {"params": random_params(model, RELEASE_SHAPE, seed=21)}
  apply = jax.jit(
      lambda p, x, t, cache: model.apply(
          p, x, t, cache=cache, capture_intermediates=True, mutable=["intermediates"]
      )
  )
  return model, params, apply


def test_release_structure_names_and_cifar_shapes():
  model = UNet(method=get_method("bidm"), tbs_connections=8, tbs_structure="release")
  assert model.release_connections == ("up_2_upsample", "up_1_upsample")
  assert model.num_connections == 2  # tbs_connections is the 'blocks' count: ignored here
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
  assert variables["params"]["tbs_release_table"].shape == (100, 4)
  assert "tbs_table" not in variables["params"]
  out = jax.eval_shape(model.apply, variables, x, t)
  assert [c.shape for c in out.connections] == [(2, 16, 16, 256), (2, 32, 32, 256)]
  # no TBS without a cross-timestep method
  assert UNet(tbs_structure="release").num_connections == 0


def test_release_zero_table_and_invalid_cache_are_the_identity(release_bidm):
  model, params, apply = release_bidm
  x, t = tiny_inputs(RELEASE_SHAPE, seed=22)
  plain, _ = apply(params, x, t, None)
  assert len(plain.connections) == 2
  np.testing.assert_array_equal(
      np.asarray(plain.connections[1]), np.asarray(plain.points["up_1_upsample"])
  )
  rng = np.random.default_rng(23)
  feats = tuple(jnp.asarray(rng.standard_normal(c.shape), jnp.float32) for c in plain.connections)
  assert np.all(np.asarray(params["params"]["tbs_release_table"]) != 0)  # random, non-zero
  invalid, _ = apply(params, x, t, tbs.TBSCache(feats, jnp.asarray(False)))
  assert_outputs_equal(invalid, plain)
  zero = {"params": dict(params["params"], tbs_release_table=jnp.zeros((100, 3)))}
  assert_outputs_equal(
      apply(zero, x, t, tbs.TBSCache(feats, jnp.asarray(True)))[0], apply(zero, x, t, None)[0]
  )
  # the model's own init is the release's: zero
  init = jax.eval_shape(model.init, jax.random.key(0), x, t)
  assert init["params"]["tbs_release_table"].shape == (100, 3)


def test_release_blends_level1_attention_and_upsample(release_bidm):
  """Level 1's attention outputs blend with the cached up_2_upsample, the up_1_upsample output
  with its own cached output, both with a[bucket(t), 1]; columns 0 and 2 are unused."""
  _, params, apply = release_bidm
  x, _ = tiny_inputs(RELEASE_SHAPE, seed=24)
  t = jnp.array([17, 804], jnp.int32)  # buckets 1 and 80
  table = np.random.default_rng(25).uniform(0.1, 0.9, (100, 3)).astype(np.float32)
  p = {"params": dict(params["params"], tbs_release_table=jnp.asarray(table))}
  rng = np.random.default_rng(26)
  shapes = [(2, 8, 8, 64), (2, 16, 16, 64)]
  feats = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
  out, inter = apply(p, x, t, tbs.TBSCache(feats, jnp.asarray(True)))
  inter = inter["intermediates"]
  a = table[[1, 80], 1][:, None, None, None]
  blend = lambda h, c: (1 - a) * np.asarray(h) + a * np.asarray(c)
  # decoder features: level 2 (2 blocks, the second with up_2_upsample), level 1 (2 blocks, each
  # with attention, the second with up_1_upsample), level 0 (2 blocks)
  dec = out.features[-6:]
  attn0 = inter["up_1_attn_0"]["__call__"][0]
  np.testing.assert_allclose(np.asarray(dec[2]), blend(attn0, feats[0]), rtol=1e-5, atol=1e-5)
  up1 = inter["up_1_upsample"]["__call__"][0]
  np.testing.assert_allclose(np.asarray(dec[3]), blend(up1, feats[1]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.points["up_1_upsample"]), np.asarray(dec[3]))
  np.testing.assert_array_equal(np.asarray(out.connections[1]), np.asarray(dec[3]))
  # up_2_upsample is carried unblended (level 2 >= 2); so are the level-2 blocks
  up2 = inter["up_2_upsample"]["__call__"][0]
  np.testing.assert_array_equal(np.asarray(dec[1]), np.asarray(up2))
  np.testing.assert_array_equal(np.asarray(out.connections[0]), np.asarray(up2))
  # only column 1 of the table matters
  other = table.copy()
  other[:, [0, 2]] = 0.5
  p2 = {"params": dict(params["params"], tbs_release_table=jnp.asarray(other))}
  assert_outputs_equal(apply(p2, x, t, tbs.TBSCache(feats, jnp.asarray(True)))[0], out)


def test_samplers_and_paired_forward_carry_the_models_connections():
  """A model's `connections` (not its last features) are what the next step blends with."""

  def apply_fn(x, t, cache):
    h = jnp.tanh(x) + 1e-3 * t[:, None, None, None].astype(jnp.float32)
    if cache is not None:
      h = tbs.blend(h, cache.features[0], jnp.where(cache.valid, 0.5, 0.0) * jnp.ones(x.shape[0]))
    return UNetOutput(0.5 * h, (x, -x), connections=(h,))

  s, shape = make_schedule(), (2, 4, 4, 1)
  got = ddim_sample(apply_fn, s, shape, jax.random.key(0), steps=4)
  init_key, _ = jax.random.split(jax.random.key(0))
  x = jax.random.normal(init_key, shape, jnp.float32)
  cache = None
  ts = ddim_timesteps(1000, 4)
  for i, ti in enumerate(ts):
    out = apply_fn(x, jnp.full((2,), ti, jnp.int32), cache)
    x = ddim_step(
        s,
        x,
        out.eps,
        jnp.int32(ti),
        jnp.int32(ts[i + 1] if i + 1 < 4 else -1),
        0.0,
        jnp.zeros(shape),
    )
    cache = tbs.TBSCache(out.connections, jnp.ones((), bool))
  np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-5, atol=1e-5)
  paired = tbs.paired_timestep_forward(
      lambda p, x, t, c, r: apply_fn(x, t, c),
      None,
      x,
      jnp.array([5, 6]),
      x + 1,
      jnp.array([4, 5]),
      jax.random.key(1),
  )
  first = apply_fn(x, jnp.array([5, 6]), None)
  second = apply_fn(x + 1, jnp.array([4, 5]), tbs.TBSCache(first.connections, jnp.ones((), bool)))
  np.testing.assert_allclose(np.asarray(paired.eps), np.asarray(second.eps), rtol=1e-6)
