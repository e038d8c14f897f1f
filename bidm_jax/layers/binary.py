"""Binary convolution and dense layers (paper section 3.1, Eq. 6-10), Flax Linen.

One layer class serves both the full-precision model and every binary method: the method
object decides the forward. The full-precision mode creates only `kernel` and `bias`; binary
modes add their own small parameters (threshold, k, shortcut) next to them, so a binary
student's parameter tree contains the full-precision tree and the FP teacher can be applied
to it unchanged.

Each layer records its arithmetic in the 'costs' collection (`sow`), which the efficiency
report reads: `bops` for binary multiply-accumulates, `flops` for real ones, and `bits` of
parameter storage.

The binary forward of a conv, in the order applied (each step only where the method has it):
  xq = activation binarizer (x [+ tau])    e.g. sign, DoReFa {0,1}, s_x[bucket(t)] sign
  wq = weight binarizer (W)                e.g. alpha sign W, sign W, s_w sign(W0 + AB)
  y  = conv(xq, wq) [* K, XNOR activation scale] [output scale, e.g. XNOR++'s Gamma] [+ b]
  y  = [RPReLU(y), BBCU] + s * shortcut(x); [RPReLU(y), ReActNet]
       (no shortcut term where the width changes under `width_shortcut='none'`)
The binarizers and output scales are the method's registered objects (`method.binarizers`,
`binarize/binarizers.py`). Dense layers apply the binarizers and the output scale only (no
activation scale, shortcut or RPReLU). The formulas and papers are in
`binarize.methods.METHOD_DOCS`. The bias b is added unless the method has `binary_bias=False`
(the authors' release), in which case the 'bias' parameter is still created (the student's tree
contains the FP tree) but left unused.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bidm_jax.binarize import estimators
from bidm_jax.binarize.methods import FP, BinarizationMethod, QuantContext

Array = jax.Array
Dtype = Any

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def _conv(x: Array, kernel: Array, strides: int, padding) -> Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def activation_scale_conv(a: Array, k: Array, strides: int, padding) -> Array:
  """K = conv(a, k) for one channel: (B, H, W, 1) and (kh, kw, 1, 1) -> (B, H', W', 1).

  Computed as the sum of kh * kw shifted, strided slices of the padded input, in float32 and
  returned in a's dtype: elementwise work that XLA fuses with its neighbours, where a
  convolution with one input and one output channel would be a library call of its own in
  every binary layer, forward and backward (docs/benchmarks.md, the step profile). `padding`
  is 'SAME', 'VALID' or explicit ((top, bottom), (left, right)) pairs, as for lax.conv.
  """
  kh, kw = k.shape[:2]
  pads = (
      jax.lax.padtype_to_pads(a.shape[1:3], (kh, kw), (strides, strides), padding)
      if isinstance(padding, str)
      else padding
  )
  x = jnp.pad(a[..., 0].astype(jnp.float32), ((0, 0), *pads))
  h = (x.shape[1] - kh) // strides + 1
  w = (x.shape[2] - kw) // strides + 1
  k = k[:, :, 0, 0].astype(jnp.float32)
  out = sum(
      k[i, j]
      * x[:, i : i + (h - 1) * strides + 1 : strides, j : j + (w - 1) * strides + 1 : strides]
      for i in range(kh)
      for j in range(kw)
  )
  return out[..., None].astype(a.dtype)


def _pad_amounts(padding, kernel_size: tuple[int, int]):
  if padding == "SAME":
    return tuple(((k - 1) // 2, k // 2) for k in kernel_size)
  return tuple(tuple(p) for p in padding)


def record_cost(
    module: nn.Module,
    *,
    bops: float = 0.0,
    flops: float = 0.0,
    binary_params: int = 0,
    real_params: int = 0,
    kind: str = "layer",
) -> None:
  """Adds one layer's operation and storage counts to the 'costs' collection, under `kind`:
  'layer' (the layer's own weights and epilogue), 'shortcut' (a binary conv's real 1x1
  shortcut where it changes width) or 'attention_products' (the two real products of an
  attention block); `evaluation.efficiency` totals them and per kind."""
  module.sow(
      "costs",
      kind,
      jnp.array([bops, flops, binary_params, real_params], jnp.float32),
      reduce_fn=lambda a, b: a + b,
      init_fn=lambda: jnp.zeros(4, jnp.float32),
  )


class BinaryConv(nn.Module):
  """2D convolution, full precision or binarized by `method` (NHWC, HWIO kernel).

  Binary forward (XNOR/BiDM): `y = conv(sign(x + tau), alpha * sign(W)) * K + b + s *
  shortcut(x)` with `K = conv(mean_c |x|, k)` (XNOR activation scale, k learnable under BiDM),
  and shortcut the identity (avg-pooled when strided) or, when channels change, a
  full-precision 1x1 conv (`width_shortcut='conv'`) or nothing ('none'). Other methods swap
  the binarizers and add an output scale or RPReLU (module docstring). ctx: the QuantContext
  (timestep, training progress) the method may read; needed by timestep-aware methods, optional
  otherwise (progress then 1, inference).
  x: (B, H, W, Cin) -> (B, H', W', features).
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  padding: Any = "SAME"
  use_bias: bool = True
  method: BinarizationMethod = FP
  dtype: Dtype = jnp.float32
  kernel_init: Any = default_kernel_init

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext | None = None) -> Array:
    cin = x.shape[-1]
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    padding = _pad_amounts(self.padding, self.kernel_size)
    x = x.astype(self.dtype)
    method = self.method
    if not method.binary:
      y = _conv(x, kernel.astype(self.dtype), self.strides, padding)
      self._record(y, cin, binary=False)
      return y + bias.astype(self.dtype) if bias is not None else y

    kernel, bias = _binary_kernel_and_bias(method, kernel, bias)
    xb = _binarize_activation(self, x, ctx)
    wb = _binarize_weight(self, kernel, ctx).astype(self.dtype)
    y = _conv(xb, wb, self.strides, padding)
    if method.activation_scale == "xnor":
      y = y * self._activation_scale(x, padding)
    y = method.binarizers.output_scale(self, y)
    if bias is not None:
      y = y + bias.astype(self.dtype)
    if method.rprelu == "before_shortcut":
      y = _rprelu(self, y)
    if method.has_shortcut(cin, self.features):
      s = _shortcut_scale(self)
      y = y + s.astype(self.dtype) * self._shortcut(x, y.shape)
    if method.rprelu == "after_shortcut":
      y = _rprelu(self, y)
    self._record(y, cin, binary=True)
    return y

  def _activation_scale(self, x: Array, padding) -> Array:
    """K = conv(mean_c |x|, k): (B, H, W, Cin) -> (B, H', W', 1)."""
    kh, kw = self.kernel_size
    init = nn.initializers.constant(1.0 / (kh * kw))
    if self.method.learnable_k:
      k = self.param("scale_kernel", init, (kh, kw, 1, 1))
    else:
      k = init(None, (kh, kw, 1, 1))
    a = jnp.mean(jnp.abs(x), axis=-1, keepdims=True)
    return activation_scale_conv(a, k.astype(self.dtype), self.strides, padding)

  def _shortcut(self, x: Array, out_shape: Sequence[int]) -> Array:
    """Real-valued path from x to the output's shape (ReActNet)."""
    if self.strides > 1:
      x = nn.avg_pool(x, (self.strides, self.strides), (self.strides, self.strides))
    if x.shape[1:3] != tuple(out_shape[1:3]):
      raise ValueError(f"shortcut cannot map {x.shape} to {tuple(out_shape)}")
    if x.shape[-1] != out_shape[-1]:
      proj = self.param("shortcut_kernel", self.kernel_init, (1, 1, x.shape[-1], out_shape[-1]))
      x = _conv(x, proj.astype(self.dtype), 1, ((0, 0), (0, 0)))
      record_cost(
          self,
          flops=2.0 * x.shape[1] * x.shape[2] * proj.size,
          real_params=proj.size,
          kind="shortcut",
      )
    return x

  def _record(self, y: Array, cin: int, binary: bool) -> None:
    kh, kw = self.kernel_size
    hw = y.shape[1] * y.shape[2]
    macs = float(hw * cin * self.features * kh * kw)
    weights = kh * kw * cin * self.features
    extra = self.features if self.use_bias and (not binary or self.method.binary_bias) else 0
    if not binary:
      record_cost(self, flops=2.0 * macs, real_params=weights + extra)
      return
    method, cout = self.method, self.features
    parts = method.binarizers
    extra += _scale_params(method, cin, cout, y.shape)
    if method.activation_scale == "xnor":
      # the k filter stays real; mean_c|x|, the k conv and the two multiplies (K, alpha).
      extra += kh * kw
      scale_flops = 2.0 * hw * (kh * kw + cin + cout)
    else:
      # every other scale (alpha, E, m, Gamma, s_x[b] s_w) folds into one multiply per output.
      scale_flops = float(hw * cout) if any(p.scaled for p in parts) else 0.0
    scale_flops += parts.activation.flops_per_output * hw * cout
    if method.rprelu != "none":
      extra += 3 * cout
      scale_flops += 3.0 * hw * cout  # shift, PReLU, shift
    record_cost(self, bops=macs, flops=scale_flops, binary_params=weights, real_params=extra)


class BinaryDense(nn.Module):
  """Dense layer, full precision or `sign(x + tau) @ (alpha * sign(W)) + b` (no act. scale).

  Other methods swap the binarizers and may add XNOR++'s per-channel output scale; dense
  layers have no activation scale, shortcut or RPReLU.

  x: (..., Cin) -> (..., features).
  """

  features: int
  use_bias: bool = True
  method: BinarizationMethod = FP
  dtype: Dtype = jnp.float32
  kernel_init: Any = default_kernel_init

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext | None = None) -> Array:
    cin = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (cin, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    x = x.astype(self.dtype)
    rows = float(x.size // cin // x.shape[0]) if x.ndim > 1 else 1.0  # per example
    method = self.method
    if method.binary:
      kernel, bias = _binary_kernel_and_bias(method, kernel, bias)
      x = _binarize_activation(self, x, ctx)
      kernel = _binarize_weight(self, kernel, ctx)
      # The per-output scales (alpha, E, m, Gamma, s_x[b] s_w) and DoReFa's constant column
      # sums fold into the bias pass of a dense layer: no extra FLOPs are counted.
      stored_bias = self.features if method.binary_bias else 0
      record_cost(
          self,
          bops=rows * cin * self.features,
          binary_params=kernel.size,
          real_params=stored_bias + _scale_params(method, cin, self.features, None),
      )
    else:
      record_cost(
          self, flops=2.0 * rows * cin * self.features, real_params=kernel.size + self.features
      )
    y = x @ kernel.astype(self.dtype)
    if method.binary:
      y = method.binarizers.output_scale(self, y)
    return y + bias.astype(self.dtype) if bias is not None else y


# ---------------------------------------------------------------------------------------------
# Per-branch helpers, shared by BinaryConv and BinaryDense. They create their parameters on the
# calling module (inside its compact __call__), so parameter names sit next to 'kernel'.


def _progress(ctx: QuantContext | None) -> Array:
  """Training progress in [0, 1]; 1 (inference) without a context."""
  return jnp.ones((), jnp.float32) if ctx is None else ctx.progress


def _sign(method: BinarizationMethod, estimator: str, ctx: QuantContext | None):
  """The sign function of `estimator`, ReSTE's with o from the method's schedule."""
  o = (
      estimators.reste_schedule(_progress(ctx), method.reste_o_end)
      if estimator == "reste"
      else None
  )
  return estimators.sign_with_estimator(estimator, o)


def _binary_kernel_and_bias(method: BinarizationMethod, kernel: Array, bias: Array | None):
  """(kernel, bias) of the binary forward: stop-gradient under a weight binarizer that trains
  only its own parameters (LoRA), and no bias where the method has `binary_bias=False`."""
  if method.binarizers.weight.frozen_kernel:
    kernel = jax.lax.stop_gradient(kernel)
    bias = jax.lax.stop_gradient(bias) if bias is not None else None
  return kernel, (bias if method.binary_bias else None)


def _binarize_activation(module: nn.Module, x: Array, ctx: QuantContext | None) -> Array:
  """x + tau (the learnable threshold, where the method has it), then the method's activation
  binarizer: (..., Cin) -> same shape (+-1, {0,1} or +-s_x)."""
  method = module.method
  if method.learnable_threshold:
    threshold = module.param("threshold", nn.initializers.zeros, (x.shape[-1],))
    x = x + threshold.astype(x.dtype)
  sign = _sign(method, method.activation_estimator, ctx)
  return method.binarizers.activation(module, x, sign, ctx)


def _binarize_weight(module: nn.Module, kernel: Array, ctx: QuantContext | None) -> Array:
  """The method's weight binarizer: (..., Cin, Cout) -> same shape, two values per channel."""
  method = module.method
  return method.binarizers.weight(module, kernel, _sign(method, method.weight_estimator, ctx))


def _rprelu(module: nn.Module, y: Array) -> Array:
  """ReActNet's RPReLU per output channel: PReLU_beta(y - gamma) + zeta. (..., C) -> same."""
  c = y.shape[-1]
  shift_in = module.param("rprelu_shift_in", nn.initializers.zeros, (c,)).astype(y.dtype)
  slope = module.param("rprelu_slope", nn.initializers.constant(0.25), (c,)).astype(y.dtype)
  shift_out = module.param("rprelu_shift_out", nn.initializers.zeros, (c,)).astype(y.dtype)
  z = y - shift_in
  return jnp.where(z >= 0, z, slope * z) + shift_out


def _shortcut_scale(module: nn.Module) -> Array:
  """s: the learnable 'shortcut_scale', or the method's constant (BBCU's plain residual)."""
  method = module.method
  if method.learnable_shortcut_scale:
    return module.param("shortcut_scale", nn.initializers.constant(method.shortcut_scale_init), ())
  return jnp.asarray(method.shortcut_scale_init, jnp.float32)


def _scale_params(method: BinarizationMethod, cin: int, cout: int, out_shape) -> int:
  """Real parameters a binary layer stores at inference besides its bias and k filter:
  thresholds and what its binarizers and output scale store (out_shape None: dense)."""
  n = cin if method.learnable_threshold else 0
  return n + sum(p.stored_params(method, cout, out_shape) for p in method.binarizers)
