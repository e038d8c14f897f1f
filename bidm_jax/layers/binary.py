"""Binary convolution and dense layers (paper section 3.2, spec section 2), Flax Linen.

One layer class serves both the full-precision model and every binary method: the method
object decides the forward. The full-precision mode creates only `kernel` and `bias`; binary
modes add their own small parameters (threshold, k, shortcut) next to them, so a binary
student's parameter tree contains the full-precision tree and the FP teacher can be applied
to it unchanged.

Each layer records its arithmetic in the 'costs' collection (`sow`), which the efficiency
report reads: `bops` for binary multiply-accumulates, `flops` for real ones, and `bits` of
parameter storage.

The binary forward of a conv, in the order applied (each step only where the method has it):
  xq = activation binarizer (sign(x + tau) | DoReFa {0,1} | s_x[bucket(t)] sign(x))
  wq = weight binarizer (alpha sign W | sign W | E sign W | mean|W| sign W | s_w sign(W0 + AB))
  y  = conv(xq, wq) [* K, XNOR activation scale] [* Gamma, XNOR++ output scale] [+ b]
  y  = [RPReLU(y), BBCU] + s * shortcut(x); [RPReLU(y), ReActNet]
Dense layers apply the binarizers and the output scale only (no activation scale, shortcut or
RPReLU). The formulas and papers are in `binarize.methods.METHOD_DOCS`. The bias b is added
unless the method has `binary_bias=False` (the authors' release), in which case the 'bias'
parameter is still created (the student's tree contains the FP tree) but left unused.
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

  Binary forward (XNOR/BiDM): `y = conv(sign(x + tau), alpha * sign(W)) * K + b + s *
  shortcut(x)` with `K = conv(mean_c |x|, k)` (XNOR activation scale, k learnable under BiDM),
  and shortcut the identity (avg-pooled when strided) or a full-precision 1x1 conv when
  channels change. Other methods swap the binarizers and add an output scale or RPReLU (module
  docstring). ctx: the QuantContext (timestep, training progress) the method may read; needed
  by timestep-aware methods, optional otherwise (progress then 1, inference).
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
    bias = (self.param("bias", nn.initializers.zeros, (self.features,))
            if self.use_bias else None)
    padding = _pad_amounts(self.padding, self.kernel_size)
    x = x.astype(self.dtype)
    method = self.method
    if not method.binary:
      y = _conv(x, kernel.astype(self.dtype), self.strides, padding)
      self._record(y, cin, binary=False)
      return y + bias.astype(self.dtype) if bias is not None else y

    if method.weight_binarizer == "lora_lsq":
      # LoRA: the base kernel (and bias) are frozen; only the adapters and steps train.
      kernel = jax.lax.stop_gradient(kernel)
      bias = jax.lax.stop_gradient(bias) if bias is not None else None
    if not method.binary_bias:
      bias = None
    xb = _binarize_activation(self, x, ctx)
    wb = _binarize_weight(self, kernel, ctx).astype(self.dtype)
    y = _conv(xb, wb, self.strides, padding)
    if method.activation_scale == "xnor":
      y = y * self._activation_scale(x, padding)
    y = _output_scale(self, y)
    if bias is not None:
      y = y + bias.astype(self.dtype)
    if method.rprelu == "before_shortcut":
      y = _rprelu(self, y)
    if method.shortcut:
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
    hw = y.shape[1] * y.shape[2]
    macs = float(hw * cin * self.features * kh * kw)
    weights = kh * kw * cin * self.features
    extra = self.features if self.use_bias and (not binary or self.method.binary_bias) else 0
    if not binary:
      record_cost(self, flops=2.0 * macs, real_params=weights + extra)
      return
    method, cout = self.method, self.features
    extra += _scale_params(method, cin, cout, y.shape)
    if method.activation_scale == "xnor":
      # the k filter stays real; mean_c|x|, the k conv and the two multiplies (K, alpha).
      extra += kh * kw
      scale_flops = 2.0 * hw * (kh * kw + cin + cout)
    else:
      # every other scale (alpha, E, m, Gamma, s_x[b] s_w) folds into one multiply per output.
      scale_flops = float(hw * cout) if _has_output_multiplier(method) else 0.0
    if method.activation_binarizer == "dorefa":
      scale_flops += hw * cout  # + conv(1, Wb) / 2, the constant map of {0,1} activations
    if method.rprelu != "none":
      extra += 3 * cout
      scale_flops += 3.0 * hw * cout  # shift, PReLU, shift
    # LoRA factors (lora_a, lora_b) merge into the 1-bit weight at inference: not stored.
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
    bias = (self.param("bias", nn.initializers.zeros, (self.features,))
            if self.use_bias else None)
    x = x.astype(self.dtype)
    rows = float(x.size // cin // x.shape[0]) if x.ndim > 1 else 1.0  # per example
    method = self.method
    if method.binary:
      if method.weight_binarizer == "lora_lsq":
        kernel = jax.lax.stop_gradient(kernel)
        bias = jax.lax.stop_gradient(bias) if bias is not None else None
      if not method.binary_bias:
        bias = None
      x = _binarize_activation(self, x, ctx)
      kernel = _binarize_weight(self, kernel, ctx)
      # The per-output scales (alpha, E, m, Gamma, s_x[b] s_w) and DoReFa's constant column
      # sums fold into the bias pass of a dense layer: no extra FLOPs are counted.
      stored_bias = self.features if method.binary_bias else 0
      record_cost(self, bops=rows * cin * self.features, binary_params=kernel.size,
                  real_params=stored_bias + _scale_params(method, cin, self.features, None))
    else:
      record_cost(self, flops=2.0 * rows * cin * self.features,
                  real_params=kernel.size + self.features)
    y = x @ kernel.astype(self.dtype)
    if method.binary:
      y = _output_scale(self, y)
    return y + bias.astype(self.dtype) if bias is not None else y


# ---------------------------------------------------------------------------------------------
# Per-branch helpers, shared by BinaryConv and BinaryDense. They create their parameters on the
# calling module (inside its compact __call__), so parameter names sit next to 'kernel'.


def _progress(ctx: QuantContext | None) -> Array:
  """Training progress in [0, 1]; 1 (inference) without a context."""
  return jnp.ones((), jnp.float32) if ctx is None else ctx.progress


def _sign(method: BinarizationMethod, estimator: str, ctx: QuantContext | None):
  """The sign function of `estimator`, ReSTE's with o from the method's schedule."""
  o = (estimators.reste_schedule(_progress(ctx), method.reste_o_end) if estimator == "reste"
       else None)
  return estimators.sign_with_estimator(estimator, o)


def _binarize_activation(module: nn.Module, x: Array, ctx: QuantContext | None) -> Array:
  """The method's activation binarizer: (..., Cin) -> same shape (+-1, {0,1} or +-s_x)."""
  method = module.method
  cin = x.shape[-1]
  threshold = (module.param("threshold", nn.initializers.zeros, (cin,))
               if method.learnable_threshold else None)
  kind, estimator = method.activation_binarizer, method.activation_estimator
  if kind == "sign" and estimator != "reste":
    return estimators.binarize_activation(x, threshold, estimator)
  if threshold is not None:
    x = x + threshold.astype(x.dtype)
  if kind == "sign":
    return _sign(method, estimator, ctx)(x)
  if kind == "dorefa":
    return estimators.dorefa_activation(x)
  # 'lsq_timestep': one LSQ step per timestep bucket, per example.
  if ctx is None:
    raise ValueError(f"method {method.name!r} binarizes activations with timestep-aware steps; "
                     "call the layer with a QuantContext")
  steps = module.param("act_steps", nn.initializers.ones, (method.timestep_buckets,))
  t = jnp.broadcast_to(ctx.t, (x.shape[0],))
  bucket = estimators.timestep_bucket(t, method.timestep_buckets, method.num_timesteps)
  step = steps[bucket].reshape((x.shape[0],) + (1,) * (x.ndim - 1))
  return estimators.lsq_binarize(x, step, _sign(method, estimator, ctx))


_lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""PyTorch's kaiming_uniform_(a=sqrt(5)), as EfficientDM initialises LoRA A: U(+-1/sqrt(fan_in))."""


def _binarize_weight(module: nn.Module, kernel: Array, ctx: QuantContext | None) -> Array:
  """The method's weight binarizer: (..., Cin, Cout) -> same shape, two values per channel."""
  method = module.method
  kind, estimator = method.weight_binarizer, method.weight_estimator
  if kind == "xnor" and estimator != "reste":
    return estimators.binarize_weight(kernel, estimator)
  sign = _sign(method, estimator, ctx)
  if kind == "xnor":
    return estimators.weight_scale(kernel) * sign(kernel)
  if kind == "sign":
    return sign(kernel)
  if kind == "dorefa":
    return estimators.binarize_weight_dorefa(kernel, sign)
  if kind == "reste":
    return estimators.binarize_weight_mean(kernel, sign)
  # 'lora_lsq' (kernel arrives stop-gradient): Wq = s_w sign(W0 + A B), s_w = gain mean|W0|.
  rank, cout = method.lora_rank, kernel.shape[-1]
  lora_a = module.param("lora_a", _lora_a_init, kernel.shape[:-1] + (rank,))
  lora_b = module.param("lora_b", nn.initializers.zeros, (rank, cout))
  w = kernel + jnp.tensordot(lora_a, lora_b, axes=1).astype(kernel.dtype)
  gain = module.param("weight_step_gain", nn.initializers.ones, (cout,))
  return estimators.lsq_binarize(w, gain * estimators.weight_scale(kernel), sign)


def _output_scale(module: nn.Module, y: Array) -> Array:
  """XNOR++'s learned Gamma: per channel, or alpha[o] beta[h] gamma[w] on (B, H, W, C)."""
  method = module.method
  if method.output_scale == "none":
    return y
  gamma = module.param("output_scale", nn.initializers.constant(method.output_scale_init),
                       (y.shape[-1],))
  y = y * gamma.astype(y.dtype)
  if method.output_scale == "factorised" and y.ndim == 4:
    rows = module.param("output_scale_h", nn.initializers.ones, (y.shape[1],))
    cols = module.param("output_scale_w", nn.initializers.ones, (y.shape[2],))
    y = y * rows.astype(y.dtype)[:, None, None] * cols.astype(y.dtype)[:, None]
  return y


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
    return module.param("shortcut_scale", nn.initializers.constant(method.shortcut_scale_init),
                        ())
  return jnp.asarray(method.shortcut_scale_init, jnp.float32)


def _has_output_multiplier(method: BinarizationMethod) -> bool:
  return (method.weight_binarizer != "sign" or method.output_scale != "none"
          or method.activation_binarizer == "lsq_timestep")


def _scale_params(method: BinarizationMethod, cin: int, cout: int, out_shape) -> int:
  """Real parameters a binary layer stores at inference besides its bias and k filter."""
  n = cin if method.learnable_threshold else 0
  n += {"xnor": cout, "sign": 0, "dorefa": 1, "reste": 1, "lora_lsq": cout}[
      method.weight_binarizer]
  if method.output_scale != "none":
    n += cout
    if method.output_scale == "factorised" and out_shape is not None and len(out_shape) == 4:
      n += out_shape[1] + out_shape[2]
  if method.activation_binarizer == "lsq_timestep":
    n += method.timestep_buckets
  return n
