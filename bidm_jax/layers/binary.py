"""Binary convolution and dense layers (paper section 3.2, spec section 2), Flax Linen.

One layer class serves both the full-precision model and every binary method: the method
object decides the forward. The full-precision mode creates only `kernel` and `bias`; binary
modes add their own small parameters (threshold, k, shortcut) next to them, so a binary
student's parameter tree contains the full-precision tree and the FP teacher can be applied
to it unchanged.

Each layer records its arithmetic in the 'costs' collection (`sow`), which the efficiency
report reads: `bops` for binary multiply-accumulates, `flops` for real ones, and `bits` of
parameter storage.
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
      x, kernel, (strides, strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _pad_amounts(padding, kernel_size: tuple[int, int]):
  if padding == "SAME":
    return tuple(((k - 1) // 2, k // 2) for k in kernel_size)
  return tuple(tuple(p) for p in padding)


def record_cost(module: nn.Module, *, bops: float = 0.0, flops: float = 0.0,
                binary_params: int = 0, real_params: int = 0) -> None:
  """Adds one layer's operation and storage counts to the 'costs' collection."""
  module.sow("costs", "ops", jnp.array([bops, flops, binary_params, real_params], jnp.float32),
             reduce_fn=lambda a, b: a + b, init_fn=lambda: jnp.zeros(4, jnp.float32))


class BinaryConv(nn.Module):
  """2D convolution, full precision or binarized by `method` (NHWC, HWIO kernel).

  Binary forward: `y = conv(sign(x + tau), alpha * sign(W)) * K + b + s * shortcut(x)` with
  `K = conv(mean_c |x|, k)` (XNOR activation scale, k learnable under BiDM), and shortcut the
  identity (avg-pooled when strided) or a full-precision 1x1 conv when channels change.
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
    del ctx
    cin = x.shape[-1]
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features))
    bias = (self.param("bias", nn.initializers.zeros, (self.features,))
            if self.use_bias else None)
    padding = _pad_amounts(self.padding, self.kernel_size)
    x = x.astype(self.dtype)
    method = self.method
    if not method.binary:
      y = _conv(x, kernel.astype(self.dtype), self.strides, padding)
      self._record(y, cin, binary=False)
      return y + bias.astype(self.dtype) if bias is not None else y

    threshold = (self.param("threshold", nn.initializers.zeros, (cin,))
                 if method.learnable_threshold else None)
    xb = estimators.binarize_activation(x, threshold, method.activation_estimator)
    wb = estimators.binarize_weight(kernel, method.weight_estimator).astype(self.dtype)
    y = _conv(xb, wb, self.strides, padding)
    if method.activation_scale == "xnor":
      y = y * self._activation_scale(x, padding)
    if bias is not None:
      y = y + bias.astype(self.dtype)
    if method.shortcut:
      s = self.param("shortcut_scale", nn.initializers.constant(method.shortcut_scale_init), ())
      y = y + s.astype(self.dtype) * self._shortcut(x, y.shape)
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
    return _conv(a, k.astype(self.dtype), self.strides, padding)

  def _shortcut(self, x: Array, out_shape: Sequence[int]) -> Array:
    """Real-valued path from x to the output's shape (ReActNet)."""
    if self.strides > 1:
      x = nn.avg_pool(x, (self.strides, self.strides), (self.strides, self.strides))
    if x.shape[1:3] != tuple(out_shape[1:3]):
      raise ValueError(f"shortcut cannot map {x.shape} to {tuple(out_shape)}")
    if x.shape[-1] != out_shape[-1]:
      proj = self.param("shortcut_kernel", self.kernel_init, (1, 1, x.shape[-1], out_shape[-1]))
      x = _conv(x, proj.astype(self.dtype), 1, ((0, 0), (0, 0)))
      record_cost(self, flops=2.0 * x.shape[1] * x.shape[2] * proj.size,
                  real_params=proj.size)
    return x

  def _record(self, y: Array, cin: int, binary: bool) -> None:
    kh, kw = self.kernel_size
    macs = float(y.shape[1] * y.shape[2] * cin * self.features * kh * kw)
    weights = kh * kw * cin * self.features
    extra = self.features if self.use_bias else 0
    if binary:
      # alpha per output channel, the k filter and the per-channel threshold stay real.
      extra += self.features + kh * kw + cin
      scale_flops = 2.0 * y.shape[1] * y.shape[2] * (kh * kw + cin + self.features)
      record_cost(self, bops=macs, flops=scale_flops, binary_params=weights, real_params=extra)
    else:
      record_cost(self, flops=2.0 * macs, real_params=weights + extra)


class BinaryDense(nn.Module):
  """Dense layer, full precision or `sign(x + tau) @ (alpha * sign(W)) + b` (no act. scale).

  x: (..., Cin) -> (..., features).
  """
  features: int
  use_bias: bool = True
  method: BinarizationMethod = FP
  dtype: Dtype = jnp.float32
  kernel_init: Any = default_kernel_init

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext | None = None) -> Array:
    del ctx
    cin = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (cin, self.features))
    bias = (self.param("bias", nn.initializers.zeros, (self.features,))
            if self.use_bias else None)
    x = x.astype(self.dtype)
    rows = float(x.size // cin // x.shape[0]) if x.ndim > 1 else 1.0  # per example
    if self.method.binary:
      threshold = (self.param("threshold", nn.initializers.zeros, (cin,))
                   if self.method.learnable_threshold else None)
      x = estimators.binarize_activation(x, threshold, self.method.activation_estimator)
      kernel = estimators.binarize_weight(kernel, self.method.weight_estimator)
      record_cost(self, bops=rows * cin * self.features, binary_params=kernel.size,
                  real_params=self.features * 2 + cin)
    else:
      record_cost(self, flops=2.0 * rows * cin * self.features,
                  real_params=kernel.size + self.features)
    y = x @ kernel.astype(self.dtype)
    return y + bias.astype(self.dtype) if bias is not None else y
