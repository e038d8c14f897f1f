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


@jax.custom_vjp
def sign_reste(x: Array, o: Array) -> Array:
  """sign(x) with ReSTE's rectified estimator (Wu et al., ICCV 2023).

  The backward is the derivative of the power function `s(x) = sign(x) |x|^(1/o)`, clipped to
  |x| <= 1 and with its value capped at `o` near zero (as the authors' code does):
  `d/dx = min((1/o) |x|^(1/o - 1), o)`. `o >= 1` is a scalar (traced, not differentiated) that
  the ReSTE schedule grows from 1 (identity STE) towards a sharper estimator over training.
  """
  del o
  return hard_sign(x)


def _reste_fwd(x, o):
  return hard_sign(x), (x, o)


def _reste_bwd(res, g):
  x, o = res
  o = jnp.asarray(o, jnp.float32)
  ax = jnp.abs(x).astype(jnp.float32)
  slope = jnp.minimum((1.0 / o) * jnp.power(jnp.maximum(ax, 1e-12), 1.0 / o - 1.0), o)
  grad = jnp.where(ax <= 1.0, slope, 0.0)
  return (g * grad.astype(g.dtype), jnp.zeros_like(o))


sign_reste.defvjp(_reste_fwd, _reste_bwd)

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
        "takes its schedule parameter)") from None


def weight_scale(w: Array) -> Array:
  """alpha: per-output-channel mean |W| over every axis but the last, stop-gradient.

  w: (..., Cout) -> (Cout,), in w's dtype.
  """
  axes = tuple(range(w.ndim - 1))
  return jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=axes))


def binarize_weight(w: Array, estimator: str = "ste") -> Array:
  """XNOR weight binarizer `alpha * sign(W)`; alpha per output channel (last axis).

  w: (kh, kw, Cin, Cout) or (Cin, Cout) latent weights -> same shape, entries +-alpha[o].
  Gradient: the chosen estimator through sign (alpha is stop-gradient), so with 'ste' the
  gradient is alpha * g where |W| <= 1.
  """
  return weight_scale(w) * get_estimator(estimator)(w)


def binarize_activation(x: Array, threshold: Array | None = None,
                        estimator: str = "approx") -> Array:
  """Activation binarizer `sign(x + tau)` (ReActNet's RSign when tau is learnable).

  x: (..., C); threshold: (C,) or None (tau = 0) -> (...) of +-1 in x's dtype.
  """
  if threshold is not None:
    x = x + threshold.astype(x.dtype)
  return get_estimator(estimator)(x)
