"""Weight binarizers, activation binarizers and output scales: small objects registered by name.

A `BinarizationMethod` names one of each (`weight_binarizer`, `activation_binarizer`,
`output_scale`) and `method.binarizers` looks them up here. Each object holds all a binary
layer needs of it: its forward, run on the calling Flax module so that the parameters it
creates sit next to 'kernel'; the real numbers it stores at inference and whether it adds a
multiply per output (the bits and FLOPs the layers record for `evaluation/efficiency.py`); and
whether the packed engine (`layers/packed.py`, `export/packed.py`) can run it. Adding one is a
subclass plus `@REGISTRY.register`; an unknown name is a one-line ValueError. The gradient
estimators stay pure JAX in `estimators.py`; the formulas of each paper are in
`methods.METHOD_DOCS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bidm_jax.binarize import estimators

if TYPE_CHECKING:
  from bidm_jax.binarize.methods import BinarizationMethod, QuantContext

Array = jax.Array
SignFn = Callable[[Array], Array]
"""sign(x) with the method's gradient estimator (ReSTE's already at its scheduled o)."""


class Registry(dict):
  """Name -> object of one kind; looking up an unknown name is a one-line ValueError."""

  def __init__(self, kind: str):
    super().__init__()
    self.kind = kind

  def __missing__(self, name):
    raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self)}")

  def register(self, cls):
    """Class decorator: registers an instance of `cls` under `cls.name`."""
    if cls.name in self:
      raise ValueError(f"{self.kind} {cls.name!r} is already registered")
    self[cls.name] = cls()
    return cls


class WeightBinarizer:
  """Latent kernel (..., Cin, Cout) -> binary kernel of the same shape, two values per channel.

  scale: the real scale the binary kernel carries at inference, stored and applied as one
    multiply per output: 'channel' (Cout values), 'tensor' (one) or None (plain sign).
  frozen_kernel: the FP kernel and bias get no gradient (only the binarizer's own parameters
    train).
  packed: the packed engine runs it as `packed_scale(W)[o] sign(W)`.
  """

  name: str
  scale: str | None = None
  frozen_kernel = False
  packed = False

  def __call__(self, module: nn.Module, kernel: Array, sign: SignFn) -> Array:
    raise NotImplementedError

  @property
  def scaled(self) -> bool:
    return self.scale is not None

  def stored_params(self, method: BinarizationMethod, cout: int, out_shape) -> int:
    """Real numbers a layer stores for this binarizer at inference: its scale."""
    del method, out_shape
    return {"channel": cout, "tensor": 1, None: 0}[self.scale]

  def packed_scale(self, kernel: Array) -> Array:
    """alpha (Cout,) float32 of the packed form `alpha[o] sign(W)` (kernel float32): mean|W|
    over the extent of `scale` (per channel, whole tensor), 1 without one. A binarizer whose
    scale is something else and that is `packed` overrides it."""
    if self.scale == "channel":
      return estimators.weight_scale(kernel)
    if self.scale == "tensor":
      return jnp.full((kernel.shape[-1],), jnp.mean(jnp.abs(kernel)), jnp.float32)
    return jnp.ones((kernel.shape[-1],), jnp.float32)


class ActivationBinarizer:
  """Input (..., Cin), the threshold tau already added -> binary activations, same shape.

  scaled: the activations carry a real scale (one multiply per output at inference).
  flops_per_output: other real operations per conv output at inference.
  packed: the packed engine's sign bits of x + tau compute it exactly.
  """

  name: str
  scaled = False
  flops_per_output = 0
  packed = False

  def __call__(self, module: nn.Module, x: Array, sign: SignFn, ctx: QuantContext | None) -> Array:
    raise NotImplementedError

  def stored_params(self, method: BinarizationMethod, cout: int, out_shape) -> int:
    """Real numbers a layer stores for this binarizer at inference."""
    del method, cout, out_shape
    return 0


class OutputScale:
  """Learned scale of the binary product y (..., Cout) -> same shape (XNOR++'s Gamma).

  scaled: it multiplies every output (at inference). packed: the packed engine folds it into
  alpha (and applies the spatial factors of 'factorised').
  """

  name: str
  scaled = True
  packed = False

  def __call__(self, module: nn.Module, y: Array) -> Array:
    raise NotImplementedError

  def stored_params(self, method: BinarizationMethod, cout: int, out_shape) -> int:
    """Real numbers a layer stores for this scale (out_shape: a conv's output, None: dense)."""
    del method, cout, out_shape
    return 0


WEIGHT_BINARIZERS = Registry("weight_binarizer")
ACTIVATION_BINARIZERS = Registry("activation_binarizer")
OUTPUT_SCALES = Registry("output_scale")


class Binarizers(NamedTuple):
  """The objects a method combines (`BinarizationMethod.binarizers`)."""

  weight: WeightBinarizer
  activation: ActivationBinarizer
  output_scale: OutputScale


# ---------------------------------------------------------------------------------------------
# Weight binarizers.


@WEIGHT_BINARIZERS.register
class XnorWeights(WeightBinarizer):
  """alpha[o] sign(W), alpha = mean|W[..., o]| stop-gradient (XNOR-Net)."""

  name = "xnor"
  scale = "channel"
  packed = True

  def __call__(self, module, kernel, sign):
    return estimators.binarize_weight(kernel, sign)


@WEIGHT_BINARIZERS.register
class SignWeights(WeightBinarizer):
  """sign(W), unscaled (XNOR++: the output scale carries it)."""

  name = "sign"
  packed = True

  def __call__(self, module, kernel, sign):
    return sign(kernel)


@WEIGHT_BINARIZERS.register
class DorefaWeights(WeightBinarizer):
  """E sign(W), E = mean|W| one stop-gradient scalar, gradient not scaled by E (DoReFa-Net)."""

  name = "dorefa"
  scale = "tensor"

  def __call__(self, module, kernel, sign):
    return estimators.binarize_weight_dorefa(kernel, sign)


@WEIGHT_BINARIZERS.register
class ResteWeights(WeightBinarizer):
  """mean|W| sign(W), one scalar WITH gradient (ReSTE's code)."""

  name = "reste"
  scale = "tensor"
  packed = True

  def __call__(self, module, kernel, sign):
    return estimators.binarize_weight_mean(kernel, sign)


_lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""PyTorch's kaiming_uniform_(a=sqrt(5)), as EfficientDM initialises LoRA A: U(+-1/sqrt(fan_in))."""


@WEIGHT_BINARIZERS.register
class LoraLsqWeights(WeightBinarizer):
  """s_w[o] sign(W0 + A B) (EfficientDM's QALoRA at one bit).

  Frozen W0, LoRA factors A, B of rank `method.lora_rank`, LSQ step s_w = gain[o] mean|W0[..., o]|
  per output channel. The factors merge into the 1-bit weight at inference (not stored).
  """

  name = "lora_lsq"
  scale = "channel"
  frozen_kernel = True

  def __call__(self, module, kernel, sign):
    rank, cout = module.method.lora_rank, kernel.shape[-1]
    lora_a = module.param("lora_a", _lora_a_init, kernel.shape[:-1] + (rank,))
    lora_b = module.param("lora_b", nn.initializers.zeros, (rank, cout))
    w = kernel + jnp.tensordot(lora_a, lora_b, axes=1).astype(kernel.dtype)
    gain = module.param("weight_step_gain", nn.initializers.ones, (cout,))
    return estimators.lsq_binarize(w, gain * estimators.weight_scale(kernel), sign)


# ---------------------------------------------------------------------------------------------
# Activation binarizers.


@ACTIVATION_BINARIZERS.register
class SignActivations(ActivationBinarizer):
  """sign(x [+ tau]) in {-1, +1} (RSign with a learnable threshold)."""

  name = "sign"
  packed = True

  def __call__(self, module, x, sign, ctx):
    return sign(x)


@ACTIVATION_BINARIZERS.register
class DorefaActivations(ActivationBinarizer):
  """round(clip(x, 0, 1)) in {0, 1} (DoReFa-Net at k = 1; its own straight-through gradient).

  At inference a conv adds the constant map conv(1, Wb) / 2: one more FLOP per output.
  """

  name = "dorefa"
  flops_per_output = 1

  def __call__(self, module, x, sign, ctx):
    return estimators.dorefa_activation(x)


@ACTIVATION_BINARIZERS.register
class LsqTimestepActivations(ActivationBinarizer):
  """s_x[bucket(t)] sign(x): one LSQ step per timestep bucket, per example (EfficientDM's TALSQ
  at one bit); bucket(t) = t * timestep_buckets // num_timesteps."""

  name = "lsq_timestep"
  scaled = True

  def __call__(self, module, x, sign, ctx):
    method = module.method
    if ctx is None:
      raise ValueError(
          f"method {method.name!r} binarizes activations with timestep-aware "
          "steps; call the layer with a QuantContext"
      )
    steps = module.param("act_steps", nn.initializers.ones, (method.timestep_buckets,))
    t = jnp.broadcast_to(ctx.t, (x.shape[0],))
    bucket = estimators.timestep_bucket(t, method.timestep_buckets, method.num_timesteps)
    step = steps[bucket].reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return estimators.lsq_binarize(x, step, sign)

  def stored_params(self, method, cout, out_shape):
    return method.timestep_buckets


# ---------------------------------------------------------------------------------------------
# Output scales.


@OUTPUT_SCALES.register
class NoOutputScale(OutputScale):
  """No learned output scale."""

  name = "none"
  scaled = False
  packed = True

  def __call__(self, module, y):
    return y


@OUTPUT_SCALES.register
class ChannelOutputScale(OutputScale):
  """Gamma[o] per output channel (XNOR++ case 1), initialised to `method.output_scale_init`."""

  name = "channel"
  packed = True

  def __call__(self, module, y):
    gamma = module.param(
        "output_scale", nn.initializers.constant(module.method.output_scale_init), (y.shape[-1],)
    )
    return y * gamma.astype(y.dtype)

  def stored_params(self, method, cout, out_shape):
    return cout


@OUTPUT_SCALES.register
class FactorisedOutputScale(ChannelOutputScale):
  """alpha[o] beta[h] gamma[w] on a conv's (B, H, W, C) output (XNOR++ case 3; the spatial
  factors sized by the first call, initialised to 1); dense layers take the channel factor."""

  name = "factorised"

  def __call__(self, module, y):
    y = super().__call__(module, y)
    if y.ndim == 4:
      rows = module.param("output_scale_h", nn.initializers.ones, (y.shape[1],))
      cols = module.param("output_scale_w", nn.initializers.ones, (y.shape[2],))
      y = y * rows.astype(y.dtype)[:, None, None] * cols.astype(y.dtype)[:, None]
    return y

  def stored_params(self, method, cout, out_shape):
    spatial = out_shape[1] + out_shape[2] if out_shape is not None and len(out_shape) == 4 else 0
    return cout + spatial
