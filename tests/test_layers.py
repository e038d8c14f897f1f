"""BinaryConv / BinaryDense against a direct NumPy float64 implementation of paper section 3.1.

y = conv(sign(x + tau), alpha * sign(W)) * K + b + s * shortcut(x), K = conv(mean_c |x|, k) with
the main conv's stride and padding; shortcut: identity, 2x2 average pool when strided, plus a
full-precision 1x1 conv when the channel count changes. Dense: sign(x + tau) @ (alpha sign W) + b.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fill_params

from bidm_jax.binarize.methods import get_method
from bidm_jax.layers.binary import BinaryConv, BinaryDense, activation_scale_conv

DOWN_PAD = ((0, 1), (0, 1))  # the U-Net's downsample: pad right/bottom by one, stride 2


def np_conv(x, w, stride, pad):
  """Cross-correlation NHWC x HWIO in float64; pad = ((top, bottom), (left, right))."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
      out += patch @ w[i, j]
  return out


def np_pad(padding, kernel):
  if padding == "SAME":
    return tuple(((k - 1) // 2, k // 2) for k in kernel)
  return padding


def np_sign(v):
  return np.where(np.asarray(v) >= 0, 1.0, -1.0)


def np_binary_conv(p, x, kernel_size, stride, padding, learnable_k):
  """Paper section 3.1 in float64. p: the layer's params (NumPy); x: (B, H, W, Cin) float32."""
  pad = np_pad(padding, kernel_size)
  kh, kw = kernel_size
  w = np.asarray(p["kernel"], np.float64)
  cout = w.shape[-1]
  xb = np_sign(x + np.asarray(p["threshold"], np.float32))  # x + tau rounded as in float32
  alpha = np.abs(w).reshape(-1, cout).mean(0)
  wb = alpha * np_sign(w)
  k = (
      np.asarray(p["scale_kernel"], np.float64)
      if learnable_k
      else np.full((kh, kw, 1, 1), 1.0 / (kh * kw))
  )
  a = np.abs(np.asarray(x, np.float64)).mean(-1, keepdims=True)
  y = np_conv(xb, wb, stride, pad) * np_conv(a, k, stride, pad) + np.asarray(p["bias"])
  sc = np.asarray(x, np.float64)
  if stride == 2:
    b, h, wd, c = sc.shape
    sc = sc.reshape(b, h // 2, 2, wd // 2, 2, c).mean((2, 4))
  if sc.shape[-1] != cout:
    sc = sc @ np.asarray(p["shortcut_kernel"], np.float64)[0, 0]
  return y + float(p["shortcut_scale"]) * sc


def random_layer_params(layer, x, seed):
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
  return fill_params(shapes, seed)


CONV_CASES = [
    # (kernel, stride, padding, cin, cout)
    ((3, 3), 1, "SAME", 8, 8),
    ((3, 3), 2, DOWN_PAD, 8, 8),
    ((3, 3), 1, "SAME", 8, 16),
    ((3, 3), 2, DOWN_PAD, 8, 16),
    ((1, 1), 1, "SAME", 8, 8),
    ((1, 1), 1, "SAME", 16, 8),
]
CASE_IDS = ["s1", "s2", "s1-chan", "s2-chan", "1x1", "1x1-chan"]


@pytest.mark.parametrize("method_name", ["xnor", "bidm"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_binary_conv_matches_numpy(case, method_name):
  kernel, stride, padding, cin, cout = case
  method = get_method(method_name)
  layer = BinaryConv(cout, kernel, strides=stride, padding=padding, method=method)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, cin)).astype(np.float32)
  x[0, 0, 0, :3] = 0.0
  variables = random_layer_params(layer, jnp.asarray(x), seed=1)
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  # every term present with random non-zero values
  expected_names = {"kernel", "bias", "threshold", "shortcut_scale"}
  expected_names |= {"scale_kernel"} if method.learnable_k else set()
  expected_names |= {"shortcut_kernel"} if cin != cout else set()
  assert set(p) == expected_names
  y = np.asarray(jax.jit(layer.apply)(variables, jnp.asarray(x)))
  ref = np_binary_conv(p, x, kernel, stride, padding, method.learnable_k)
  assert y.shape == ref.shape == (2, 8 // stride, 8 // stride, cout)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_binary_conv_default_init():
  """Spec: tau init 0, k init 1/(kh kw), s init 0 (CIFAR); bias 0."""
  layer = BinaryConv(16, strides=2, padding=DOWN_PAD, method=get_method("bidm"))
  p = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 8)))["params"]
  np.testing.assert_array_equal(np.asarray(p["threshold"]), np.zeros(8))
  np.testing.assert_allclose(np.asarray(p["scale_kernel"]), np.full((3, 3, 1, 1), 1 / 9))
  assert float(p["shortcut_scale"]) == 0.0
  np.testing.assert_array_equal(np.asarray(p["bias"]), np.zeros(16))
  assert p["shortcut_kernel"].shape == (1, 1, 8, 16)


def _grads(layer, variables, x, g):
  return jax.grad(lambda v: jnp.sum(layer.apply(v, x) * g))(variables)["params"]


@pytest.mark.parametrize("method_name", ["xnor", "bidm"])
def test_binary_conv_gradients(method_name):
  """Which params get gradient, and the kernel/threshold gradients in closed form."""
  method = get_method(method_name)
  layer = BinaryConv(16, strides=2, padding=DOWN_PAD, method=method)
  rng = np.random.default_rng(2)
  x = (0.7 * rng.standard_normal((2, 8, 8, 8))).astype(np.float32)
  variables = random_layer_params(layer, jnp.asarray(x), seed=3)
  w = np.array(variables["params"]["kernel"])
  w[0, 0, 0, :4] = [1.0, -1.0, 1.5, -2.0]  # clip borders and outside
  variables["params"]["kernel"] = jnp.asarray(w)
  g = rng.standard_normal((2, 4, 4, 16)).astype(np.float32)
  grads = jax.jit(lambda v: _grads(layer, v, jnp.asarray(x), g))(variables)

  names = set(grads)
  assert ("scale_kernel" in names) == method.learnable_k
  for name, gr in grads.items():
    assert np.any(np.asarray(gr) != 0), f"{name} gets no gradient"

  # Closed form: with G_wb, G_xb the cotangents of the binarized weight / activation,
  # dL/dW = alpha * 1[|W| <= 1] * G_wb and dL/dtau[c] = sum G_xb * ApproxSign'(x + tau).
  p = variables["params"]
  tau = p["threshold"]
  k = p["scale_kernel"] if method.learnable_k else jnp.full((3, 3, 1, 1), 1 / 9)
  conv = lambda a, b: jax.lax.conv_general_dilated(
      a, b, (2, 2), DOWN_PAD, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  xj = jnp.asarray(x)
  K = conv(jnp.mean(jnp.abs(xj), -1, keepdims=True), k)
  inner = lambda xb, wb: jnp.sum(conv(xb, wb) * K * g)
  alpha = np.abs(w).reshape(-1, 16).mean(0)
  xb = jnp.where(xj + tau >= 0, 1.0, -1.0)
  wb = jnp.asarray(alpha * np_sign(w), jnp.float32)
  g_xb, g_wb = jax.grad(inner, argnums=(0, 1))(xb, wb)
  np.testing.assert_allclose(
      np.asarray(grads["kernel"]), alpha * (np.abs(w) <= 1) * np.asarray(g_wb), rtol=1e-4, atol=1e-6
  )
  assert np.all(np.asarray(grads["kernel"])[np.abs(w) > 1] == 0)
  z = x + np.asarray(tau)
  dz = np.select([(z >= -1) & (z < 0), (z >= 0) & (z < 1)], [2 + 2 * z, 2 - 2 * z], 0.0)
  np.testing.assert_allclose(
      np.asarray(grads["threshold"]), (np.asarray(g_xb) * dz).sum((0, 1, 2)), rtol=1e-4, atol=1e-5
  )
  # bias and shortcut scale by autodiff of a linear term
  np.testing.assert_allclose(np.asarray(grads["bias"]), g.sum((0, 1, 2)), rtol=1e-5)
  sc = np_binary_conv(
      {
          **jax.tree_util.tree_map(np.asarray, p),
          "shortcut_scale": 1.0,
          "bias": np.zeros(16),
          "kernel": np.zeros_like(w),
      },
      x,
      (3, 3),
      2,
      DOWN_PAD,
      method.learnable_k,
  )  # = shortcut(x) (binary term is 0)
  np.testing.assert_allclose(float(grads["shortcut_scale"]), float((sc * g).sum()), rtol=1e-4)


def test_xnor_has_fixed_k_and_fp_has_only_kernel_bias():
  x = jnp.ones((1, 8, 8, 8))
  xnor = random_layer_params(BinaryConv(8, method=get_method("xnor")), x, 0)["params"]
  assert "scale_kernel" not in xnor
  assert (
      "scale_kernel"
      in random_layer_params(BinaryConv(8, method=get_method("xnor", learnable_k=True)), x, 0)[
          "params"
      ]
  )
  fp = random_layer_params(BinaryConv(16, strides=2, padding=DOWN_PAD), x, 0)["params"]
  assert set(fp) == {"kernel", "bias"}


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, DOWN_PAD)])
def test_fp_conv_is_plain_conv(stride, padding):
  layer = BinaryConv(12, strides=stride, padding=padding)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 8, 8, 5)).astype(np.float32)
  variables = random_layer_params(layer, jnp.asarray(x), seed=5)
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  y = np.asarray(layer.apply(variables, jnp.asarray(x)))
  ref = np_conv(x, p["kernel"], stride, np_pad(padding, (3, 3))) + p["bias"]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  grads = _grads(layer, variables, jnp.asarray(x), np.ones_like(y))
  assert set(grads) == {"kernel", "bias"}


# ---------------------------------------------------------------------------------------------
# Dense


@pytest.mark.parametrize("method_name", ["xnor", "bidm"])
@pytest.mark.parametrize("x_shape", [(4, 16), (2, 3, 16)])
def test_binary_dense_matches_numpy(method_name, x_shape):
  layer = BinaryDense(8, method=get_method(method_name))
  rng = np.random.default_rng(6)
  x = rng.standard_normal(x_shape).astype(np.float32)
  variables = random_layer_params(layer, jnp.asarray(x), seed=7)
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  assert set(p) == {"kernel", "bias", "threshold"}  # no activation scale or shortcut
  y = np.asarray(jax.jit(layer.apply)(variables, jnp.asarray(x)))
  w = p["kernel"].astype(np.float64)
  alpha = np.abs(w).mean(0)
  ref = np_sign(x + p["threshold"]) @ (alpha * np_sign(w)) + p["bias"]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

  g = rng.standard_normal(y.shape).astype(np.float32)
  grads = jax.grad(lambda v: jnp.sum(layer.apply(v, jnp.asarray(x)) * g))(variables)["params"]
  xb = np_sign(x + p["threshold"]).reshape(-1, 16)
  g2 = g.reshape(-1, 8)
  np.testing.assert_allclose(
      np.asarray(grads["kernel"]), alpha * (np.abs(w) <= 1) * (xb.T @ g2), rtol=1e-4, atol=1e-6
  )
  z = (x + p["threshold"]).reshape(-1, 16)
  dz = np.select([(z >= -1) & (z < 0), (z >= 0) & (z < 1)], [2 + 2 * z, 2 - 2 * z], 0.0)
  np.testing.assert_allclose(
      np.asarray(grads["threshold"]),
      ((g2 @ (alpha * np_sign(w)).T) * dz).sum(0),
      rtol=1e-4,
      atol=1e-5,
  )


def test_fp_dense_is_plain_dense():
  layer = BinaryDense(8)
  x = np.random.default_rng(8).standard_normal((4, 16)).astype(np.float32)
  variables = random_layer_params(layer, jnp.asarray(x), seed=9)
  p = variables["params"]
  assert set(p) == {"kernel", "bias"}
  y = np.asarray(layer.apply(variables, jnp.asarray(x)))
  np.testing.assert_allclose(
      y, x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"]), rtol=1e-5, atol=1e-5
  )


def test_binary_conv_bf16_compute():
  layer = BinaryConv(8, method=get_method("bidm"), dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(10).standard_normal((1, 8, 8, 8)), jnp.float32)
  variables = random_layer_params(layer, x, seed=11)
  y = layer.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  ref = np_binary_conv(
      jax.tree_util.tree_map(np.asarray, variables["params"]),
      np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)),
      (3, 3),
      1,
      "SAME",
      True,
  )
  # bf16 rounding of x + tau may flip the odd near-zero sign; everything else agrees closely
  close = np.abs(np.asarray(y.astype(jnp.float32)) - ref) <= 0.05 + 0.02 * np.abs(ref)
  assert close.mean() > 0.97, close.mean()


# ---------------------------------------------------------------------------------------------
# binary_bias=False: the release's binary layers without the real bias


@pytest.mark.parametrize("method_name", ["xnor", "bidm", "xnorpp"])
def test_binary_bias_false_drops_the_bias(method_name):
  """The output is the default layer's minus b, the 'bias' parameter stays (unused, zero
  gradient) and is no longer counted as stored; FP layers keep their bias."""
  keep, drop = get_method(method_name), get_method(method_name, binary_bias=False)
  assert keep.binary_bias and not drop.binary_bias
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 8)), jnp.float32)
  xd = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
  for layer_cls, inp, cout in ((BinaryConv, x, 16), (BinaryDense, xd, 8)):
    with_b, without_b = layer_cls(cout, method=keep), layer_cls(cout, method=drop)
    variables = random_layer_params(with_b, inp, seed=11)
    assert "bias" in variables["params"]
    assert jax.tree_util.tree_structure(
        random_layer_params(without_b, inp, seed=11)
    ) == jax.tree_util.tree_structure(variables)
    bias = np.asarray(variables["params"]["bias"])
    assert np.abs(bias).min() > 0
    y_keep = np.asarray(with_b.apply(variables, inp))
    y_drop = np.asarray(without_b.apply(variables, inp))
    np.testing.assert_allclose(y_drop, y_keep - bias, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda v: jnp.sum(without_b.apply(v, inp) ** 2))(variables)["params"]
    np.testing.assert_array_equal(np.asarray(grads["bias"]), np.zeros(cout))
    costs = [
        np.asarray(
            jax.tree_util.tree_leaves(
                layer.apply({"params": variables["params"]}, inp, mutable=["costs"])[1]["costs"]
            )[0]
        )
        for layer in (with_b, without_b)
    ]
    assert costs[0][3] - costs[1][3] == cout  # real_params: the bias is not stored
    np.testing.assert_array_equal(costs[0][:3], costs[1][:3])
  fp = BinaryConv(16, method=get_method("fp", binary_bias=False))
  variables = random_layer_params(fp, x, seed=12)
  np.testing.assert_allclose(
      np.asarray(fp.apply(variables, x)), np.asarray(BinaryConv(16).apply(variables, x)), rtol=1e-6
  )


def test_binary_bias_from_config():
  from bidm_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  c = config_lib.default_config()
  assert config_lib.method_from_config(c).binary_bias
  c.binarization.binary_bias = False
  assert not config_lib.method_from_config(c).binary_bias
  c.binarization.fp_init = "none"
  assert config_lib.method_from_config(c).fp_init == "none"


# ---------------------------------------------------------------------------------------------
# width_shortcut='none': the paper's Table 4 layout, no shortcut where the width changes


def test_width_shortcut_none():
  """A conv that changes width loses exactly its real 1x1 shortcut and s: its output is the
  'conv' layer's with s = 0, and it records no shortcut cost. A conv that keeps its width is
  the 'conv' layer, parameters and output."""
  conv, none = get_method("bidm"), get_method("bidm", width_shortcut="none")
  x = jnp.asarray(np.random.default_rng(13).standard_normal((2, 8, 8, 8)), jnp.float32)
  p = random_layer_params(BinaryConv(16, method=conv), x, seed=14)["params"]
  kept = random_layer_params(BinaryConv(16, method=none), x, seed=14)["params"]
  assert set(p) - set(kept) == {"shortcut_kernel", "shortcut_scale"} and set(kept) < set(p)
  y, state = BinaryConv(16, method=none).apply(
      {"params": {k: p[k] for k in kept}}, x, mutable=["costs"]
  )
  y_conv = BinaryConv(16, method=conv).apply({"params": {**p, "shortcut_scale": jnp.zeros(())}}, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_conv))
  assert set(state["costs"]) == {"layer"}
  square = random_layer_params(BinaryConv(8, method=conv), x, seed=15)
  assert jax.tree_util.tree_structure(
      random_layer_params(BinaryConv(8, method=none), x, seed=15)
  ) == jax.tree_util.tree_structure(square)
  np.testing.assert_array_equal(
      np.asarray(BinaryConv(8, method=none).apply(square, x)),
      np.asarray(BinaryConv(8, method=conv).apply(square, x)),
  )


@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [
        ((2, 9, 9, 1), (3, 3), 1, "SAME"),
        ((2, 8, 8, 1), (3, 3), 2, ((0, 1), (0, 1))),  # the U-Net's downsample
        ((2, 8, 8, 1), (3, 3), 2, "SAME"),
        ((2, 9, 8, 1), (3, 3), 2, "VALID"),
        ((3, 7, 6, 1), (1, 1), 1, "VALID"),
    ],
)
def test_activation_scale_conv_is_the_single_channel_conv(shape, kernel, stride, padding):
  """K = conv(A, k) as a sum of shifted slices equals lax's convolution, values and both
  gradients, to float32 rounding; in bf16 it is at least as close to the f32 result."""
  a = jax.random.uniform(jax.random.PRNGKey(0), shape)
  k = jax.random.normal(jax.random.PRNGKey(1), (*kernel, 1, 1))

  def conv(a, k):
    return jax.lax.conv_general_dilated(
        a, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def scalar(f):
    return lambda a, k: jnp.sum(jnp.sin(f(a, k)))

  ours = lambda a, k: activation_scale_conv(a, k, stride, padding)
  np.testing.assert_allclose(ours(a, k), conv(a, k), rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.grad(scalar(ours), (0, 1))(a, k), jax.grad(scalar(conv), (0, 1))(a, k)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  low = ours(a.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  exact = conv(
      a.astype(jnp.bfloat16).astype(jnp.float32), k.astype(jnp.bfloat16).astype(jnp.float32)
  )
  lax_low = conv(a.astype(jnp.bfloat16), k.astype(jnp.bfloat16)).astype(jnp.float32)
  assert (
      float(jnp.max(jnp.abs(low.astype(jnp.float32) - exact)))
      <= float(jnp.max(jnp.abs(lax_low - exact))) + 1e-6
  )
