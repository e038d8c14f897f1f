"""Packed W1A1 inference (issue 15): the bit layout, the packed layers against the simulated
ones, the export file and the packed sampling engine.

Exactness: the +-1 products (`sign_conv`, `sign_matmul`, both impls) must equal, as integers,
the simulated layer's float32 conv of sign(x + tau) and sign(W), which is exact (integers below
2^24). The layer outputs and the model's eps then differ only by float32 rounding of the real
epilogue: the simulated layer sums K products of +-alpha in float32 where the packed one
multiplies the integer by alpha once, and mean_c then k becomes sum_c then k / Cin. That error is
at most a few K * 2^-24 of alpha * K' per output (K <= 4608: ~3e-4 relative to one +-1 term,
observed ~1e-6 of the output scale), while one wrong bit changes an output by 2 alpha K', a whole
term; hence the tolerances rtol = 1e-5, atol = 1e-5 * max|y|.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax import main
from bidm_jax.bidm import tbs
from bidm_jax.binarize import estimators
from bidm_jax.binarize.methods import get_method
from bidm_jax.data import default_data_config
from bidm_jax.evaluation import evaluate as eval_lib
from bidm_jax.export import packed as ex
from bidm_jax.layers import packed as pk
from bidm_jax.layers.binary import BinaryConv, BinaryDense, _pad_amounts
from bidm_jax.models.unet import UNet
from bidm_jax.training import checkpoint as ckpt_lib
from helpers import (
    MICRO_SHAPE,
    MICRO_UNET,
    TBS_CONNECTIONS,
    TINY_SHAPE,
    TINY_UNET,
    fill_params,
    random_params,
    tiny_inputs,
)

DIMS = ("NHWC", "HWIO", "NHWC")
REPO = Path(__file__).resolve().parents[1]


def assert_close(packed, simulated):
  packed, simulated = np.asarray(packed), np.asarray(simulated)
  scale = float(np.max(np.abs(simulated)))
  np.testing.assert_allclose(packed, simulated, rtol=1e-5, atol=1e-5 * scale)


def one_line(e: pytest.ExceptionInfo) -> str:
  text = str(e.value)
  assert text and "\n" not in text, text
  return text


# ---------------------------------------------------------------------------------------------
# Bit layout.


def test_pack_bits_layout():
  """Bit j of word i is element 32 i + j; tail bits are 0."""
  bits = np.zeros(40, bool)
  bits[[0, 5, 31, 33]] = True
  words = np.asarray(pk.pack_bits(jnp.asarray(bits)))
  assert words.dtype == np.uint32 and words.shape == (2,)
  assert words[0] == (1 | 1 << 5 | 1 << 31) and words[1] == 1 << 1


@pytest.mark.parametrize("k", [1, 31, 32, 33, 95, 1152, 4608])
def test_pack_unpack_round_trip(k):
  bits = np.random.default_rng(k).random((2, 3, k)) < 0.5
  words = pk.pack_bits(jnp.asarray(bits))
  assert words.shape == (2, 3, pk.num_words(k))
  np.testing.assert_array_equal(np.asarray(pk.unpack_bits(words, k)), bits)
  if k % 32:
    assert not np.any(np.asarray(words[..., -1]) >> (k % 32))  # tail bits are 0
  else:  # the same bytes as numpy's little-endian packbits
    ref = np.packbits(bits, axis=-1, bitorder="little").view("<u4")
    np.testing.assert_array_equal(np.asarray(words), ref)


def test_pack_kernel_order_and_sign_of_zero():
  """(kh, kw, Cin) flattened Cin fastest per output channel; W >= 0 (-0.0 and 0 too) is +1."""
  kh, kw, cin, cout = 3, 3, 40, 5
  w = np.random.default_rng(0).standard_normal((kh, kw, cin, cout)).astype(np.float32)
  w[0, 0, 0, 0], w[1, 2, 3, 1], w[2, 2, 39, 4] = 0.0, -0.0, -1e-30
  words = pk.pack_kernel(jnp.asarray(w))
  assert words.shape == (cout, pk.num_words(kh * kw * cin))
  bits = np.asarray(pk.unpack_bits(words, kh * kw * cin))
  for dy, dx, ci, o in [(0, 0, 0, 0), (1, 2, 3, 1), (2, 2, 39, 4), (2, 1, 17, 3)]:
    assert bits[o, (dy * kw + dx) * cin + ci] == (w[dy, dx, ci, o] >= 0)
  signs = np.asarray(pk.unpack_kernel(words, w.shape))
  assert signs.dtype == np.int8
  np.testing.assert_array_equal(signs, np.asarray(estimators.hard_sign(jnp.asarray(w))))


# ---------------------------------------------------------------------------------------------
# Packed layers against the simulated ones.


@functools.lru_cache(maxsize=None)
def unet_layer_shapes() -> tuple:
  """Every distinct binary layer (kind, kernel, stride, padding, input size) of the CIFAR-10
  (ch 128) and digits configs, from their layer tables."""
  shapes = set()
  for spec in ("configs/cifar10.py", "configs/digits.py"):
    config = config_lib.load_config_file(str(REPO / spec))
    model = train_model(config)
    image = (config.data.image_size, config.data.image_size, config.data.channels)
    layers, _ = ex.trace_binary_layers(model, image)
    for v in layers.values():
      pad = tuple(map(tuple, v["padding"])) if v["kind"] == "conv" else None
      shapes.add((v["kind"], tuple(v["kernel"]), v.get("strides"), pad, tuple(v.get("input", ()))))
  return tuple(sorted(shapes, key=str))


def train_model(config):
  return builders.make_model(config, config_lib.method_from_config(config))


def pack_dense(params, method):
  return ex.pack_layer(params, {"kind": "dense", "kernel": list(params["kernel"].shape)}, method)


def sign_product(x, p, conv=None):
  """The simulated layer's integer part in float32: conv(sign(x + tau), sign(W))."""
  xb = estimators.binarize_activation(x, p.get("threshold"))
  w = estimators.hard_sign(p["kernel"])
  if conv is None:
    return xb @ w
  strides, pads = conv
  return jax.lax.conv_general_dilated(xb, w, (strides, strides), pads, dimension_numbers=DIMS)


def check_conv(x, layer: BinaryConv, seed: int = 1):
  """Simulated vs packed (both impls): integers exactly, outputs within float tolerance."""
  variables = fill_params(jax.eval_shape(layer.init, jax.random.key(0), x), seed)
  p = variables["params"]
  pads = _pad_amounts(layer.padding, layer.kernel_size)
  cin = x.shape[-1]

  @jax.jit
  def run(variables, x):
    p = variables["params"]
    q = ex.pack_layer(p, {"kind": "conv", "kernel": list(p["kernel"].shape)}, layer.method)
    xbits = pk.activation_bits(x, q.get("threshold"))
    shape = (*layer.kernel_size, cin, layer.features)
    dots = [
        pk.sign_conv(xbits, q["sign_bits"], shape, layer.strides, pads, impl) for impl in pk.IMPLS
    ]
    ys = [
        pk.binary_conv(
            x,
            q,
            kernel_size=layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            method=layer.method,
            impl=impl,
        )
        for impl in pk.IMPLS
    ]
    return (sign_product(x, p, (layer.strides, pads)), dots, layer.apply(variables, x), ys)

  ref, dots, y, ys = run(variables, x)
  ref = np.asarray(ref)
  np.testing.assert_array_equal(ref, np.round(ref))
  for dot in dots:
    assert dot.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(dot), ref.astype(np.int32))
  for out in ys:
    assert out.shape == y.shape
    assert_close(out, y)
  return p


@pytest.mark.parametrize("shape", unet_layer_shapes(), ids=lambda s: "-".join(map(str, s)))
def test_unet_layer_shapes(shape):
  """Every conv and dense shape of the CIFAR-10 and digits U-Nets, as BiDM layers."""
  kind, kernel, strides, pads, size = shape
  rng = np.random.default_rng(sum(kernel))
  method = get_method("bidm")
  if kind == "dense":
    x = jnp.asarray(rng.standard_normal((3, kernel[0])), jnp.float32)
    layer = BinaryDense(kernel[1], method=method)
    variables = fill_params(jax.eval_shape(layer.init, jax.random.key(0), x), 1)
    p = variables["params"]
    q = pack_dense(p, method)
    xbits = pk.activation_bits(x, q["threshold"])
    ref = np.asarray(sign_product(x, p))
    for impl in pk.IMPLS:
      np.testing.assert_array_equal(
          np.asarray(pk.sign_matmul(xbits, q["sign_bits"], impl)), ref.astype(np.int32)
      )
      assert_close(pk.binary_dense(x, q, impl=impl), layer.apply(variables, x))
    return
  x = jnp.asarray(rng.standard_normal((1, *size, kernel[2])), jnp.float32)
  check_conv(x, BinaryConv(kernel[3], kernel[:2], strides=strides, padding=pads, method=method))


ODD_CASES = [
    # (H, W, Cin, Cout, kernel, stride, padding)
    (7, 9, 5, 6, (3, 3), 1, "SAME"),
    (7, 9, 33, 8, (3, 3), 2, ((1, 1), (1, 1))),
    (9, 9, 40, 40, (3, 3), 2, ((0, 0), (0, 0))),
    (8, 8, 32, 16, (3, 3), 2, ((0, 1), (0, 1))),
    (5, 6, 12, 7, (3, 3), 1, ((2, 0), (1, 2))),
    (6, 5, 70, 9, (1, 1), 1, "SAME"),
    (6, 6, 31, 31, (1, 1), 2, ((0, 0), (0, 0))),
    (7, 7, 8, 5, (5, 5), 1, "SAME"),
    (11, 7, 3, 4, (3, 1), 2, ((1, 1), (0, 0))),
]


@pytest.mark.parametrize(
    "case", ODD_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4][0]}{c[4][1]}-s{c[5]}"
)
def test_strides_odd_sizes_and_padding(case):
  """Odd sizes, Cin not a multiple of 32, strides 1 and 2, symmetric, asymmetric and no
  padding; the real shortcut where its average pool fits the output."""
  h, w, cin, cout, kernel, stride, padding = case
  x = jnp.asarray(np.random.default_rng(h * w + cin).standard_normal((2, h, w, cin)), jnp.float32)
  fits = stride == 1 or padding == ((0, 1), (0, 1)) or (h, w) == (6, 6)
  method = get_method("bidm", shortcut=fits and kernel != (5, 5) and padding != ((2, 0), (1, 2)))
  check_conv(x, BinaryConv(cout, kernel, strides=stride, padding=padding, method=method))


@pytest.mark.parametrize("impl", pk.IMPLS)
def test_zero_padding_border_is_exact(impl):
  """All activations -1 and all weights +1: an output sees -Cin per valid tap, so the corner
  (4 taps), edge (6) and interior (9) of a 3x3 SAME conv differ; a padded tap counted as a -1
  bit would give -9 Cin everywhere."""
  cin, cout = 40, 3
  xbits = jnp.zeros((1, 5, 6, cin), bool)
  sign_bits = pk.pack_kernel(jnp.ones((3, 3, cin, cout)))
  dot = np.asarray(pk.sign_conv(xbits, sign_bits, (3, 3, cin, cout), 1, ((1, 1), (1, 1)), impl))
  taps = np.full((5, 6), 9)
  taps[[0, -1], :] -= 3
  taps[:, [0, -1]] -= 3
  taps[[0, 0, -1, -1], [0, -1, 0, -1]] = 4
  np.testing.assert_array_equal(dot[0], np.repeat(-cin * taps[..., None], cout, -1))
  square = jnp.zeros((1, 6, 6, cin), bool)
  strided = pk.sign_conv(square, sign_bits, (3, 3, cin, cout), 2, ((0, 1), (0, 1)), impl)
  np.testing.assert_array_equal(
      np.asarray(strided)[0, :, :, 0],  # the downsample's border
      -cin * np.array([[9, 9, 6], [9, 9, 6], [6, 6, 4]]),
  )


@pytest.mark.parametrize(
    "case",
    [c for c in ODD_CASES if not isinstance(c[6], str)],
    ids=lambda c: "x".join(map(str, c[:4])),
)
def test_int8_product_in_f32_is_the_same_integer(case, monkeypatch):
  """The f32-output form that 'int8' takes on CUDA GPUs (cuDNN takes no s32 conv output) gives
  the int32 form's integers, conv and matmul, borders included."""
  h, w, cin, cout, kernel, stride, padding = case
  rng = np.random.default_rng(cin)
  xbits = jnp.asarray(rng.random((2, h, w, cin)) < 0.5)
  sign_bits = pk.pack_kernel(jnp.asarray(rng.standard_normal((*kernel, cin, cout))))
  dense_bits = pk.pack_kernel(jnp.asarray(rng.standard_normal((cin, cout))))
  forms = {}
  for f32 in (False, True):
    monkeypatch.setattr(pk, "_int8_product", functools.partial(pk._int8_product, f32=f32))
    conv = pk.sign_conv(xbits, sign_bits, (*kernel, cin, cout), stride, padding, "int8")
    dense = pk.sign_matmul(xbits[:, 0], dense_bits, "int8")
    forms[f32] = (np.asarray(conv), np.asarray(dense))
    assert conv.dtype == dense.dtype == jnp.int32
  for a, b in zip(forms[False], forms[True]):
    np.testing.assert_array_equal(a, b)
  ref = pk.sign_conv(xbits, sign_bits, (*kernel, cin, cout), stride, padding, "popcount")
  np.testing.assert_array_equal(forms[True][0], np.asarray(ref))


def test_int8_conv_lowers_to_f32_output_for_cuda():
  """For CUDA the 'int8' conv asks for an f32 output (the form cuDNN runs); for CPU, int32."""
  conv = jax.jit(lambda x, s: pk.sign_conv(x, s, (3, 3, 32, 8), 1, ((1, 1), (1, 1)), "int8"))
  args = (jnp.zeros((1, 6, 6, 32), bool), pk.pack_kernel(jnp.ones((3, 3, 32, 8))))
  outputs = {
      platform: re.findall(
          r"stablehlo.convolution.*?-> (tensor<[^>]*>)",
          conv.trace(*args).lower(lowering_platforms=(platform,)).as_text(),
      )
      for platform in ("cuda", "cpu")
  }
  assert outputs == {"cuda": ["tensor<1x6x6x8xf32>"], "cpu": ["tensor<1x6x6x8xi32>"]}


METHOD_CASES = {
    "xnor": get_method("xnor"),
    "bidm": get_method("bidm"),
    "bidm-no-bias": get_method("bidm", binary_bias=False),
    "xnorpp": get_method("xnorpp"),
    "xnorpp-factorised": get_method("xnorpp", output_scale="factorised"),
    "reactnet": get_method("reactnet"),
    "bbcu": get_method("bbcu"),
    "reste": get_method("reste"),
    "bidm-no-width-shortcut": get_method("bidm", width_shortcut="none"),
}


@pytest.mark.parametrize("name", list(METHOD_CASES))
def test_every_packed_method(name):
  """Each exportable method's conv (strided, channels changing) and dense layer."""
  method = METHOD_CASES[name]
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 24)), jnp.float32)
  p = check_conv(x, BinaryConv(40, strides=2, padding=((0, 1), (0, 1)), method=method))
  packed = ex.pack_layer(p, {"kind": "conv", "kernel": list(p["kernel"].shape)}, method)
  assert ("shortcut_scale" in packed) == (method.width_shortcut == "conv")
  if name == "xnorpp-factorised":
    assert {"output_scale_h", "output_scale_w"} <= set(p)
  x = jnp.asarray(rng.standard_normal((3, 70)), jnp.float32)
  layer = BinaryDense(9, method=method)
  variables = fill_params(jax.eval_shape(layer.init, jax.random.key(0), x), 2)
  q = pack_dense(variables["params"], method)
  assert ("bias" in q) == method.binary_bias
  for impl in pk.IMPLS:
    assert_close(pk.binary_dense(x, q, impl=impl), layer.apply(variables, x))


@pytest.mark.parametrize("name", ["fp", "dorefa", "efficientdm"])
def test_methods_without_packed_form_are_refused(name, tiny_bidm, tmp_path):
  with pytest.raises(ValueError) as e:
    ex.check_supported(get_method(name))
  assert f"method {name!r}" in one_line(e)
  model = tiny_bidm.model.clone(method=get_method(name))
  with pytest.raises(ValueError) as e:
    ex.write_export(tmp_path / "x.safetensors", model, {}, TINY_SHAPE[1:])
  assert f"method {name!r}" in one_line(e)
  assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# The export file and the packed model.


@pytest.fixture(scope="module")
def exported(tiny_bidm, tmp_path_factory):
  """The tiny BiDM U-Net (TBS, 2 connections) exported with float32 FP layers."""
  path = tmp_path_factory.mktemp("packed") / ex.EXPORT_FILE
  info = ex.write_export(
      path,
      tiny_bidm.model,
      tiny_bidm.params["params"],
      TINY_SHAPE[1:],
      source={"path": "random", "step": 7},
  )
  return path, info


@pytest.fixture(scope="module")
def packed_apply(tiny_bidm):
  """Jitted packed forwards of the tiny U-Net, always given a TBS cache (an empty one is the
  identity blend), so each impl compiles once."""
  model = tiny_bidm.model
  return {
      impl: jax.jit(
          lambda p, x, t, cache, impl=impl: pk.apply(model, p, x, t, cache=cache, impl=impl)
      )
      for impl in pk.IMPLS
  }


def empty_cache(tiny_bidm, x, t):
  out = jax.eval_shape(tiny_bidm.apply, tiny_bidm.params, x, t)
  return tbs.empty_cache(out.connections)


def test_export_eps_equals_simulated(tiny_bidm, exported, packed_apply):
  """eps of the loaded export = the simulated model's, on a first denoising step and on the
  next one with its TBS cache; the two packed impls agree to float rounding (their integer
  products are equal bit for bit, tested above; XLA may fuse the float epilogues differently)."""
  tree, desc = ex.read_export(exported[0])
  assert desc["source"] == {"path": "random", "step": 7}
  x, t = tiny_inputs()
  empty = empty_cache(tiny_bidm, x, t)
  sim = tiny_bidm.apply_cache(tiny_bidm.params, x, t, empty)
  outs = {impl: f(tree, x, t, empty) for impl, f in packed_apply.items()}
  assert_close(outs["int8"].eps, sim.eps)
  assert_close(outs["popcount"].eps, outs["int8"].eps)

  cache = tbs.TBSCache(tuple(sim.connections), jnp.ones((), bool))
  sim2 = tiny_bidm.apply_cache(tiny_bidm.params, x, t - 1, cache)
  packed_cache = tbs.TBSCache(tuple(outs["int8"].connections), jnp.ones((), bool))
  out2 = packed_apply["int8"](tree, x, t - 1, packed_cache)
  assert_close(out2.eps, sim2.eps)
  assert np.max(np.abs(np.asarray(sim2.eps) - np.asarray(sim.eps))) > 1e-3  # the cache acts
  for a, b in zip(out2.features, sim2.features):
    assert_close(a, b)


def test_export_of_the_table4_layout_equals_simulated(tmp_path):
  """Binary skip convs and no width shortcut (the paper's Table 4 layout): the skip convs are
  exported as binary layers, no layer has a real shortcut, and the packed eps is the simulated
  one."""
  method = get_method("bidm", width_shortcut="none", binary_skip_conv=True)
  model = UNet(**MICRO_UNET, method=method)
  params = random_params(model, MICRO_SHAPE, seed=4)
  info = ex.write_export(tmp_path / ex.EXPORT_FILE, model, params, MICRO_SHAPE[1:])
  tree, desc = ex.read_export(tmp_path / ex.EXPORT_FILE)
  assert {"up_0_block_0/nin_shortcut", "up_0_block_1/nin_shortcut"} <= set(desc["layers"])
  assert "nin_shortcuts" not in info["by_category"]
  assert "binary_shortcut_1x1" not in info["by_category"]
  x, t = tiny_inputs(MICRO_SHAPE)
  simulated = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t).eps)(params, x, t)
  packed = jax.jit(lambda p, x, t: pk.apply(model, p, x, t).eps)(tree, x, t)
  assert_close(packed, simulated)


def test_bfloat16_fp_layers(tiny_bidm, tmp_path, packed_apply):
  """fp_dtype=bfloat16 stores the FP layers in half the bytes; the packed model then equals
  the simulated one on the bfloat16-rounded FP parameters."""
  path = tmp_path / "bf16.safetensors"
  info = ex.write_export(
      path, tiny_bidm.model, tiny_bidm.params["params"], TINY_SHAPE[1:], fp_dtype="bfloat16"
  )
  tree, desc = ex.read_export(path)
  assert desc["fp_dtype"] == "bfloat16"
  assert info["by_category"]["time_mlp"] == 2 * (32 * 128 + 128 + 128 * 128 + 128)
  layers = set(desc["layers"])

  def rounded(path_, v):
    names = tuple(getattr(k, "key", k) for k in path_)[1:]  # below 'params'
    layer = "/".join(names[:-1])
    if layer in layers and names[-1] != "shortcut_kernel":
      return v
    return jnp.asarray(v, jnp.bfloat16).astype(jnp.float32)

  params = jax.tree_util.tree_map_with_path(rounded, tiny_bidm.params)
  x, t = tiny_inputs(seed=1)
  empty = empty_cache(tiny_bidm, x, t)
  assert_close(
      packed_apply["int8"](tree, x, t, empty).eps, tiny_bidm.apply_cache(params, x, t, empty).eps
  )


def test_file_is_standard_safetensors(exported):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  path, info = exported
  theirs = safetensors_numpy.load_file(str(path))
  data = path.read_bytes()
  ours, metadata = ex.parse_safetensors(data, str(path))
  assert set(theirs) == set(ours)
  for k, v in ours.items():
    np.testing.assert_array_equal(theirs[k], v)
  assert metadata["format"] == ex.FORMAT
  assert info["file_bytes"] == len(data)
  assert 0 < info["file_bytes"] - info["tensor_bytes"] < 64 * 1024  # the header
  desc = json.loads(metadata["description"])
  conv1 = desc["layers"]["down_0_block_0/conv1"]
  assert conv1 == dict(
      kind="conv",
      kernel=[3, 3, 32, 32],
      strides=1,
      padding=[[1, 1], [1, 1]],
      input=[16, 16],
      output=[16, 16],
      reduction=288,
      words=9,
  )
  assert ours["down_0_block_0/conv1/sign_bits"].shape == (32, 9)
  assert ours["down_0_block_0/conv1/sign_bits"].dtype == np.uint32


def test_cifar10_size():
  """The CIFAR-10 (ch 128) export's bytes by category, from shapes alone: the sign bits are
  exactly one bit per binary weight, and the file is 8.7x (float32 FP layers) and 13.6x
  (bfloat16) smaller than the FP float32 checkpoint; 1x1 FP convs are most of the rest."""
  config = config_lib.load_config_file(str(REPO / "configs/cifar10.py"))
  model = train_model(config)
  f32 = ex.export_sizes(model, (32, 32, 3))
  bf16 = ex.export_sizes(model, (32, 32, 3), "bfloat16")
  layers, _ = ex.trace_binary_layers(model, (32, 32, 3))
  binary_weights = sum(int(np.prod(v["kernel"])) for v in layers.values())
  assert f32["by_category"]["binary_sign_bits"] == binary_weights // 8
  assert f32["fp_f32_bytes"] == 4 * 35_746_783
  assert 8.5 < f32["ratio"] < 9 and 13.5 < bf16["ratio"] < 14
  one_by_one = bf16["by_category"]["nin_shortcuts"] + bf16["by_category"]["binary_shortcut_1x1"]
  assert one_by_one > bf16["by_category"]["binary_sign_bits"]


# ---------------------------------------------------------------------------------------------
# Damaged and mismatched files.


def _rewrite(path, out, edit_tensors=None, edit_desc=None):
  tensors, metadata = ex.parse_safetensors(path.read_bytes(), str(path))
  desc = json.loads(metadata["description"])
  if edit_tensors:
    edit_tensors(tensors)
  if edit_desc:
    edit_desc(desc)
  metadata = dict(metadata, description=json.dumps(desc))
  out.write_bytes(ex.safetensors_bytes(tensors, metadata))
  return out


def _flip_last_byte(path, out):
  data = bytearray(path.read_bytes())
  data[-1] ^= 0x40
  out.write_bytes(bytes(data))
  return out


def _without(name):
  def edit(tensors):
    del tensors[name]

  return edit


def _drop_everywhere(name):
  def edit(desc):
    del desc["checksum"][name]

  return edit


def _write(out, data: bytes):
  out.write_bytes(data)
  return out


DAMAGE = {
    "truncated": (lambda p, o: _write(o, p.read_bytes()[:-100]), "truncated"),
    "empty": (lambda p, o: _write(o, b""), "not a readable safetensors"),
    "garbage header": (
        lambda p, o: _write(o, struct.pack("<Q", 4) + b"{]x}"),
        "header is not JSON",
    ),
    "flipped bit": (_flip_last_byte, "do not match their checksum"),
    "missing tensor": (
        lambda p, o: _rewrite(p, o, _without("conv_out/bias"), _drop_everywhere("conv_out/bias")),
        "does not hold the tensors of the model it describes",
    ),
    "unlisted tensor": (
        lambda p, o: _rewrite(p, o, _without("conv_out/bias")),
        "not those its description lists",
    ),
    "other version": (
        lambda p, o: _rewrite(p, o, edit_desc=lambda d: d.update(version=99)),
        "version 99",
    ),
    "other model": (
        lambda p, o: _rewrite(p, o, edit_desc=lambda d: d["model"].update(ch=64)),
        "does not hold the tensors",
    ),
    "unknown method": (
        lambda p, o: _rewrite(
            p, o, edit_desc=lambda d: d["method"].update(activation_binarizer="dorefa")
        ),
        "describes no model",
    ),
    "not an export": (
        lambda p, o: _write(o, ex.safetensors_bytes({"w": np.zeros(3, np.float32)}, {})),
        "is not a bidm-jax-packed export",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_files_give_one_line(exported, tmp_path, case):
  make, message = DAMAGE[case]
  path = make(exported[0], tmp_path / "bad.safetensors")
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ex.read_export(path)
  assert message in one_line(e)


def test_missing_file(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ex.read_export(tmp_path / "none.safetensors")
  assert "no packed export" in one_line(e)


def export_config(**binarization):
  c = config_lib.default_config()
  c.model.update(**TINY_UNET)
  c.data.update(image_size=TINY_SHAPE[1], channels=TINY_SHAPE[3])
  c.tbs.connections = TBS_CONNECTIONS
  c.binarization.update(method="bidm", **binarization)
  return c


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.model.update(ch=64), "ch: checkpoint 32 vs config 64"),
        (lambda c: c.binarization.update(binary_bias=False), "binary_bias: export True"),
        (
            lambda c: c.binarization.update(width_shortcut="none"),
            "binarization width_shortcut: export 'conv' vs config 'none'",
        ),
        (lambda c: c.binarization.update(method="xnor"), "binarization name"),
        (lambda c: c.tbs.update(connections=1), "tbs_connections: export 2 vs config 1"),
        (lambda c: c.data.update(image_size=32), "image shape"),
    ],
)
def test_export_of_another_setting_is_refused(exported, change, message):
  config = export_config()
  params, meta = ex.load_export(exported[0].parent, config)  # a folder holding the file
  assert meta["kind"] == "packed" and meta["method"]["name"] == "bidm" and meta["step"] == 7
  change(config)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ex.load_export(exported[0], config)
  assert message in one_line(e)


def test_export_from_before_the_table4_fields_loads(exported, tmp_path):
  """An export whose method predates width_shortcut and binary_skip_conv has their defaults."""

  def drop_fields(desc):
    del desc["method"]["width_shortcut"], desc["method"]["binary_skip_conv"]

  path = _rewrite(exported[0], tmp_path / "old.safetensors", edit_desc=drop_fields)
  _, meta = ex.load_export(path, export_config())
  assert "width_shortcut" not in meta["method"]
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ex.load_export(path, export_config(binary_skip_conv=True))
  assert "binarization binary_skip_conv: export False vs config True" in one_line(e)


def test_parameters_that_do_not_fit_are_refused(tiny_bidm, tiny_fp, tmp_path):
  """FP parameters (no thresholds, k, shortcut scales) given for a BiDM export."""
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ex.write_export(
        tmp_path / "x.safetensors", tiny_bidm.model, tiny_fp.params["params"], TINY_SHAPE[1:]
    )
  assert "do not fit a 'bidm' model" in one_line(e)


def test_packed_engine_needs_packed_parameters(tiny_bidm):
  x, t = tiny_inputs()
  with pytest.raises(ValueError) as e:
    jax.eval_shape(lambda p: pk.apply(tiny_bidm.model, p, x, t), tiny_bidm.params["params"])
  assert "holds no packed weights" in one_line(e)


def test_layer_table_dataclass_round_trip(exported):
  """The description rebuilds the exported model (architecture, method, TBS)."""
  _, desc = ex.read_export(exported[0])
  model = ex.model_from_description(desc)
  assert model.method == get_method("bidm") and model.num_connections == TBS_CONNECTIONS
  assert dataclasses.asdict(model.method) == desc["method"]


# ---------------------------------------------------------------------------------------------
# The command-line modes: export, sample and evaluate with sampling.engine=packed.


def micro_config():
  c = config_lib.default_config()
  c.data = default_data_config("digits")
  c.data.update(image_size=MICRO_SHAPE[1], channels=1, random_flip=False)
  c.model.update(**MICRO_UNET)
  c.tbs.connections = TBS_CONNECTIONS
  c.sampling.update(steps=3, num_samples=4, batch_size=4)
  config_lib.validate(c)
  return c


def test_export_mode_and_packed_sampling(tmp_path, monkeypatch):
  """--mode=export of a BiDM model, then --mode=sample from the export with the packed engine:
  the images (DDIM with the TBS cache) of the simulated engine from the checkpoint."""
  config = micro_config()
  apply_packed = pk.apply
  model = builders.make_model(config, config_lib.method_from_config(config))
  params = random_params(model, (1, *MICRO_SHAPE[1:3], 1), seed=5)
  ckpt_lib.export_params(tmp_path / "model", params, builders.model_description(config))
  config.sampling.checkpoint = str(tmp_path / "model")
  work = tmp_path / "work"
  info = main.run(config, str(work), "export")
  assert info["path"] == str(work / ex.EXPORT_FILE) and info["file_bytes"] > 0
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    main.run(config, str(work), "export")
  assert "already exists" in one_line(e)

  main.run(config, str(tmp_path / "simulated"), "sample")
  config.sampling.update(engine="packed", checkpoint=str(work))
  main.run(config, str(tmp_path / "packed"), "sample")
  simulated = np.load(tmp_path / "simulated" / "samples.npz")["images"].astype(int)
  packed = np.load(tmp_path / "packed" / "samples.npz")["images"].astype(int)
  assert packed.shape == simulated.shape == (4, *MICRO_SHAPE[1:3], 1)
  # Each eps is equal within float32 rounding, but a sign whose input lies within that rounding
  # of 0 can flip in a later step (DDIM scales eps by up to 1/sqrt(abar_t)), so a few values
  # of a chain may differ.
  assert np.mean(packed == simulated) > 0.95 and np.mean(np.abs(packed - simulated)) < 0.5
  # sampling.packed_impl picks the product form; popcount's integers equal int8's exactly.
  impls = []
  monkeypatch.setattr(
      pk, "apply", lambda *a, impl, **k: impls.append(impl) or apply_packed(*a, impl=impl, **k)
  )
  config.sampling.packed_impl = "popcount"
  main.run(config, str(tmp_path / "popcount"), "sample")
  assert set(impls) == {"popcount"}
  popcount = np.load(tmp_path / "popcount" / "samples.npz")["images"].astype(int)
  np.testing.assert_array_equal(popcount, packed)
  config.sampling.packed_impl = "int8"

  config.sampling.checkpoint = str(tmp_path / "model")  # a checkpoint, not an export
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    main.run(config, str(tmp_path / "packed"), "sample")
  assert "no packed export" in one_line(e)
  with pytest.raises(ValueError) as e:  # training samples its own simulated model
    main.run(config, str(tmp_path / "train"), "train")
  assert "config.sampling.engine" in one_line(e)


def test_evaluate_reads_the_export_with_the_packed_engine(exported, tmp_path):
  """evaluate loads through load_export under sampling.engine=packed (here refused: the
  config's method differs from the export's)."""
  weights = tmp_path / "default_1.pt"
  weights.write_bytes(b"")  # found by name, never loaded: the model is refused first
  config = export_config(learnable_k=False)
  config.sampling.update(engine="packed", checkpoint=str(exported[0]))
  config.eval.inception_weights = str(weights)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    eval_lib.evaluate(config, str(tmp_path))
  assert "binarization learnable_k: export True vs config False" in one_line(e)
