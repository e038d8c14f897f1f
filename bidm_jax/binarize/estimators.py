"""Sign functions with straight-through gradient estimators (pure JAX, no Flax).

Every function here maps x >= 0 to +1 and x < 0 to -1 (never 0), keeps the input's shape and
dtype, and differs only in the gradient it passes back. They work under `jit`, `grad`, `vmap`
and on bf16 or f32 inputs.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def hard_sign(x: Array) -> Array:
  """sign with sign(0) = +1 (paper Eq. 6/7); no gradient definition. (...) -> (...)."""
  one = jnp.ones((), x.dtype)
  return jnp.where(x >= 0, one, -one)


def _straight_through(grad_fn: Callable[[Array], Array]) -> Callable[[Array], Array]:
  """Builds a custom-VJP sign whose backward is `g * grad_fn(x)`."""

  @jax.custom_vjp
  def sign(x):
    return hard_sign(x)

  def fwd(x):
    return hard_sign(x), x

  def bwd(x, g):
    return (g * grad_fn(x).astype(g.dtype),)

  sign.defvjp(fwd, bwd)
  return sign


def _clipped_identity_grad(x: Array) -> Array:
  return (jnp.abs(x) <= 1).astype(x.dtype)


def _approx_sign_grad(x: Array) -> Array:
  # Bi-Real's piecewise polynomial: d/dx = 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere.
  return jnp.where(jnp.abs(x) < 1, 2.0 - 2.0 * jnp.abs(x), 0.0).astype(x.dtype)


sign_ste = _straight_through(_clipped_identity_grad)
sign_ste.__doc__ = """sign(x) with the clipped-identity STE: d/dx = 1 where |x| <= 1, else 0."""

sign_approx = _straight_through(_approx_sign_grad)
sign_approx.__doc__ = """sign(x) with Bi-Real's ApproxSign gradient: 2 - 2|x| on |x| < 1, else 0."""


@jax.custom_vjp
def sign_identity(x: Array) -> Array:
  """sign(x) with the plain identity STE (d/dx = 1 everywhere), as DoReFa uses."""
  return hard_sign(x)


sign_identity.defvjp(lambda x: (hard_sign(x), None), lambda _, g: (g,))


RESTE_CLIP = 1.5
"""ReSTE's gradient clipping threshold t: no gradient where |x| > t (authors' code: t = 1.5)."""

RESTE_INTERVAL = 0.1
"""ReSTE's near-zero interval m: on |x| <= m the power law is replaced by its secant slope."""


@jax.custom_vjp
def sign_reste(x: Array, o: Array) -> Array:
  """sign(x) with ReSTE's rectified straight-through estimator (Wu et al., ICCV 2023).

  Forward: sign(x) (x >= 0 -> +1). Backward (the derivative of the power function
  `sign(x) |x|^(1/o)` that ReSTE uses as the estimator, as in the authors' code
  DravenALG/ReSTE `Binary_ReSTE`):

    d/dx = (1/o) |x|^(1/o - 1)      for m < |x| <= t,
           m^(1/o) / m              for |x| <= m (secant slope of the power function on [0, m],
                                    which keeps the gradient finite at 0),
           0                        for |x| > t,

  with t = RESTE_CLIP = 1.5 and m = RESTE_INTERVAL = 0.1. At o = 1 this is the identity STE
  clipped at |x| <= 1.5; a larger o approaches sign. `o >= 1` is a scalar (traced, never
  differentiated) that `reste_schedule` grows from 1 to o_end over training.
  """
  del o
  return hard_sign(x)


def _reste_fwd(x, o):
  return hard_sign(x), (x, o)


def _reste_bwd(res, g):
  x, o = res
  o = jnp.asarray(o, jnp.float32)
  ax = jnp.abs(x).astype(jnp.float32)
  m = jnp.float32(RESTE_INTERVAL)
  power = (1.0 / o) * jnp.power(jnp.maximum(ax, m), 1.0 / o - 1.0)
  secant = jnp.power(m, 1.0 / o) / m
  grad = jnp.where(ax <= m, secant, jnp.where(ax <= RESTE_CLIP, power, 0.0))
  return (g * grad.astype(g.dtype), jnp.zeros_like(o))


sign_reste.defvjp(_reste_fwd, _reste_bwd)


def reste_schedule(progress: Array | float, o_end: float) -> Array:
  """ReSTE's rectification parameter o at a training progress p in [0, 1].

  `o = 1 + (o_end - 1) * (1 - cos(pi/2 * p))`: the authors' schedule (DravenALG/ReSTE
  main.py, `ReSTE(epoch)` with p = epoch / epochs; here p = step / total_steps, continuous).
  o = 1 (identity STE) at the start, o_end at the end and at inference (p = 1).
  """
  p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
  return 1.0 + (o_end - 1.0) * (1.0 - jnp.cos(0.5 * jnp.pi * p))


ESTIMATORS: dict[str, Callable[[Array], Array]] = {
    "ste": sign_ste,
    "approx": sign_approx,
    "identity": sign_identity,
}


def get_estimator(name: str) -> Callable[[Array], Array]:
  """The sign function of a named estimator ('ste', 'approx', 'identity')."""
  try:
    return ESTIMATORS[name]
  except KeyError:
    raise ValueError(
        f"unknown gradient estimator {name!r}; valid: {sorted(ESTIMATORS)} (and 'reste', which "
        "takes its schedule parameter)"
    ) from None


def weight_scale(w: Array) -> Array:
  """alpha: per-output-channel mean |W| over every axis but the last, stop-gradient.

  w: (..., Cout) -> (Cout,), in w's dtype.
  """
  axes = tuple(range(w.ndim - 1))
  return jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=axes))


def binarize_weight(w: Array, sign: Callable[[Array], Array] = sign_ste) -> Array:
  """XNOR weight binarizer `alpha * sign(W)`; alpha per output channel (last axis).

  w: (kh, kw, Cin, Cout) or (Cin, Cout) latent weights -> same shape, entries +-alpha[o].
  Gradient: `sign`'s estimator (alpha is stop-gradient), so with the default clipped STE the
  gradient is alpha * g where |W| <= 1.
  """
  return weight_scale(w) * sign(w)


def binarize_activation(
    x: Array, threshold: Array | None = None, sign: Callable[[Array], Array] = sign_approx
) -> Array:
  """Activation binarizer `sign(x + tau)` (ReActNet's RSign when tau is learnable).

  x: (..., C); threshold: (C,) or None (tau = 0) -> (...) of +-1 in x's dtype. Gradient:
  `sign`'s estimator (default ApproxSign).
  """
  if threshold is not None:
    x = x + threshold.astype(x.dtype)
  return sign(x)


# ---------------------------------------------------------------------------------------------
# Binarizers of the baseline methods (see `methods.METHODS` for which method uses which).


SIGN_ESTIMATORS = (*ESTIMATORS, "reste")
"""Every estimator `sign_with_estimator` takes ('reste' also takes its parameter o)."""


def sign_with_estimator(name: str, o: Array | float | None = None) -> Callable[[Array], Array]:
  """The sign function of estimator `name`; 'reste' also takes its parameter o (>= 1)."""
  if name == "reste":
    if o is None:
      raise ValueError("the 'reste' estimator needs its rectification parameter o")
    o = jnp.asarray(o, jnp.float32)
    return lambda x: sign_reste(x, o)
  return get_estimator(name)


def binarize_weight_mean(w: Array, sign: Callable[[Array], Array]) -> Array:
  """ReSTE's weight binarizer `mean(|W|) * sign(W)`, one scalar over the whole tensor.

  As in the authors' code (DravenALG/ReSTE `BinarizeConv2d`), the scalar is NOT stop-gradient:
  d/dW_i = m * sign'(W_i) * g_i + sign(W_i) / N * sum_j g_j sign(W_j), m = mean |W|, N = W.size.
  w: any shape -> same shape, entries +-m.
  """
  return jnp.mean(jnp.abs(w)) * sign(w)


def binarize_weight_dorefa(w: Array, sign: Callable[[Array], Array] = sign_identity) -> Array:
  """DoReFa-Net's 1-bit weights `E(|W|) * sign(W)`, E one stop-gradient scalar (Zhou 2016).

  Backward as in DoReFa's `_sign` (`lambda dy: dy`): dL/dW = sign'(W) * dL/dWb, without the
  factor E (with the default identity estimator, dL/dW = dL/dWb exactly).
  w: any shape -> same shape, entries +-E.
  """
  e = jax.lax.stop_gradient(jnp.mean(jnp.abs(w)))
  s = sign(w)
  return e * jax.lax.stop_gradient(s) + (s - jax.lax.stop_gradient(s))


@jax.custom_vjp
def dorefa_activation(x: Array) -> Array:
  """DoReFa-Net's k = 1 activation quantizer: round(clip(x, 0, 1)) in {0, 1}.

  Forward: 1 where x >= 0.5, else 0 (ties round up, like sign(0) = +1; TensorFlow's
  round-half-to-even would send exactly 0.5 to 0, a set of measure zero).
  Backward: straight-through the rounding, through the clip: d/dx = 1 on 0 <= x <= 1, else 0.
  A {0,1} activation is still binary arithmetic: with s = 2a - 1 in {-1,+1},
  conv(a, Wb) = (conv(s, Wb) + conv(1, Wb)) / 2, an XNOR-popcount conv plus a constant map.
  """
  one = jnp.ones((), x.dtype)
  return jnp.where(x >= 0.5, one, jnp.zeros((), x.dtype))


dorefa_activation.defvjp(
    lambda x: (dorefa_activation(x), x), lambda x, g: (g * ((x >= 0) & (x <= 1)).astype(g.dtype),)
)


def lsq_binarize(x: Array, step: Array, sign: Callable[[Array], Array] = sign_ste) -> Array:
  """Binary LSQ quantizer `s * sign(x / s)` = +-s (LSQ, Esser et al. 2020, at one bit).

  Forward: s * sign(x) for s > 0. Backward (LSQ's, with the clipped STE of the levels -1, +1,
  i.e. Q_N = Q_P = 1): dL/dx = g * 1[|x| <= s]; dL/ds = sum g * (sign(x) - x/s * 1[|x| <= s])
  over the elements that share s. No LSQ gradient scale 1/sqrt(N Q_P) (EfficientDM's code does
  not use one; under Adam it would only interact with epsilon).
  `sign` is the estimator of the normalised sign(x / s) (default: the clipped STE, which gives
  exactly LSQ's gradients above). Steps are floored at 1e-8 so x / s stays finite.
  x: (...); step: broadcastable to x, positive -> same shape as x.
  """
  step = jnp.maximum(step.astype(x.dtype), jnp.asarray(1e-8, x.dtype))
  return step * sign(x / step)


def timestep_bucket(t: Array, num_buckets: int, num_timesteps: int) -> Array:
  """Bucket of integer timesteps: t * num_buckets // num_timesteps, clipped. (B,) -> (B,).

  The row of TBS's blend table (`bidm.tbs`) and of TALSQ's step table ('lsq_timestep'):
  100 buckets over T = 1000 gives t // 10, one bucket per step of a 100-step DDIM sampler.
  """
  t = jnp.asarray(t, jnp.int32)
  return jnp.clip(t * num_buckets // num_timesteps, 0, num_buckets - 1)
