"""The CUDA extension (kernels/binary_cuda.py): the 1-bit tensor-core conv and the fused
sign-and-pack kernel must give exactly the integers and bits of path 2 (impl='popcount',
pack_bits of activation_bits), padding border included.

On any machine: the fallback, the kernel's arithmetic emulated in numpy on the operands the
Python side prepares, and the custom calls' lowering for CUDA. Every other test needs a CUDA GPU
and the built library (`python bidm_jax/kernels/cuda/build.py`); without them they skip and say
which is missing.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from bidm_jax.binarize.methods import get_method
from bidm_jax.export import packed as ex
from bidm_jax.kernels import binary_cuda
from bidm_jax.layers import packed as pk
from bidm_jax.layers.binary import BinaryConv, BinaryDense, _pad_amounts
from helpers import fill_params
from test_packed import ODD_CASES, unet_layer_shapes

REASON = binary_cuda.unavailable_reason()
needs_cuda = pytest.mark.skipif(REASON is not None, reason=f"CUDA kernel not usable: {REASON}")


def random_bits(rng, shape):
  return jnp.asarray(rng.random(shape) < 0.5)


def random_sign_bits(rng, cout, k):
  return pk.pack_bits(random_bits(rng, (cout, k)))


def assert_same_conv(xbits, sign_bits, kernel_shape, strides, pads):
  run = jax.jit(pk.sign_conv, static_argnums=(2, 3, 4, 5))
  got = run(xbits, sign_bits, kernel_shape, strides, pads, "cuda")
  want = run(xbits, sign_bits, kernel_shape, strides, pads, "popcount")
  assert got.dtype == jnp.int32 and got.shape == want.shape
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_cuda_falls_back_to_popcount_with_one_log_line(caplog):
  """Without the extension (or a CUDA GPU) impl='cuda' computes impl='popcount', logged once."""
  if REASON is None:
    pytest.skip("the CUDA kernel is usable here: no fallback to check")
  binary_cuda.available.cache_clear()
  rng = np.random.default_rng(0)
  xbits = random_bits(rng, (2, 5, 6, 40))
  sign_bits = random_sign_bits(rng, 7, 9 * 40)
  with caplog.at_level("WARNING"):
    for _ in range(3):
      got = pk.sign_conv(xbits, sign_bits, (3, 3, 40, 7), 1, ((1, 1), (1, 1)), "cuda")
    dense = pk.sign_matmul(xbits[0, 0], random_sign_bits(rng, 3, 40), "cuda")
  want = pk.sign_conv(xbits, sign_bits, (3, 3, 40, 7), 1, ((1, 1), (1, 1)), "popcount")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert dense.shape == (6, 3)
  lines = [r.getMessage() for r in caplog.records if "impl='cuda'" in r.getMessage()]
  assert len(lines) == 1 and REASON in lines[0], lines


def kernel_arithmetic(xbits, sign_bits, kernel_shape, strides, pads):
  """The conv kernel's integer algorithm in numpy, on the operands `cuda_weights` prepares:
  AND-popcount over tap-aligned words with out-of-image pixels as 0 words, then
  4 popc(A & W) - 2 popc(A) - 2 (popc(W) - counts of the invalid taps) + |V| Cin."""
  kh, kw, cin, cout = kernel_shape
  weights, tap_pop = map(np.asarray, pk.cuda_weights(sign_bits, kernel_shape))
  xw = np.asarray(pk.pack_bits(xbits))
  b, h, w, cw = xw.shape
  (top, bottom), (left, right) = pads
  ho, wo = (h + top + bottom - kh) // strides + 1, (w + left + right - kw) // strides + 1
  popc = np.vectorize(lambda v: bin(int(v)).count("1"), otypes=[np.int64])
  out = np.zeros((b, ho, wo, cout), np.int64)
  for n in range(b):
    for oy in range(ho):
      for ox in range(wo):
        row = np.zeros(weights.shape[1], np.uint32)
        invalid = []
        for t in range(kh * kw):
          iy, ix = oy * strides - top + t // kw, ox * strides - left + t % kw
          if 0 <= iy < h and 0 <= ix < w:
            row[t * cw : (t + 1) * cw] = xw[n, iy, ix]
          else:
            invalid.append(t)
        aw = popc(weights & row).sum(-1)
        wm = tap_pop.sum(-1) - tap_pop[:, invalid].sum(-1)
        out[n, oy, ox] = 4 * aw - 2 * popc(row).sum() - 2 * wm + (kh * kw - len(invalid)) * cin
  return out


@pytest.mark.parametrize(
    "case",
    [
        (5, 6, 40, 5, (3, 3), 1, ((1, 1), (1, 1))),
        (6, 6, 64, 4, (3, 3), 2, ((0, 1), (0, 1))),
        (5, 4, 12, 3, (3, 1), 2, ((2, 0), (0, 1))),
        (4, 4, 33, 2, (1, 1), 1, ((0, 0), (0, 0))),
    ],
)
def test_kernel_arithmetic_on_cpu(case):
  """The kernel's operand preparation (tap-aligned, 8-word-padded weights, per-tap counts) and
  its border correction, run in numpy, equal path 2: what the CPU can check of the design."""
  h, w, cin, cout, kernel, stride, pads = case
  rng = np.random.default_rng(cin)
  xbits = random_bits(rng, (2, h, w, cin))
  sign_bits = random_sign_bits(rng, cout, kernel[0] * kernel[1] * cin)
  weights, _ = pk.cuda_weights(sign_bits, (*kernel, cin, cout))
  assert weights.shape[1] % binary_cuda.CHUNK_WORDS == 0
  want = pk.sign_conv(xbits, sign_bits, (*kernel, cin, cout), stride, pads, "popcount")
  np.testing.assert_array_equal(
      kernel_arithmetic(xbits, sign_bits, (*kernel, cin, cout), stride, pads), np.asarray(want)
  )


def test_custom_calls_lower_for_cuda():
  """Both FFI calls lower for the CUDA platform on any machine: targets, int64 attributes and
  the shapes the handlers check (x words, padded weights, per-tap counts -> int32 NHWC)."""

  def conv(xw, sign_bits):
    weights, tap_pop = pk.cuda_weights(sign_bits, (3, 3, 128, 16))
    return binary_cuda.binary_conv(
        xw, weights, tap_pop, kernel_size=(3, 3), cin=128, strides=2, padding=((0, 1), (0, 1))
    )

  checks = [
      export.DisabledSafetyCheck.custom_call(name)
      for name in ("bidm_binary_conv", "bidm_sign_pack")
  ]
  lowered = export.export(jax.jit(conv), platforms=["cuda"], disabled_checks=checks)(
      jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.uint32), jax.ShapeDtypeStruct((16, 36), jnp.uint32)
  )
  text = lowered.mlir_module()
  call = re.search(r"custom_call @bidm_binary_conv\(.*", text).group(0)
  for attr in (
      "cin = 128 : i64",
      "kh = 3 : i64",
      "kw = 3 : i64",
      "pad_left = 0 : i64",
      "pad_top = 0 : i64",
      "stride = 2 : i64",
  ):
    assert attr in call, call
  assert (
      "(tensor<2x8x8x4xui32>, tensor<16x40xui32>, tensor<16x9xi32>) -> tensor<2x4x4x16xi32>" in call
  )
  pack = export.export(
      jax.jit(lambda x: binary_cuda.sign_pack(x, None)), platforms=["cuda"], disabled_checks=checks
  )(jax.ShapeDtypeStruct((2, 3, 70), jnp.bfloat16))
  assert re.search(
      r"custom_call @bidm_sign_pack\(.*\(tensor<2x3x70xbf16>, tensor<70xbf16>\) "
      r"-> tensor<2x3x3xui32>",
      pack.mlir_module(),
  )


@needs_cuda
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("c", [1, 5, 31, 32, 33, 70, 128, 256])
def test_sign_pack_equals_pack_bits(c, dtype):
  """Thresholds applied, sign(0) = +1 (0 and -0.0 and x = -tau exactly), NaN -> -1 (False),
  tail bits 0, any leading shape."""
  rng = np.random.default_rng(c)
  x = rng.standard_normal((3, 7, 5, c)).astype(np.float32)
  tau = rng.standard_normal(c).astype(np.float32)
  x[0, 0, 0, :] = 0.0
  x[0, 0, 1, :] = -0.0
  x[0, 0, 2, :] = -np.asarray(jnp.asarray(tau, dtype).astype(jnp.float32))  # x + tau == 0
  x[0, 0, 3, 0] = np.nan
  x, tau = jnp.asarray(x, dtype), jnp.asarray(tau)
  for threshold in (tau, None):
    got = jax.jit(binary_cuda.sign_pack)(x, threshold)
    want = pk.pack_bits(pk.activation_bits(x, threshold))
    assert got.dtype == jnp.uint32 and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@needs_cuda
@pytest.mark.parametrize("shape", unet_layer_shapes(), ids=lambda s: "-".join(map(str, s)))
def test_unet_layer_shapes(shape):
  """Every conv and dense shape of the CIFAR-10 and digits U-Nets, batch 3 (M not a multiple
  of the 128-row tile)."""
  kind, kernel, strides, pads, size = shape
  rng = np.random.default_rng(sum(kernel))
  if kind == "dense":
    cin, cout = kernel
    xbits = random_bits(rng, (3, 2, cin))
    sign_bits = random_sign_bits(rng, cout, cin)
    got = jax.jit(pk.sign_matmul, static_argnums=2)(xbits, sign_bits, "cuda")
    want = pk.sign_matmul(xbits, sign_bits, "popcount")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    return
  kh, kw, cin, cout = kernel
  xbits = random_bits(rng, (3, *size, cin))
  assert_same_conv(xbits, random_sign_bits(rng, cout, kh * kw * cin), tuple(kernel), strides, pads)


@needs_cuda
@pytest.mark.parametrize(
    "case", ODD_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4][0]}{c[4][1]}-s{c[5]}"
)
def test_strides_odd_sizes_and_padding(case):
  """Odd sizes, Cin not a multiple of 32 (the scalar load path), strides 1 and 2, symmetric,
  asymmetric and no padding."""
  h, w, cin, cout, kernel, stride, padding = case
  rng = np.random.default_rng(h * w + cin)
  pads = _pad_amounts(padding, kernel)
  xbits = random_bits(rng, (2, h, w, cin))
  sign_bits = random_sign_bits(rng, cout, kernel[0] * kernel[1] * cin)
  assert_same_conv(xbits, sign_bits, (*kernel, cin, cout), stride, pads)


@needs_cuda
@pytest.mark.parametrize("cin,cout", [(128, 130), (96, 64), (256, 7), (512, 256)])
def test_many_tiles(cin, cout):
  """Several row and column tiles, partial last tiles, 16-byte (Cin % 128 == 0) and word loads."""
  rng = np.random.default_rng(cin + cout)
  xbits = random_bits(rng, (5, 17, 15, cin))
  sign_bits = random_sign_bits(rng, cout, 9 * cin)
  for strides, pads in ((1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1)))):
    assert_same_conv(xbits, sign_bits, (3, 3, cin, cout), strides, pads)


@needs_cuda
@pytest.mark.parametrize("cin", [40, 128])
def test_zero_padding_border_is_exact(cin):
  """All activations -1 and all weights +1: corners see 4 taps, edges 6, the interior 9; the
  downsample's (0, 1) padding leaves 9, 6 and 4."""
  cout = 3
  sign_bits = pk.pack_kernel(jnp.ones((3, 3, cin, cout)))
  dot = pk.sign_conv(
      jnp.zeros((1, 5, 6, cin), bool), sign_bits, (3, 3, cin, cout), 1, ((1, 1), (1, 1)), "cuda"
  )
  taps = np.full((5, 6), 9)
  taps[[0, -1], :] -= 3
  taps[:, [0, -1]] -= 3
  taps[[0, 0, -1, -1], [0, -1, 0, -1]] = 4
  np.testing.assert_array_equal(np.asarray(dot)[0], np.repeat(-cin * taps[..., None], cout, -1))
  strided = pk.sign_conv(
      jnp.zeros((1, 6, 6, cin), bool), sign_bits, (3, 3, cin, cout), 2, ((0, 1), (0, 1)), "cuda"
  )
  np.testing.assert_array_equal(
      np.asarray(strided)[0, :, :, 0], -cin * np.array([[9, 9, 6], [9, 9, 6], [6, 6, 4]])
  )


@needs_cuda
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layers_equal_popcount_path(dtype):
  """binary_conv / binary_dense with impl='cuda' (sign-and-pack kernel feeding the conv
  kernel) give the popcount path's outputs exactly: same integers, same float epilogue."""
  method = get_method("bidm")
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 16, 16, 128)), dtype)
  layer = BinaryConv(256, (3, 3), strides=2, padding=((0, 1), (0, 1)), method=method, dtype=dtype)
  p = fill_params(jax.eval_shape(layer.init, jax.random.key(0), x), 1)["params"]
  q = ex.pack_layer(p, {"kind": "conv", "kernel": list(p["kernel"].shape)}, method)
  conv = jax.jit(
      lambda x, q, impl: pk.binary_conv(
          x, q, kernel_size=(3, 3), strides=2, padding=((0, 1), (0, 1)), method=method, impl=impl
      ),
      static_argnums=2,
  )
  np.testing.assert_array_equal(np.asarray(conv(x, q, "cuda")), np.asarray(conv(x, q, "popcount")))
  dense = BinaryDense(96, method=method)
  xd = x[:, 0, 0, :]
  pd = fill_params(jax.eval_shape(dense.init, jax.random.key(0), xd), 2)["params"]
  qd = ex.pack_layer(pd, {"kind": "dense", "kernel": list(pd["kernel"].shape)}, method)
  run = jax.jit(pk.binary_dense, static_argnames="impl")
  np.testing.assert_array_equal(
      np.asarray(run(xd, qd, impl="cuda")), np.asarray(run(xd, qd, impl="popcount"))
  )
