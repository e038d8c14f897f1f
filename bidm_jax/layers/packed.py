"""Binary layers on packed sign bits: the inference form of the binary convs and dense layers.

The simulated layers (`layers/binary.py`) compute `conv(sign(x + tau), alpha * sign(W))` in
floating point. Here the same layer reads its weights as packed sign bits and computes the +-1
product exactly, as an integer, then applies the real epilogue of paper appendix B:

  y = dot(sign(x + tau), sign W) * K' * alpha [+ b] [RPReLU] + s * shortcut(x) [RPReLU]
  K' = conv(sum_c |x|, k / Cin)     (the 1/Cin of mean_c folded into the k filter)

`dot` is an int32 sum of +-1 products over the valid (not zero-padded) taps. Two portable XLA
forms compute it, equal as integers to each other and to the float simulation (whose +-1 sums
are exact in float32 below 2^24 terms):
  'int8'      unpack the weight bits to +-1 int8, convolve with int32 accumulation (GPU int8
              tensor cores, the TPU MXU; on CUDA GPUs with cuDNN's f32 output, exact for the
              same reason); the zero padding of lax.conv is exactly the 0 of a padded
              activation.
  'popcount'  im2col of the activation sign bits into uint32 words, then AND-popcount with
              the operand popcounts and a border correction (docs/packed.md): the arithmetic a
              1-bit tensor-core kernel (mma .b1 .and.popc) performs, kept as its reference
              rather than for speed.
  'cuda'      the same arithmetic on the 1-bit tensor cores, with a fused sign-and-pack of the
              activations (kernels/binary_cuda.py, an optional extension built from source);
              where it is not built or the backend is not a CUDA GPU, it runs as 'popcount'
              and says so in one log line.

Bit layout (shared with the export file and the CUDA kernel): the reduction axis of a
kernel (kh, kw, Cin) is flattened Cin fastest (HWIO order), K = kh * kw * Cin; each output
channel holds ceil(K / 32) little-endian uint32 words, bit j of word i being element 32 i + j,
1 for +1 (W >= 0; sign(0) = +1), 0 for -1; tail bits are 0. `sign_bits` is (Cout, words).

`apply` runs a U-Net whose binary layers hold packed parameters (`export/packed.py`): every
binary BinaryConv / BinaryDense call is routed here by a Flax method interceptor, so the model,
its attention, TBS cache and samplers are the simulated model's own code.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from bidm_jax.binarize.methods import BinarizationMethod
from bidm_jax.kernels import binary_cuda
from bidm_jax.layers.binary import BinaryConv, BinaryDense, _pad_amounts, activation_scale_conv

Array = jax.Array
Params = Mapping[str, Array]

WORD_BITS = 32
IMPLS = ("int8", "popcount")  # the portable XLA forms
ALL_IMPLS = IMPLS + ("cuda",)
_DIMS = ("NHWC", "HWIO", "NHWC")


def num_words(k: int) -> int:
  """uint32 words holding k bits."""
  return -(-k // WORD_BITS)


def pack_bits(bits: Array) -> Array:
  """Booleans along the last axis to little-endian uint32 words, tail bits 0.

  bits: (..., K) bool -> (..., ceil(K / 32)) uint32; bit j of word i is element 32 i + j.
  """
  k = bits.shape[-1]
  pad = num_words(k) * WORD_BITS - k
  bits = jnp.pad(jnp.asarray(bits, bool), [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
  bits = bits.reshape(bits.shape[:-1] + (-1, WORD_BITS)).astype(jnp.uint32)
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)  # disjoint bits: sum == OR


def unpack_bits(words: Array, k: int) -> Array:
  """Inverse of pack_bits: (..., ceil(k / 32)) uint32 -> (..., k) bool."""
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  bits = (words[..., None] >> shifts) & jnp.uint32(1)
  return bits.reshape(words.shape[:-1] + (-1,))[..., :k].astype(bool)


def pack_kernel(kernel: Array) -> Array:
  """sign bits of a kernel: (kh, kw, Cin, Cout) or (Cin, Cout) -> (Cout, ceil(K / 32)) uint32.

  The reduction axes are flattened Cin fastest; bit 1 where W >= 0 (sign(0) = +1, Eq. 6/7).
  """
  cout = kernel.shape[-1]
  return pack_bits((kernel >= 0).reshape(-1, cout).T)


def unpack_kernel(sign_bits: Array, shape, dtype=jnp.int8) -> Array:
  """+-1 kernel of `shape` (..., Cout) from its sign bits (Cout, words), in `dtype`."""
  k = math.prod(shape[:-1])
  bits = unpack_bits(sign_bits, k).T.reshape(tuple(shape))
  return jnp.where(bits, 1, -1).astype(dtype)


def activation_bits(x: Array, threshold: Array | None) -> Array:
  """sign(x + tau) >= 0 as booleans, rounded exactly as the simulated binarizer. (..., C)."""
  if threshold is not None:
    x = x + threshold.astype(x.dtype)
  return x >= 0


def _popcount(words: Array) -> Array:
  """Set bits of uint32 words, summed over the last axis: (..., W) -> (...) int32."""
  return jnp.sum(jax.lax.population_count(words).astype(jnp.int32), axis=-1)


def _patches(x: Array, kernel_size, strides: int, padding, fill) -> Array:
  """im2col in the kernel's reduction order: (B, H, W, C) -> (B, H', W', kh * kw * C),
  taps row-major and C fastest; positions outside the input hold `fill`."""
  (top, bottom), (left, right) = padding
  kh, kw = kernel_size
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
  ho = (xp.shape[1] - kh) // strides + 1
  wo = (xp.shape[2] - kw) // strides + 1
  taps = [
      xp[:, dy : dy + strides * (ho - 1) + 1 : strides, dx : dx + strides * (wo - 1) + 1 : strides]
      for dy in range(kh)
      for dx in range(kw)
  ]
  return jnp.concatenate(taps, axis=-1)


def resolve_impl(impl: str) -> str:
  """The impl that runs: 'cuda' is 'popcount' where the CUDA extension is not usable."""
  if impl not in ALL_IMPLS:
    raise ValueError(f"impl must be one of {ALL_IMPLS}, got {impl!r}")
  if impl == "cuda" and not binary_cuda.available():
    return "popcount"
  return impl


def cuda_weights(sign_bits: Array, kernel_shape) -> tuple[Array, Array]:
  """The CUDA conv's weights: (Cout, ceil(K / 32)) -> (Cout, Kp) uint32 with each tap's Cin
  bits starting a word (as the activation words of a pixel; the same words when Cin % 32 == 0),
  zero-padded to the kernel's 256-bit K step, and the set bits per tap (Cout, kh * kw) int32."""
  kh, kw, cin, cout = kernel_shape
  if cin % WORD_BITS:
    words = pack_bits(unpack_bits(sign_bits, kh * kw * cin).reshape(cout, kh * kw, cin))
  else:
    words = sign_bits.reshape(cout, kh * kw, -1)
  tap_pop = _popcount(words)
  words = words.reshape(cout, -1)
  pad = -words.shape[1] % binary_cuda.CHUNK_WORDS
  return jnp.pad(words, ((0, 0), (0, pad))), tap_pop


def _cuda_conv(xwords: Array, sign_bits: Array, kernel_shape, strides: int, padding) -> Array:
  weights, tap_pop = cuda_weights(sign_bits, kernel_shape)
  return binary_cuda.binary_conv(
      xwords,
      weights,
      tap_pop,
      kernel_size=kernel_shape[:2],
      cin=kernel_shape[2],
      strides=strides,
      padding=padding,
  )


def _cuda_matmul(xwords: Array, sign_bits: Array, cin: int) -> Array:
  """A product as the 1x1 conv of one-pixel images."""
  cout = sign_bits.shape[0]
  y = _cuda_conv(
      xwords.reshape(-1, 1, 1, xwords.shape[-1]), sign_bits, (1, 1, cin, cout), 1, ((0, 0), (0, 0))
  )
  return y.reshape(xwords.shape[:-1] + (cout,))


def _int8_product(product: Callable[[Any], Array], terms: int, *, f32: bool | None = None) -> Array:
  """An int8 +-1 product as int32: `product(dtype)` computes it with that output type.

  CUDA GPUs take an int8 convolution only in cuDNN's form (s8 operands, f32 output; XLA
  refuses an s32 output), so there the product is asked for in f32 and converted: exact,
  since each of its `terms` products is +-1 and a sum of fewer than 2^24 of them is an integer
  that f32 holds exactly. Other backends accumulate in int32 directly. `f32` forces one form
  (tests); None picks by platform at lowering.
  """
  as_f32 = lambda: product(jnp.float32).astype(jnp.int32)
  as_s32 = lambda: product(jnp.int32)
  if f32 is not None:
    return as_f32() if f32 else as_s32()
  if terms >= 2**24:
    return as_s32()
  return jax.lax.platform_dependent(cuda=as_f32, rocm=as_f32, default=as_s32)


def sign_conv(
    xbits: Array, sign_bits: Array, kernel_shape, strides: int, padding, impl: str = "int8"
) -> Array:
  """The +-1 convolution, exact: sum over the valid taps of sign(x) sign(W).

  xbits: (B, H, W, Cin) bool (True = +1); sign_bits: (Cout, ceil(K / 32)) uint32;
  kernel_shape: (kh, kw, Cin, Cout); padding: ((top, bottom), (left, right)), zero padding
  (a padded activation is 0, not -1) -> (B, H', W', Cout) int32.
  """
  kh, kw, cin, cout = kernel_shape
  impl = resolve_impl(impl)
  if impl == "cuda":
    return _cuda_conv(pack_bits(xbits), sign_bits, kernel_shape, strides, padding)
  if impl == "int8":
    xs = jnp.where(xbits, 1, -1).astype(jnp.int8)
    w = unpack_kernel(sign_bits, kernel_shape, jnp.int8)
    conv = lambda out_dtype: jax.lax.conv_general_dilated(
        xs,
        w,
        (strides, strides),
        padding,
        dimension_numbers=_DIMS,
        preferred_element_type=out_dtype,
    )
    return _int8_product(conv, kh * kw * cin)
  a = pack_bits(_patches(xbits, (kh, kw), strides, padding, False))  # (B, H', W', Wd)
  valid = _patches(jnp.ones((1,) + xbits.shape[1:], bool), (kh, kw), strides, padding, False)
  m = pack_bits(valid[0])  # (H', W', Wd)
  aw = _popcount(a[..., None, :] & sign_bits)  # (B, H', W', Cout)
  # Over the valid taps V: sum (2a-1)(2w-1) = 4 popc(a&w) - 2 popc(a) - 2 popc(w&m) + |V|;
  # padded activation bits are 0, so only the weight count needs the mask (the border term).
  wm = _popcount(m[..., None, :] & sign_bits)  # (H', W', Cout)
  return 4 * aw - 2 * _popcount(a)[..., None] - 2 * wm + _popcount(m)[..., None]


def sign_matmul(xbits: Array, sign_bits: Array, impl: str = "int8") -> Array:
  """The +-1 matrix product, exact: (..., Cin) bool x (Cout, ceil(Cin / 32)) -> (..., Cout)
  int32."""
  cin = xbits.shape[-1]
  impl = resolve_impl(impl)
  if impl == "cuda":
    return _cuda_matmul(pack_bits(xbits), sign_bits, cin)
  if impl == "int8":
    xs = jnp.where(xbits, 1, -1).astype(jnp.int8)
    w = unpack_kernel(sign_bits, (cin, sign_bits.shape[0]), jnp.int8)
    return _int8_product(lambda out_dtype: jnp.matmul(xs, w, preferred_element_type=out_dtype), cin)
  a = pack_bits(xbits)
  aw = _popcount(a[..., None, :] & sign_bits)
  return 4 * aw - 2 * _popcount(a)[..., None] - 2 * _popcount(sign_bits) + cin


def _conv(x: Array, kernel: Array, strides: int, padding) -> Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), padding, dimension_numbers=_DIMS
  )


def _rprelu(p: Params, y: Array) -> Array:
  z = y - p["rprelu_shift_in"].astype(y.dtype)
  z = jnp.where(z >= 0, z, p["rprelu_slope"].astype(y.dtype) * z)
  return z + p["rprelu_shift_out"].astype(y.dtype)


def _shortcut(x: Array, p: Params, strides: int, out_shape) -> Array:
  """The real path of BinaryConv._shortcut: average pool when strided, 1x1 conv when the
  channel count changes."""
  if strides > 1:
    x = nn.avg_pool(x, (strides, strides), (strides, strides))
  if x.shape[1:3] != tuple(out_shape[1:3]):
    raise ValueError(f"shortcut cannot map {x.shape} to {tuple(out_shape)}")
  if "shortcut_kernel" in p:
    x = _conv(x, p["shortcut_kernel"].astype(x.dtype), 1, ((0, 0), (0, 0)))
  return x


def binary_conv(
    x: Array,
    p: Params,
    *,
    kernel_size=(3, 3),
    strides: int = 1,
    padding: Any = "SAME",
    method: BinarizationMethod,
    impl: str = "int8",
) -> Array:
  """A binary BinaryConv on packed parameters (`export.packed.pack_layer`).

  x: (B, H, W, Cin) in the compute dtype; p: sign_bits (Cout, words) uint32, alpha (Cout,)
  (the weight scale, XNOR++'s Gamma folded in), and where the method has them threshold
  (Cin,), scale_kernel (kh, kw, 1, 1) = k / Cin, output_scale_h/_w, bias (Cout,), rprelu_*,
  shortcut_scale () and shortcut_kernel (1, 1, Cin, Cout) (none where the width changes under
  `width_shortcut='none'`). -> (B, H', W', Cout).
  """
  kh, kw = kernel_size
  pads = _pad_amounts(padding, (kh, kw))
  cin, cout = x.shape[-1], p["sign_bits"].shape[0]
  shape, impl = (kh, kw, cin, cout), resolve_impl(impl)
  if impl == "cuda":  # the fused sign-and-pack kernel feeds the conv kernel
    dot = _cuda_conv(
        binary_cuda.sign_pack(x, p.get("threshold")), p["sign_bits"], shape, strides, pads
    )
  else:
    dot = sign_conv(
        activation_bits(x, p.get("threshold")), p["sign_bits"], shape, strides, pads, impl
    )
  y = dot.astype(x.dtype)
  if method.activation_scale == "xnor":
    a = jnp.sum(jnp.abs(x), axis=-1, keepdims=True)
    y = y * activation_scale_conv(a, p["scale_kernel"].astype(x.dtype), strides, pads)
  y = y * p["alpha"].astype(x.dtype)
  if method.output_scale == "factorised":
    y = (
        y
        * p["output_scale_h"].astype(y.dtype)[:, None, None]
        * p["output_scale_w"].astype(y.dtype)[:, None]
    )
  if "bias" in p:
    y = y + p["bias"].astype(y.dtype)
  if method.rprelu == "before_shortcut":
    y = _rprelu(p, y)
  if method.has_shortcut(cin, cout):
    y = y + p["shortcut_scale"].astype(y.dtype) * _shortcut(x, p, strides, y.shape)
  if method.rprelu == "after_shortcut":
    y = _rprelu(p, y)
  return y


def binary_dense(x: Array, p: Params, *, impl: str = "int8") -> Array:
  """A binary BinaryDense on packed parameters: (..., Cin) -> (..., Cout).

  p: sign_bits (Cout, words), alpha (Cout,) (Gamma folded in), threshold (Cin,) and bias
  (Cout,) where the layer has them.
  """
  impl = resolve_impl(impl)
  if impl == "cuda":
    dot = _cuda_matmul(binary_cuda.sign_pack(x, p.get("threshold")), p["sign_bits"], x.shape[-1])
  else:
    dot = sign_matmul(activation_bits(x, p.get("threshold")), p["sign_bits"], impl)
  y = dot.astype(x.dtype) * p["alpha"].astype(x.dtype)
  return y + p["bias"].astype(y.dtype) if "bias" in p else y


def _route_binary_layers(next_fun, args, kwargs, context, *, impl: str):
  """Flax interceptor: binary BinaryConv / BinaryDense calls run on their packed parameters;
  every other module (FP layers included) runs as it is."""
  module = context.module
  if (
      context.method_name != "__call__"
      or not isinstance(module, (BinaryConv, BinaryDense))
      or not module.method.binary
  ):
    return next_fun(*args, **kwargs)
  p = module.variables.get("params", {})
  if "sign_bits" not in p:
    raise ValueError(
        f"binary layer {'/'.join(module.path)} holds no packed weights "
        "(sign_bits): apply the packed engine to exported parameters"
    )
  x = args[0].astype(module.dtype)
  if isinstance(module, BinaryConv):
    return binary_conv(
        x,
        p,
        kernel_size=module.kernel_size,
        strides=module.strides,
        padding=module.padding,
        method=module.method,
        impl=impl,
    )
  return binary_dense(x, p, impl=impl)


def packed_layers(impl: str = "int8"):
  """Context manager: inside it, models run their binary layers on packed parameters."""
  return nn.intercept_methods(functools.partial(_route_binary_layers, impl=resolve_impl(impl)))


def apply(model: nn.Module, params, x: Array, t: Array, *, cache=None, impl: str = "int8"):
  """model.apply on packed parameters (the tree of `export.packed.export_tree`): the U-Net's
  UNetOutput, the same as the simulated model's on the parameters it was exported from."""
  with packed_layers(impl):
    return model.apply({"params": params}, x, t, cache=cache)
