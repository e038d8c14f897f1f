"""The W1A1 baselines as binarization methods (issue 4).

The binary layers' outputs as exact multiples of each method's scales (forward and gradient;
the binarizers' own closed forms are in test_binarizers.py), a short QAT run of every method on a
tiny U-Net, ReSTE's schedule, EfficientDM's timestep-aware steps, the cost records, and the
registry (names, docs, the BiDM ablations as overrides).
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import MICRO_SHAPE, MICRO_UNET, random_params, tiny_inputs

from bidm_jax import config as config_lib
from bidm_jax.binarize import estimators as est
from bidm_jax.binarize.methods import (
    ACTIVATION_MEAN_ABS,
    FP_INITS,
    METHOD_DOCS,
    METHODS,
    QuantContext,
    get_method,
    recorded_fields,
)
from bidm_jax.layers.binary import BinaryConv, BinaryDense
from bidm_jax.models.unet import UNet

BINARY_METHODS = [name for name, m in METHODS.items() if m.binary]
PAPER_METHODS = [
    "fp",
    "xnor",
    "xnorpp",
    "dorefa",
    "reactnet",
    "reste",
    "bbcu",
    "efficientdm",
    "bidm",
]
# Two examples at timesteps 5 and 15: TALSQ buckets 0 and 1 (t * 100 // 1000).
CTX = QuantContext.create(jnp.array([5, 15]), 0.5)


# ----------------------------------------------------------------------------------- helpers


def _np_sign(x):
  return np.where(np.asarray(x) >= 0, 1.0, -1.0)


def _np_conv(x, w):
  """SAME, stride-1 NHWC x HWIO convolution in float64 numpy (the layers' 'SAME' padding)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  xp = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  h, wd = x.shape[1:3]
  out = np.zeros(x.shape[:1] + (h, wd, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bhwc,co->bhwo", xp[:, i : i + h, j : j + wd], w[i, j])
  return out


def _conv_input_vjp(w, x_shape, cotangent):
  """dL/d(input) of conv(input, w) for dL/d(output) = cotangent (the STE's upstream grad)."""
  conv = lambda v: jax.lax.conv_general_dilated(
      v, jnp.asarray(w, jnp.float32), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return np.asarray(jax.vjp(conv, jnp.zeros(x_shape, jnp.float32))[1](cotangent)[0])


def _assert_integer(a, atol=2e-3):
  a = np.asarray(a, np.float64)
  np.testing.assert_allclose(a, np.round(a), atol=atol)


def _params(layer, x, ctx=CTX, **values):
  """The layer's initial parameters with the named ones replaced by `values`."""
  params = dict(layer.init(jax.random.PRNGKey(0), x, ctx)["params"])
  for name, value in values.items():
    assert name in params, (name, sorted(params))
    params[name] = jnp.asarray(value, jnp.float32).reshape(params[name].shape)
  return params


def _x(shape=(2, 6, 6, 8), seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _uniform(shape, lo, hi, seed):
  return np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=lo, maxval=hi))


def _costs(layer, params, x, ctx=CTX):
  _, state = layer.apply({"params": params}, x, ctx, mutable=["costs"])
  return np.asarray(jax.tree_util.tree_leaves(state["costs"])[0])


# ---------------------------------------------------------------------------------- registry


def test_registry_has_every_paper_method_with_docs():
  assert list(METHODS) == PAPER_METHODS
  for name, method in METHODS.items():
    assert method.name == name
    assert method.doc == METHOD_DOCS[name] and method.doc
    assert method.binary == (name != "fp")
  # Every baseline shares BiDM's real-valued shortcut and none uses TBS or SPD.
  for name in ("xnorpp", "dorefa", "reactnet", "reste", "bbcu", "efficientdm"):
    m = METHODS[name]
    assert m.shortcut and not m.cross_timestep and not m.learnable_k
    assert m.distillation == ("l2" if name == "efficientdm" else "none")


def test_unknown_method_lists_the_valid_names():
  with pytest.raises(ValueError) as info:
    get_method("xnor-net")
  for name in PAPER_METHODS:
    assert name in str(info.value)


def test_bad_fields_are_rejected():
  with pytest.raises(ValueError, match="unknown method fields"):
    get_method("xnor", lora_rnak=4)
  with pytest.raises(ValueError, match="weight_binarizer"):
    get_method("xnor", weight_binarizer="ternary")
  with pytest.raises(ValueError, match="activation_estimator"):
    get_method("xnor", activation_estimator="magic")
  with pytest.raises(ValueError, match="reste_o_end"):
    get_method("reste", reste_o_end=0.5)


def test_table4_layout_fields():
  """width_shortcut and binary_skip_conv: today's layout in every method, set by get_method and
  config.binarization; a bad width_shortcut is one line naming the field and its values."""
  for m in METHODS.values():
    assert (m.width_shortcut, m.binary_skip_conv) == ("conv", False)
    assert m.skip_conv_method is METHODS["fp"]
  xnor, table4 = METHODS["xnor"], get_method("xnor", width_shortcut="none", binary_skip_conv=True)
  assert xnor.has_shortcut(8, 16) and xnor.has_shortcut(8, 8)
  assert not table4.has_shortcut(8, 16) and table4.has_shortcut(8, 8)
  assert not get_method("xnor", shortcut=False).has_shortcut(8, 8)
  assert table4.skip_conv_method is table4
  assert get_method("fp", binary_skip_conv=True).skip_conv_method is METHODS["fp"]
  c = config_lib.default_config()
  c.binarization.update(width_shortcut="none", binary_skip_conv=True)
  assert config_lib.method_from_config(c) == dataclasses.replace(
      METHODS["bidm"], width_shortcut="none", binary_skip_conv=True
  )
  c.binarization.width_shortcut = "identity"
  with pytest.raises(ValueError) as info:
    config_lib.validate(c)
  assert str(info.value) == "width_shortcut must be one of ('conv', 'none'), got 'identity'"


def test_fp_xnor_bidm_keep_their_fields():
  xnor, bidm = METHODS["xnor"], METHODS["bidm"]
  for m in (xnor, bidm):
    assert (m.weight_binarizer, m.activation_binarizer, m.output_scale, m.rprelu) == (
        "xnor",
        "sign",
        "none",
        "none",
    )
    assert (m.weight_estimator, m.activation_estimator, m.activation_scale) == (
        "ste",
        "approx",
        "xnor",
    )
    assert m.learnable_threshold and m.shortcut and m.learnable_shortcut_scale
    assert m.shortcut_scale_init == 0.0
  assert not xnor.learnable_k and not xnor.cross_timestep and xnor.distillation == "none"
  assert bidm.learnable_k and bidm.cross_timestep and bidm.distillation == "spd"


def test_paper_ablations_are_overrides():
  xnor, bidm = METHODS["xnor"], METHODS["bidm"]
  # Table 3: vanilla, +TBS, +SPD, BiDM.
  tbs = get_method("xnor", learnable_k=True, cross_timestep=True)
  spd = get_method("xnor", distillation="spd")
  assert get_method("xnor") == xnor
  assert tbs.learnable_k and tbs.cross_timestep and tbs.distillation == "none"
  assert spd.distillation == "spd" and not spd.learnable_k and not spd.cross_timestep
  both = get_method("xnor", learnable_k=True, cross_timestep=True, distillation="spd")
  assert dataclasses.replace(both, name="bidm") == bidm
  # Table 5: learnable k alone.
  k_only = get_method("xnor", learnable_k=True)
  assert k_only.learnable_k and not k_only.cross_timestep and k_only.distillation == "none"
  # Table 7: BiDM with plain L2 distillation or none.
  assert get_method("bidm", distillation="l2").distillation == "l2"
  assert get_method("bidm", distillation="none").distillation == "none"
  # Config placeholders (None) leave fields alone.
  assert get_method("bidm", learnable_k=None, cross_timestep=None, distillation=None) == bidm
  # The overrides reach the model: +TBS has the blend table and learnable k filters.
  x, t = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32)

  def names(method):
    model = UNet(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        method=method,
        tbs_connections=2,
    )
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]
    return {
        "/".join(str(k.key) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }

  vanilla, plus_tbs = names(xnor), names(tbs)
  assert "tbs_table" in plus_tbs and "tbs_table" not in vanilla
  assert any(n.endswith("scale_kernel") for n in plus_tbs)
  assert not any(n.endswith("scale_kernel") for n in vanilla)


# -------------------------------------------------------------------- layers, exact outputs


def test_xnorpp_output_is_gamma_times_an_integer_conv():
  x = _x()
  layer = BinaryConv(8, method=METHODS["xnorpp"])
  gamma = _uniform((8,), 0.1, 2.0, 2)
  params = _params(layer, x, output_scale=gamma, bias=np.zeros(8))
  assert set(params) == {"kernel", "bias", "output_scale", "shortcut_scale"}
  assert float(params["shortcut_scale"]) == 0.0
  y = np.asarray(layer.apply({"params": params}, x, CTX))
  integer = _np_conv(_np_sign(x), _np_sign(params["kernel"]))
  _assert_integer(y / gamma)
  np.testing.assert_allclose(y / gamma, integer, atol=1e-3)
  # Gradients: dGamma[o] = sum c * conv; dx = clipped STE of the upstream gradient.
  c = _uniform(y.shape, -1.0, 1.0, 3)
  loss = lambda p, v: jnp.sum(layer.apply({"params": p}, v, CTX) * c)
  grads, dx = jax.grad(loss, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(
      np.asarray(grads["output_scale"]), np.sum(c * integer, axis=(0, 1, 2)), rtol=1e-4
  )
  upstream = _conv_input_vjp(_np_sign(params["kernel"]), x.shape, jnp.asarray(c * gamma))
  np.testing.assert_allclose(np.asarray(dx), upstream * (np.abs(np.asarray(x)) <= 1), atol=1e-4)


def test_xnorpp_factorised_output_scale():
  x = _x()
  layer = BinaryConv(8, method=get_method("xnorpp", output_scale="factorised"))
  alpha, beta, gamma = (_uniform((n,), 0.2, 2.0, s) for n, s in ((8, 4), (6, 5), (6, 6)))
  params = _params(layer, x, output_scale=alpha, output_scale_h=beta, output_scale_w=gamma)
  y = np.asarray(layer.apply({"params": params}, x, CTX))
  scale = beta[:, None, None] * gamma[None, :, None] * alpha[None, None, :]
  _assert_integer(y / scale)
  np.testing.assert_allclose(
      y / scale, _np_conv(_np_sign(x), _np_sign(params["kernel"])), atol=1e-3
  )
  # Dense layers take the channel factor only.
  dense = BinaryDense(5, method=get_method("xnorpp", output_scale="factorised"))
  xd = _x((2, 7), seed=8)
  dp = _params(dense, xd, output_scale=_uniform((5,), 0.5, 1.5, 9))
  assert set(dp) == {"kernel", "bias", "output_scale"}
  yd = np.asarray(dense.apply({"params": dp}, xd, CTX))
  np.testing.assert_allclose(
      yd, (_np_sign(xd) @ _np_sign(dp["kernel"])) * dp["output_scale"], rtol=1e-5
  )


def test_xnorpp_init_from_fp_gives_the_xnor_output():
  """fp_init='xnor_scales': Gamma[o] = mean|W[..., o]| / sqrt(2 pi), so on inputs with
  |x| = 1/sqrt(2 pi) everywhere XNOR++ computes exactly XNOR's conv (away from the zero-padded
  border, where XNOR's K is smaller)."""
  assert ACTIVATION_MEAN_ABS == pytest.approx(1 / math.sqrt(2 * math.pi))
  assert METHODS["xnorpp"].fp_init == "xnor_scales"
  assert all(METHODS[n].fp_init == "none" for n in METHODS if n != "xnorpp")
  assert set(FP_INITS) == {"none", "xnor_scales"}
  x = ACTIVATION_MEAN_ABS * _np_sign(_x())
  xnorpp, xnor = (BinaryConv(8, method=METHODS[n]) for n in ("xnorpp", "xnor"))
  fp = _params(BinaryConv(8), x)  # the FP layer's kernel and bias: the teacher
  fp = {"kernel": fp["kernel"], "bias": jnp.asarray(_uniform((8,), -0.5, 0.5, 11))}
  dense = BinaryDense(5, method=METHODS["xnorpp"])
  xd = _x((2, 7), seed=8)
  dense_fp = _params(BinaryDense(5), xd)
  tree = {
      "conv": _params(xnorpp, x, **fp),
      "dense": _params(dense, xd, **dense_fp),
      "other": {"kernel": jnp.ones((3, 2))},
  }
  assert float(tree["conv"]["output_scale"][0]) == 1.0  # the Flax init before the FP init
  out = METHODS["xnorpp"].init_from_fp(tree)
  alpha = np.mean(np.abs(np.asarray(fp["kernel"])), axis=(0, 1, 2))
  np.testing.assert_allclose(
      np.asarray(out["conv"]["output_scale"]), alpha * ACTIVATION_MEAN_ABS, rtol=1e-6
  )
  np.testing.assert_allclose(
      np.asarray(out["dense"]["output_scale"]),
      np.mean(np.abs(np.asarray(dense_fp["kernel"])), axis=0) * ACTIVATION_MEAN_ABS,
      rtol=1e-6,
  )
  for layer in ("conv", "dense"):
    for name in tree[layer]:
      if name != "output_scale":
        np.testing.assert_array_equal(np.asarray(out[layer][name]), np.asarray(tree[layer][name]))
  np.testing.assert_array_equal(np.asarray(out["other"]["kernel"]), np.ones((3, 2)))
  y_pp = np.asarray(xnorpp.apply({"params": out["conv"]}, x, CTX))
  y_xnor = np.asarray(xnor.apply({"params": _params(xnor, x, **fp)}, x, CTX))
  np.testing.assert_allclose(y_pp[:, 1:-1, 1:-1], y_xnor[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(y_pp[:, 0], y_xnor[:, 0], atol=1e-4)  # the border differs (K < c)
  # Without the FP init (or for a method without output scales) nothing changes.
  assert get_method("xnorpp", fp_init="none").init_from_fp(tree) is tree
  same = get_method("xnor", fp_init="xnor_scales").init_from_fp({"conv": _params(xnor, x, **fp)})
  np.testing.assert_array_equal(np.asarray(same["conv"]["kernel"]), np.asarray(fp["kernel"]))
  # A factorised Gamma: the channel factor gets the scale, the spatial factors stay 1.
  fact = BinaryConv(8, method=get_method("xnorpp", output_scale="factorised"))
  out = fact.method.init_from_fp(_params(fact, x, **fp))
  np.testing.assert_allclose(
      np.asarray(out["output_scale"]), alpha * ACTIVATION_MEAN_ABS, rtol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(out["output_scale_h"]), np.ones(6))
  with pytest.raises(ValueError, match="fp_init"):
    get_method("xnorpp", fp_init="magic")


def test_dorefa_layer_weights_are_plus_minus_mean_abs():
  x = _x()
  layer = BinaryConv(8, method=METHODS["dorefa"])
  params = _params(layer, x)
  assert set(params) == {"kernel", "bias", "shortcut_scale"}
  y = np.asarray(layer.apply({"params": params}, x, CTX))
  e = np.mean(np.abs(np.asarray(params["kernel"])))
  a = (np.asarray(x) >= 0.5).astype(np.float64)
  _assert_integer(y / e)
  np.testing.assert_allclose(y, e * _np_conv(a, _np_sign(params["kernel"])), atol=1e-5)
  c = _uniform(y.shape, -1.0, 1.0, 10)
  grads, dx = jax.grad(
      lambda p, v: jnp.sum(layer.apply({"params": p}, v, CTX) * c), argnums=(0, 1)
  )(params, x)
  # Activations: straight through round and clip, dx = (dL/da) * 1[0 <= x <= 1].
  upstream = _conv_input_vjp(e * _np_sign(params["kernel"]), x.shape, jnp.asarray(c))
  window = (np.asarray(x) >= 0) & (np.asarray(x) <= 1)
  np.testing.assert_allclose(np.asarray(dx), upstream * window, atol=1e-5)
  # Weights: identity STE, dL/dW = dL/dWb = sum over positions of a * c.
  conv_w = lambda w: jax.lax.conv_general_dilated(
      jnp.asarray(a, jnp.float32), w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  dwb = jax.vjp(conv_w, params["kernel"])[1](jnp.asarray(c, jnp.float32))[0]
  np.testing.assert_allclose(np.asarray(grads["kernel"]), np.asarray(dwb), rtol=1e-5, atol=1e-6)


def test_reste_layer_output_and_scheduled_gradient():
  x = _x()
  layer = BinaryConv(8, method=METHODS["reste"])
  params = _params(layer, x)
  assert set(params) == {"kernel", "bias", "shortcut_scale"}
  y = np.asarray(layer.apply({"params": params}, x, CTX))
  m = np.mean(np.abs(np.asarray(params["kernel"])))
  _assert_integer(y / m)
  np.testing.assert_allclose(y / m, _np_conv(_np_sign(x), _np_sign(params["kernel"])), atol=1e-3)
  # The activation gradient follows o(progress): dense layer, closed form.
  dense = BinaryDense(4, method=METHODS["reste"])
  xd = jnp.linspace(-2.0, 2.0, 18).reshape(3, 6)
  dp = _params(dense, xd)
  c = jnp.asarray(_uniform((3, 4), -1.0, 1.0, 11), jnp.float32)
  md = np.mean(np.abs(np.asarray(dp["kernel"])))
  upstream = np.asarray(c) @ (md * _np_sign(dp["kernel"])).T
  grads = {}
  for progress in (0.0, 0.5, 1.0):
    ctx = QuantContext.create(jnp.zeros((3,), jnp.int32), progress)
    grads[progress] = np.asarray(
        jax.grad(lambda v: jnp.sum(dense.apply({"params": dp}, v, ctx) * c))(xd)
    )
    o = float(est.reste_schedule(progress, 3.0))
    ax = np.abs(np.asarray(xd))
    slope = np.where(
        ax <= np.float32(0.1),
        0.1 ** (1 / o - 1),
        np.where(ax <= 1.5, (1 / o) * np.maximum(ax, 0.1) ** (1 / o - 1), 0.0),
    )
    np.testing.assert_allclose(grads[progress], upstream * slope, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[0.0], upstream * (np.abs(np.asarray(xd)) <= 1.5), rtol=1e-5)
  assert not np.allclose(grads[0.0], grads[1.0])
  # Without a context (inference), o is o_end.
  no_ctx = jax.grad(lambda v: jnp.sum(dense.apply({"params": dp}, v) * c))(xd)
  np.testing.assert_allclose(np.asarray(no_ctx), grads[1.0], rtol=1e-6)


def _rprelu_np(z, shift_in, slope, shift_out):
  z = z - shift_in
  return np.where(z >= 0, z, slope * z) + shift_out


def test_reactnet_layer_closed_form():
  x = _x()
  layer = BinaryConv(8, method=METHODS["reactnet"])
  values = dict(
      threshold=_uniform((8,), -0.3, 0.3, 12),
      bias=_uniform((8,), -0.2, 0.2, 13),
      shortcut_scale=0.7,
      rprelu_shift_in=_uniform((8,), -0.5, 0.5, 14),
      rprelu_slope=_uniform((8,), 0.05, 0.5, 15),
      rprelu_shift_out=_uniform((8,), -0.5, 0.5, 16),
  )
  params = _params(layer, x, **values)
  init = layer.init(jax.random.PRNGKey(0), x, CTX)["params"]
  np.testing.assert_array_equal(np.asarray(init["rprelu_slope"]), np.full(8, 0.25))
  y = np.asarray(layer.apply({"params": params}, x, CTX))
  w = np.asarray(params["kernel"])
  alpha = np.mean(np.abs(w), axis=(0, 1, 2))
  pre = (
      alpha * _np_conv(_np_sign(np.asarray(x) + values["threshold"]), _np_sign(w))
      + values["bias"]
      + 0.7 * np.asarray(x)
  )  # RPReLU after the shortcut (ReActNet block)
  expected = _rprelu_np(
      pre, values["rprelu_shift_in"], values["rprelu_slope"], values["rprelu_shift_out"]
  )
  np.testing.assert_allclose(y, expected, atol=2e-5)
  c = _uniform(y.shape, -1.0, 1.0, 17)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, CTX) * c))(params)
  z = pre - values["rprelu_shift_in"]
  np.testing.assert_allclose(
      np.asarray(grads["rprelu_slope"]),
      np.sum(c * np.minimum(z, 0), axis=(0, 1, 2)),
      rtol=1e-4,
      atol=1e-5,
  )
  np.testing.assert_allclose(
      np.asarray(grads["rprelu_shift_out"]), np.sum(c, axis=(0, 1, 2)), rtol=1e-5
  )


@pytest.mark.parametrize("features", [8, 12])
def test_bbcu_layer_closed_form(features):
  x = _x()
  layer = BinaryConv(features, method=METHODS["bbcu"])
  values = dict(
      threshold=_uniform((8,), -0.3, 0.3, 18),
      bias=_uniform((features,), -0.2, 0.2, 19),
      rprelu_shift_in=_uniform((features,), -0.5, 0.5, 20),
      rprelu_slope=_uniform((features,), 0.05, 0.5, 21),
      rprelu_shift_out=_uniform((features,), -0.5, 0.5, 22),
  )
  params = _params(layer, x, **values)
  assert "shortcut_scale" not in params  # the residual coefficient is the constant 1
  y = np.asarray(layer.apply({"params": params}, x, CTX))
  w = np.asarray(params["kernel"])
  alpha = np.mean(np.abs(w), axis=(0, 1, 2))
  body = _rprelu_np(
      alpha * _np_conv(_np_sign(np.asarray(x) + values["threshold"]), _np_sign(w)) + values["bias"],
      values["rprelu_shift_in"],
      values["rprelu_slope"],
      values["rprelu_shift_out"],
  )  # RPReLU before the residual (BBCU)
  residual = (
      np.asarray(x)
      if features == 8
      else _np_conv(np.asarray(x), np.asarray(params["shortcut_kernel"]))
  )
  np.testing.assert_allclose(y, body + residual, atol=2e-5)


def _efficientdm_layer(features=8, **overrides):
  layer = BinaryConv(features, method=get_method("efficientdm", **overrides))
  x = _x()
  steps = np.linspace(0.5, 3.0, 100)
  params = _params(
      layer,
      x,
      act_steps=steps,
      weight_step_gain=_uniform((features,), 0.5, 1.5, 23),
      lora_a=0.1 * np.asarray(_x((3, 3, 8, 32), seed=24)),
      lora_b=0.1 * np.asarray(_x((32, features), seed=25)),
  )
  return layer, x, params, steps


def test_efficientdm_layer_is_a_scaled_binary_conv_of_the_merged_weight():
  layer, x, params, steps = _efficientdm_layer()
  assert set(params) == {
      "kernel",
      "bias",
      "lora_a",
      "lora_b",
      "weight_step_gain",
      "act_steps",
      "shortcut_scale",
  }
  init = layer.init(jax.random.PRNGKey(0), x, CTX)["params"]
  assert init["lora_a"].shape == (3, 3, 8, 32) and init["lora_b"].shape == (32, 8)
  np.testing.assert_array_equal(np.asarray(init["lora_b"]), 0)
  bound = 1 / math.sqrt(3 * 3 * 8)  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
  assert np.all(np.abs(np.asarray(init["lora_a"])) <= bound)
  np.testing.assert_array_equal(np.asarray(init["act_steps"]), 1.0)
  y = np.asarray(layer.apply({"params": params}, x, CTX))
  w0 = np.asarray(params["kernel"], np.float64)
  merged = w0 + np.tensordot(np.asarray(params["lora_a"]), np.asarray(params["lora_b"]), 1)
  s_w = np.asarray(params["weight_step_gain"]) * np.mean(np.abs(w0), axis=(0, 1, 2))
  s_x = steps[[0, 1]][:, None, None, None]  # t = 5, 15 -> buckets 0, 1
  _assert_integer(y / (s_x * s_w))
  np.testing.assert_allclose(
      y, s_x * s_w * _np_conv(_np_sign(x), _np_sign(merged)), rtol=1e-4, atol=1e-4
  )


def test_efficientdm_timestep_aware_steps_and_gradients():
  layer, x, params, steps = _efficientdm_layer()
  x = jnp.concatenate([x[:1], x[:1]])  # the same image at two timesteps
  y = np.asarray(layer.apply({"params": params}, x, CTX))
  mask = np.abs(y[0]) > 1e-3
  np.testing.assert_allclose(y[1][mask] / y[0][mask], steps[1] / steps[0], rtol=1e-4)
  c = jnp.asarray(_uniform(y.shape, -1.0, 1.0, 26), jnp.float32)
  loss = lambda p: jnp.sum(layer.apply({"params": p}, x, CTX) * c)
  grads = jax.grad(loss)(params)
  g_steps = np.asarray(grads["act_steps"])
  assert g_steps[0] != 0 and g_steps[1] != 0
  np.testing.assert_array_equal(g_steps[2:], 0)  # only the buckets in use learn
  # LSQ step gradient of bucket b: sum over its example of g_xq * (sign x - x/s 1[|x| <= s]).
  w0 = np.asarray(params["kernel"], np.float64)
  merged = w0 + np.tensordot(np.asarray(params["lora_a"]), np.asarray(params["lora_b"]), 1)
  s_w = np.asarray(params["weight_step_gain"]) * np.mean(np.abs(w0), axis=(0, 1, 2))
  g_xq = _conv_input_vjp(s_w * _np_sign(merged), x.shape, c)
  xn = np.asarray(x)
  for i, s in enumerate(steps[:2]):
    inside = np.abs(xn[i]) <= s
    np.testing.assert_allclose(
        g_steps[i], np.sum(g_xq[i] * (_np_sign(xn[i]) - xn[i] / s * inside)), rtol=1e-4
    )
  # W0 and the bias are frozen; the LoRA factors and the weight step learn.
  np.testing.assert_array_equal(np.asarray(grads["kernel"]), 0)
  np.testing.assert_array_equal(np.asarray(grads["bias"]), 0)
  for name in ("lora_a", "lora_b", "weight_step_gain"):
    assert np.any(np.asarray(grads[name]) != 0), name
  # Dense layers read the same table, per example.
  yd, unscaled, steps = _talsq_dense(METHODS["efficientdm"], seed=27)
  np.testing.assert_allclose(yd, steps[[0, 1]][:, None] * unscaled, rtol=1e-5, atol=1e-6)


def _talsq_dense(method, seed):
  """A dense layer of `method` with TALSQ steps 0.5 .. 3 applied on CTX: its output, the
  unscaled product sign(x) @ (s_w sign W) and the steps."""
  dense = BinaryDense(4, method=method)
  xd = _x((2, 6), seed=seed)
  steps = np.linspace(0.5, 3.0, 100)
  dp = _params(dense, xd, act_steps=steps)
  yd = np.asarray(dense.apply({"params": dp}, xd, CTX))
  s_wd = np.mean(np.abs(np.asarray(dp["kernel"])), axis=0)
  return yd, _np_sign(xd) @ (s_wd * _np_sign(dp["kernel"])), steps


def test_num_timesteps_comes_from_the_config():
  """TALSQ's buckets follow config.diffusion.num_timesteps: T = 500 puts t = 5, 15 in 1, 3."""
  config = config_lib.default_config()
  config.binarization.method = "efficientdm"
  assert config_lib.method_from_config(config) == METHODS["efficientdm"]  # T = 1000
  config.diffusion.num_timesteps = 500
  method = config_lib.method_from_config(config)
  assert method.num_timesteps == 500
  yd, unscaled, steps = _talsq_dense(method, seed=28)
  np.testing.assert_allclose(yd, steps[[1, 3]][:, None] * unscaled, rtol=1e-5, atol=1e-6)


def test_efficientdm_needs_the_timestep():
  layer = BinaryConv(8, method=METHODS["efficientdm"])
  with pytest.raises(ValueError, match="QuantContext"):
    layer.init(jax.random.PRNGKey(0), _x(), None)


# ------------------------------------------------------------------------------------ costs


# Real parameters (bias 8 + the method's scales) and real FLOPs of a 3x3, 8 -> 8 conv on 6x6.
EXPECTED_REAL = {
    "xnor": 8 + 8 + 9 + 8,
    "bidm": 8 + 8 + 9 + 8,
    "xnorpp": 8 + 8,
    "dorefa": 8 + 1,
    "reactnet": 8 + 8 + 8 + 24,
    "reste": 8 + 1,
    "bbcu": 8 + 8 + 8 + 24,
    "efficientdm": 8 + 8 + 100,
}
EXPECTED_FLOPS = {
    "xnor": 2 * 36 * (9 + 8 + 8),
    "bidm": 2 * 36 * (9 + 8 + 8),
    "xnorpp": 288,
    "dorefa": 2 * 288,
    "reactnet": 4 * 288,
    "reste": 288,
    "bbcu": 4 * 288,
    "efficientdm": 288,
}


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_costs_binary_vs_real(name):
  x = _x()
  layer = BinaryConv(8, method=METHODS[name])
  bops, flops, binary_params, real_params = _costs(layer, _params(layer, x), x)
  macs = 36 * 8 * 8 * 9
  if name == "fp":
    assert (bops, flops, binary_params, real_params) == (0, 2 * macs, 0, 576 + 8)
    return
  # Every binary method does the same binary conv and stores the same 1-bit weights (LoRA
  # factors merge into them at inference and are not counted).
  assert (bops, binary_params) == (macs, 576)
  assert real_params == EXPECTED_REAL[name]
  assert flops == EXPECTED_FLOPS[name]


def test_model_costs_every_method():
  """The efficiency report's counts: the same binary work and 1-bit weights for every method."""
  from bidm_jax.evaluation.efficiency import count_costs

  costs = {
      name: count_costs(
          UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), method=m),
          (16, 16, 3),
      )
      for name, m in METHODS.items()
  }
  assert costs["fp"]["bops"] == 0 and costs["fp"]["binary_params"] == 0
  for name in BINARY_METHODS:
    assert costs[name]["bops"] == costs["xnor"]["bops"] > 0, name
    assert costs[name]["binary_params"] == costs["xnor"]["binary_params"] > 0, name
    assert costs[name]["ops"] < costs["fp"]["ops"] / 5, name


@pytest.mark.parametrize("name", BINARY_METHODS)
def test_every_method_runs_the_table4_layout(name):
  """Each binary method builds the micro U-Net with binary skip convs (with and without the
  width shortcut) and runs it without the width shortcut, eagerly (no compile): eps finite,
  the skip convs count BOPs and no layer records a real shortcut."""
  x, t = tiny_inputs(MICRO_SHAPE)
  skip_conv = UNet(**MICRO_UNET, method=get_method(name, binary_skip_conv=True))
  shapes = jax.eval_shape(skip_conv.init, jax.random.key(0), x, t)["params"]
  assert "shortcut_kernel" in shapes["up_0_block_0"]["nin_shortcut"]
  method = get_method(name, width_shortcut="none", binary_skip_conv=True)
  model = UNet(**MICRO_UNET, method=method)
  with jax.disable_jit():
    out, state = model.apply(
        {"params": random_params(model, MICRO_SHAPE, seed=3)}, x, t, mutable=["costs"]
    )
  assert np.all(np.isfinite(np.asarray(out.eps)))
  costs = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["costs"]))
  skips = [v for k, v in costs.items() if "nin_shortcut" in k]
  assert skips and all(v[0] > 0 for v in skips)
  assert not any(k[-1] == "shortcut" for k in costs)


# -------------------------------------------------------------------------------------- QAT


# Cheaper XLA compiles for the short QAT runs (compile time dominates them on CPU).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _qat(method, steps=20):
  """`steps` Adam steps of epsilon prediction on one fixed batch; losses and parameters."""
  model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), method=method)
  k_img, k_noise = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.uniform(k_img, (2, 16, 16, 3), minval=-1.0, maxval=1.0)
  noise = jax.random.normal(k_noise, x0.shape)
  t = jnp.array([5, 995])
  abar = jnp.cumprod(1.0 - jnp.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
  x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise
  # An RBG key: the same initializers, much less to compile than threefry.
  key = jax.random.key(0, impl="unsafe_rbg")
  init = jax.jit(lambda k: model.init(k, x_t, t)["params"])
  params0 = init.lower(key).compile(_FAST_COMPILE)(key)
  tx = optax.adam(1e-3)

  def loss_fn(p, progress):
    eps = model.apply({"params": p}, x_t, t, progress=progress).eps
    return jnp.mean(jnp.square(eps - noise))

  def step(p, opt_state, progress):
    loss, grads = jax.value_and_grad(loss_fn)(p, progress)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  params, opt_state, losses = params0, tx.init(params0), []
  step = jax.jit(step).lower(params, opt_state, jnp.float32(0)).compile(_FAST_COMPILE)
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, jnp.float32(i / steps))
    losses.append(float(loss))
  return losses, params0, params


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_qat_decreases_the_loss(name):
  losses, params0, params = _qat(METHODS[name])
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.9 * losses[0], losses
  if name == "efficientdm":
    # W0 and the biases of binary layers get no gradient; Adam leaves them exactly in place.
    for path in (("down_0_block_0", "conv1"), ("mid_attn_1", "q"), ("up_1_block_0", "temb_proj")):
      before, after = params0, params
      for key in path:
        before, after = before[key], after[key]
      np.testing.assert_array_equal(np.asarray(before["kernel"]), np.asarray(after["kernel"]))
      np.testing.assert_array_equal(np.asarray(before["bias"]), np.asarray(after["bias"]))
      assert not np.array_equal(np.asarray(before["lora_b"]), np.asarray(after["lora_b"]))


def test_recorded_fields_fill_what_a_record_predates_from_its_method():
  record = dataclasses.asdict(get_method("xnorpp"))
  for field in ("fp_init", "width_shortcut", "binary_skip_conv"):
    del record[field]
  filled = recorded_fields(record)
  assert filled == dataclasses.asdict(get_method("xnorpp"))
  assert filled["fp_init"] == "xnor_scales"  # the method's own default, not the dataclass's
  unknown = recorded_fields({"name": "gone"})
  assert unknown["name"] == "gone" and unknown["width_shortcut"] == "conv"
