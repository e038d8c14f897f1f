"""Sign functions, their gradient estimators, the binarizers and their registry.

Paper section 3.1: sign(0) = +1; weights alpha[o] sign(W), alpha = mean|W[..., o]| stop-gradient,
clipped-identity backward (1 where |W| <= 1); activations sign(x + tau) with ApproxSign backward
(2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bidm_jax.binarize import binarizers as B
from bidm_jax.binarize import estimators as E
from bidm_jax.binarize.methods import get_method
from bidm_jax.layers.binary import BinaryConv

DTYPES = (jnp.float32, jnp.bfloat16)

SIGNS = {
    "hard_sign": E.hard_sign,
    "ste": E.sign_ste,
    "approx": E.sign_approx,
    "identity": E.sign_identity,
    "reste_o1": lambda x: E.sign_reste(x, jnp.float32(1.0)),
    "reste_o3": lambda x: E.sign_reste(x, jnp.float32(3.0)),
}


def special_values(dtype):
  """Values around zero and at the extremes (normal numbers only), with the expected sign."""
  fi = jnp.finfo(dtype)
  tiny, big = float(fi.tiny), float(fi.max)
  vals = [
      0.0,
      -0.0,
      tiny,
      -tiny,
      1e-30,
      -1e-30,
      1e-3,
      -1e-3,
      0.5,
      -0.5,
      1.0,
      -1.0,
      3.0,
      -3.0,
      big,
      -big,
      np.inf,
      -np.inf,
  ]
  x = np.array(vals, np.float32)
  expected = np.where(x >= 0, 1.0, -1.0)  # -0.0 >= 0: sign(-0.0) = +1 like sign(0)
  return jnp.asarray(x, dtype), expected


# ---------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(SIGNS))
def test_sign_forward_is_plus_minus_one(name, dtype):
  fn = SIGNS[name]
  x, expected = special_values(dtype)
  for f in (fn, jax.jit(fn)):
    y = f(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    y = np.asarray(y.astype(jnp.float32))
    assert not np.any(y == 0)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_sign_of_subnormals_is_never_zero(dtype):
  # XLA on CPU (and GPU) flushes subnormals to zero, so a negative subnormal may come out as
  # +1 (the sign of -0.0); the binarizer must still never return 0.
  x = jnp.asarray(np.array([1e-40, -1e-40, 1e-45, -1e-45], np.float32), dtype)
  for fn in SIGNS.values():
    y = np.asarray(jax.jit(fn)(x).astype(jnp.float32))
    assert set(np.unique(y)) <= {-1.0, 1.0}


def test_sign_forward_random_matches_numpy():
  x = np.random.default_rng(0).standard_normal((4, 5, 6)).astype(np.float32)
  for fn in SIGNS.values():
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(x))), np.where(x >= 0, 1.0, -1.0))


def test_sign_under_vmap_and_jit():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 7)), jnp.float32)
  x = x.at[0, 0].set(0.0)
  for fn in SIGNS.values():
    y = jax.jit(jax.vmap(fn))(x)
    np.testing.assert_array_equal(np.asarray(y), np.where(np.asarray(x) >= 0, 1.0, -1.0))


# ---------------------------------------------------------------------------------------------
# Gradients: closed forms written out per interval, evaluated in float64.

GRAD_POINTS = np.array(
    [
        -3.0,
        -1.5,
        -1.0001,
        -1.0,
        -0.999,
        -0.75,
        -0.5,
        -0.25,
        -1e-3,
        -0.0,
        0.0,
        1e-3,
        0.25,
        0.5,
        0.75,
        0.999,
        1.0,
        1.0001,
        1.5,
        3.0,
    ],
    np.float32,
)


def approx_sign_grad(x):
  x = np.asarray(x, np.float64)
  return np.select([(x >= -1) & (x < 0), (x >= 0) & (x < 1)], [2 + 2 * x, 2 - 2 * x], 0.0)


def clipped_identity_grad(x):
  return (np.abs(np.asarray(x, np.float64)) <= 1).astype(np.float64)


def reste_grad(x, o):
  """ReSTE (estimators.sign_reste docstring): t = 1.5, m = 0.1."""
  x32 = np.asarray(x, np.float32)
  ax = np.abs(x32).astype(np.float64)
  m = float(np.float32(0.1))  # the interval border compares in float32
  power = (1.0 / o) * np.maximum(ax, 1e-30) ** (1.0 / o - 1.0)
  secant = m ** (1.0 / o) / m
  return np.where(ax <= m, secant, np.where(ax <= 1.5, power, 0.0))


def elementwise_grad(fn, x):
  return np.asarray(jax.vmap(jax.grad(lambda v: fn(v)))(jnp.asarray(x)), np.float64)


@pytest.mark.parametrize(
    "name,closed",
    [
        ("ste", clipped_identity_grad),
        ("approx", approx_sign_grad),
        ("identity", lambda x: np.ones_like(np.asarray(x, np.float64))),
    ],
)
def test_estimator_gradient_closed_form(name, closed):
  fn = E.get_estimator(name)
  expected = closed(GRAD_POINTS)
  np.testing.assert_allclose(elementwise_grad(fn, GRAD_POINTS), expected, rtol=1e-6, atol=1e-6)
  # chain rule with an upstream cotangent, under jit
  g = np.random.default_rng(0).standard_normal(GRAD_POINTS.shape).astype(np.float32)
  got = jax.jit(jax.grad(lambda v: jnp.sum(fn(v) * g)))(jnp.asarray(GRAD_POINTS))
  np.testing.assert_allclose(np.asarray(got), g * expected, rtol=1e-6, atol=1e-6)


def test_estimator_gradient_borders():
  """The borders spelled out: ApproxSign 0 at -1, 2 at 0 (and -0.0), 0 at +1; STE 1 at +-1."""
  pts = jnp.array([-1.0, -0.0, 0.0, 1.0], jnp.float32)
  np.testing.assert_array_equal(elementwise_grad(E.sign_approx, pts), [0.0, 2.0, 2.0, 0.0])
  np.testing.assert_array_equal(elementwise_grad(E.sign_ste, pts), [1.0, 1.0, 1.0, 1.0])
  outside = jnp.array([-1.0001, 1.0001], jnp.float32)
  np.testing.assert_array_equal(elementwise_grad(E.sign_ste, outside), [0.0, 0.0])
  np.testing.assert_array_equal(elementwise_grad(E.sign_approx, outside), [0.0, 0.0])
  np.testing.assert_allclose(elementwise_grad(E.sign_approx, jnp.array([-0.5, 0.5])), [1.0, 1.0])


@pytest.mark.parametrize("o", [1.0, 2.0, 3.0])
def test_reste_gradient_closed_form(o):
  pts = np.concatenate(
      [GRAD_POINTS, np.array([-0.1, 0.1, -0.05, 0.05, 1.49, 1.51, -1.51], np.float32)]
  )
  fn = lambda v: E.sign_reste(v, jnp.float32(o))
  np.testing.assert_allclose(elementwise_grad(fn, pts), reste_grad(pts, o), rtol=1e-5)
  # o itself gets no gradient
  go = jax.grad(lambda oo: jnp.sum(E.sign_reste(jnp.asarray(pts), oo)))(jnp.float32(o))
  assert float(go) == 0.0


def test_reste_special_cases():
  # o = 1: the identity STE clipped at 1.5
  pts = jnp.array([-1.6, -1.5, -0.05, 0.0, 0.7, 1.5, 1.6], jnp.float32)
  fn1 = lambda v: E.sign_reste(v, jnp.float32(1.0))
  np.testing.assert_allclose(elementwise_grad(fn1, pts), [0, 1, 1, 1, 1, 1, 0], rtol=1e-6)
  # o = 2: secant 0.1^(1/2) / 0.1 near zero, 0.5 |x|^(-1/2) beyond
  fn2 = lambda v: E.sign_reste(v, jnp.float32(2.0))
  np.testing.assert_allclose(
      elementwise_grad(fn2, jnp.array([0.0, 0.04, 1.0, -0.25])),
      [10**0.5, 10**0.5, 0.5, 1.0],
      rtol=1e-5,
  )


def test_reste_schedule_grows_with_progress():
  p = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
  o = np.asarray(E.reste_schedule(jnp.asarray(p), 3.0))
  np.testing.assert_allclose(o, 1 + 2 * (1 - np.cos(np.pi / 2 * p)), rtol=1e-6)
  assert o[0] == 1.0 and abs(o[-1] - 3.0) < 1e-6 and np.all(np.diff(o) > 0)
  assert float(E.reste_schedule(1.7, 3.0)) == pytest.approx(3.0)  # clipped progress
  assert float(E.reste_schedule(0.5, 5.0)) == pytest.approx(1 + 4 * (1 - math.cos(math.pi / 4)))


def test_sign_grad_under_jit_vmap_and_bf16():
  x = jnp.asarray(GRAD_POINTS)
  for name, closed in (("ste", clipped_identity_grad), ("approx", approx_sign_grad)):
    fn = E.get_estimator(name)
    got = jax.jit(jax.vmap(jax.grad(fn)))(x)
    np.testing.assert_allclose(np.asarray(got), closed(GRAD_POINTS), atol=1e-6)
    # bf16 inputs: gradient in bf16, same closed form up to bf16 rounding
    xb = x.astype(jnp.bfloat16)
    gb = jax.vmap(jax.grad(fn))(xb)
    assert gb.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(gb.astype(jnp.float32)), closed(np.asarray(xb.astype(jnp.float32))), atol=1e-2
    )


def test_unknown_estimator_raises():
  with pytest.raises(ValueError):
    E.get_estimator("nope")
  with pytest.raises(ValueError):
    E.sign_with_estimator("reste")


# ---------------------------------------------------------------------------------------------
# Weight binarizer


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (1, 1, 6, 3), (7, 4)])
def test_weight_binarizer_is_plus_minus_alpha_per_output_channel(shape):
  rng = np.random.default_rng(0)
  w = (1.3 * rng.standard_normal(shape)).astype(np.float32)
  w.flat[0] = 0.0  # sign(0) = +1
  wb = np.asarray(E.binarize_weight(jnp.asarray(w)), np.float64)
  alpha = np.abs(w.astype(np.float64)).reshape(-1, shape[-1]).mean(0)
  mag = np.abs(wb).reshape(-1, shape[-1])
  # exactly one magnitude per output channel, equal to mean|W[..., o]|
  assert np.all(mag == mag[:1])
  np.testing.assert_allclose(mag[0], alpha, rtol=1e-6)
  np.testing.assert_array_equal(np.sign(wb), np.where(w >= 0, 1.0, -1.0))
  np.testing.assert_allclose(np.asarray(E.weight_scale(jnp.asarray(w))), alpha, rtol=1e-6)


def test_weight_binarizer_gradient_alpha_is_stop_gradient():
  rng = np.random.default_rng(1)
  w = (1.2 * rng.standard_normal((3, 3, 4, 5))).astype(np.float32)
  w[0, 0, 0, :] = [1.0, -1.0, 1.5, -2.0, 0.0]  # borders and outside the clip
  g = rng.standard_normal(w.shape).astype(np.float32)
  grad = np.asarray(jax.grad(lambda v: jnp.sum(E.binarize_weight(v) * g))(jnp.asarray(w)))
  alpha = np.abs(w).reshape(-1, 5).mean(0)
  # alpha * g * 1[|W| <= 1]; a gradient through alpha would add sign(W)/N * sum(g sign W)
  expected = alpha * g * (np.abs(w) <= 1)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  assert np.all(grad[np.abs(w) > 1] == 0)
  # the scale alone passes no gradient at all
  ga = jax.grad(lambda v: jnp.sum(E.weight_scale(v)))(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(ga), 0.0)


def test_weight_binarizer_jit_and_bf16():
  w = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3, 2, 4)), jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(E.binarize_weight)(w)), np.asarray(E.binarize_weight(w))
  )
  wb = E.binarize_weight(w.astype(jnp.bfloat16))
  assert wb.dtype == jnp.bfloat16
  mag = np.abs(np.asarray(wb.astype(jnp.float32))).reshape(-1, 4)
  assert np.all(mag == mag[:1])


# ---------------------------------------------------------------------------------------------
# Activation binarizer


def test_activation_binarizer_forward_and_threshold_gradient():
  rng = np.random.default_rng(3)
  x = (0.8 * rng.standard_normal((2, 5, 5, 6))).astype(np.float32)
  tau = (0.3 * rng.standard_normal((6,))).astype(np.float32)
  g = rng.standard_normal(x.shape).astype(np.float32)
  z = x + tau  # in float32, as the binarizer adds
  y = E.binarize_activation(jnp.asarray(x), jnp.asarray(tau))
  np.testing.assert_array_equal(np.asarray(y), np.where(z >= 0, 1.0, -1.0))

  loss = lambda xx, tt: jnp.sum(E.binarize_activation(xx, tt, E.sign_approx) * g)
  gx, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(tau))
  local = g * approx_sign_grad(z)
  np.testing.assert_allclose(np.asarray(gx), local, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gt), local.sum(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
  assert np.all(np.abs(np.asarray(gt)) > 0)


def test_activation_binarizer_without_threshold_and_dtype():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 8)), jnp.bfloat16)
  y = E.binarize_activation(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(y.astype(jnp.float32)), np.where(np.asarray(x.astype(jnp.float32)) >= 0, 1.0, -1.0)
  )
  y = E.binarize_activation(x, jnp.zeros((8,), jnp.float32))
  assert y.dtype == jnp.bfloat16
  # the 'ste' estimator for activations: clipped identity
  xs = jnp.asarray(GRAD_POINTS)
  got = jax.vmap(jax.grad(lambda v: E.binarize_activation(v, None, E.sign_ste)))(xs)
  np.testing.assert_allclose(np.asarray(got), clipped_identity_grad(GRAD_POINTS))


# ---------------------------------------------------------------------------------------------
# The baselines' binarizers, closed forms


def uniform(shape, lo, hi, seed):
  return np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=lo, maxval=hi))


def np_sign(x):
  return np.where(np.asarray(x) >= 0, 1.0, -1.0)


def test_reste_weight_binarizer_closed_form():
  w = jnp.asarray(uniform((3, 4), -2.0, 2.0, 3), jnp.float32)
  c = uniform((3, 4), -1.0, 1.0, 4)
  o = jnp.float32(2.0)
  sign = E.sign_with_estimator("reste", o)
  wb, vjp = jax.vjp(lambda v: E.binarize_weight_mean(v, sign), w)
  m = np.mean(np.abs(np.asarray(w)))
  np.testing.assert_allclose(np.asarray(wb), m * np_sign(w), rtol=1e-6)
  grad = np.asarray(vjp(jnp.asarray(c, jnp.float32))[0])
  _, sign_vjp = jax.vjp(lambda v: E.sign_reste(v, o), w)
  dsign = np.asarray(sign_vjp(jnp.ones_like(w))[0])  # reste'(w)
  expected = m * dsign * c + np_sign(w) / w.size * np.sum(c * np_sign(w))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_dorefa_quantizers_closed_form():
  x = jnp.array([-0.5, 0.0, 0.2, 0.49, 0.5, 0.7, 1.0, 1.3])
  a, vjp = jax.vjp(E.dorefa_activation, x)
  np.testing.assert_array_equal(np.asarray(a), [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(vjp(jnp.ones_like(x))[0]), [0, 1, 1, 1, 1, 1, 1, 0])
  w = jnp.asarray(uniform((3, 3, 2, 4), -0.3, 0.3, 5), jnp.float32)
  c = jnp.asarray(uniform(w.shape, -1.0, 1.0, 6), jnp.float32)
  wb, vjp = jax.vjp(E.binarize_weight_dorefa, w)
  e = np.mean(np.abs(np.asarray(w)))  # ONE scalar for the whole tensor
  np.testing.assert_allclose(np.asarray(wb), e * np_sign(w), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(vjp(c)[0]), np.asarray(c))  # identity STE, no E


def test_lsq_binarizer_closed_form():
  x = jnp.array([[-2.0, -0.6, -0.3, 0.0, 0.3, 0.6, 2.0]])
  c = jnp.array([[0.5, -1.0, 2.0, 1.0, -0.5, 1.5, 3.0]])
  step = jnp.array([[0.5]])
  y, vjp = jax.vjp(E.lsq_binarize, x, step)
  dx, ds = vjp(c)
  np.testing.assert_array_equal(np.asarray(y), 0.5 * np_sign(x))
  inside = (np.abs(np.asarray(x)) <= 0.5).astype(np.float64)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(c) * inside)
  expected_ds = np.sum(np.asarray(c) * (np_sign(x) - np.asarray(x) / 0.5 * inside))
  np.testing.assert_allclose(np.asarray(ds), [[expected_ds]], rtol=1e-6)


def test_timestep_bucket():
  """The row of TBS's blend table and of TALSQ's step table: t * buckets // T, clipped."""
  t = jnp.arange(1000)
  np.testing.assert_array_equal(np.asarray(E.timestep_bucket(t, 100, 1000)), np.arange(1000) // 10)
  np.testing.assert_array_equal(
      np.asarray(E.timestep_bucket(jnp.arange(500), 100, 500)), np.arange(500) // 5
  )
  np.testing.assert_array_equal(
      np.asarray(E.timestep_bucket(t, 8, 1000)), np.arange(1000) * 8 // 1000
  )
  np.testing.assert_array_equal(
      np.asarray(E.timestep_bucket(jnp.array([999, 1000, 5000]), 100, 1000)), [99, 99, 99]
  )  # clipped


# ---------------------------------------------------------------------------------------------
# The registry


class HalfSignWeights(B.WeightBinarizer):
  """sign(W) / 2: a binarizer defined outside the package, for the registry test."""

  name = "half_sign"
  scale = "tensor"

  def __call__(self, module, kernel, sign):
    return 0.5 * sign(kernel)


def test_a_registered_binarizer_runs_in_a_layer():
  """One class and one registration: a method names it, a layer runs and counts it."""
  B.WEIGHT_BINARIZERS.register(HalfSignWeights)
  try:
    method = get_method(
        "xnor", weight_binarizer="half_sign", activation_scale="none", shortcut=False
    )
    assert isinstance(method.binarizers.weight, HalfSignWeights)
    with pytest.raises(ValueError, match="already registered"):
      B.WEIGHT_BINARIZERS.register(HalfSignWeights)
    layer = BinaryConv(4, (1, 1), method=method)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, 5, 3)), jnp.float32)
    params = dict(layer.init(jax.random.key(0), x)["params"])
    assert set(params) == {"kernel", "bias", "threshold"}
    params["threshold"] = jnp.asarray([0.3, -0.2, 0.1])
    params["bias"] = jnp.asarray([0.5, -0.5, 1.0, 0.0])
    y, state = layer.apply({"params": params}, x, mutable=["costs"])
    w = np_sign(params["kernel"][0, 0])
    expected = np_sign(np.asarray(x) + np.asarray(params["threshold"])) @ (0.5 * w)
    np.testing.assert_allclose(np.asarray(y), expected + np.asarray(params["bias"]), atol=1e-6)
    # bops, flops (one scale multiply per output), binary and real (bias, threshold, scale)
    costs = np.asarray(jax.tree_util.tree_leaves(state["costs"])[0])
    np.testing.assert_array_equal(costs, [25 * 3 * 4, 25 * 4, 3 * 4, 4 + 3 + 1])
  finally:
    del B.WEIGHT_BINARIZERS[HalfSignWeights.name]
  with pytest.raises(ValueError, match="unknown weight_binarizer 'half_sign'"):
    get_method("xnor", weight_binarizer="half_sign")


@pytest.mark.parametrize(
    "registry",
    [B.WEIGHT_BINARIZERS, B.ACTIVATION_BINARIZERS, B.OUTPUT_SCALES],
    ids=lambda r: r.kind,
)
def test_unknown_name_is_a_one_line_error(registry):
  with pytest.raises(ValueError) as e:
    get_method("xnor", **{registry.kind: "ternary"})
  message = str(e.value)
  assert "\n" not in message
  assert message == f"unknown {registry.kind} 'ternary'; registered: {', '.join(registry)}"
  with pytest.raises(ValueError, match="unknown"):
    registry["ternary"]  # pylint: disable=pointless-statement
