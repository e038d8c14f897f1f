"""Whole-model optimizer arithmetic in one reduction instead of one per parameter array.

A U-Net has hundreds of parameter arrays (the reduced-scale CIFAR-10 model: 511 with XNOR, 586
with BiDM, most of them biases, norm scales and per-layer scalars). A norm taken leaf by leaf,
as `optax.tree.norm` and `optax.clip_by_global_norm` take it, is one small reduction per array:
on a GPU, one kernel each, launched one by one (docs/benchmarks.md, the optimizer's share of the
QAT step). `global_norm` and `all_finite` reduce every leaf in one pass, and
`clip_by_global_norm` is optax's clipping on that norm, taking it from the caller when the train
step has already computed it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _concatenated(tree) -> Array | None:
  """(N,) float32: every value of every leaf, materialized as one array (None for no leaves).
  The optimization barrier keeps XLA from rewriting a reduction of the concatenation into one
  reduction per leaf."""
  leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree_util.tree_leaves(tree)]
  return jax.lax.optimization_barrier(jnp.concatenate(leaves)) if leaves else None


def global_norm(tree) -> Array:
  """() float32: the L2 norm of all values of all leaves of `tree` (0 for an empty tree), in
  one reduction; equal to `optax.tree.norm(tree)` up to the order of summation."""
  flat = _concatenated(tree)
  return jnp.zeros((), jnp.float32) if flat is None else jnp.sqrt(jnp.sum(jnp.square(flat)))


def all_finite(tree) -> Array:
  """() bool: every value of every leaf of `tree` is finite (True for an empty tree), in one
  reduction."""
  flat = _concatenated(tree)
  return jnp.ones((), bool) if flat is None else jnp.isfinite(flat).all()


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm(max_norm)`: the same empty state and the same clipped updates,
  with the norm from `global_norm`, or the caller's: `update(g, state, params, grad_norm=n)`
  (through `optax.chain` too) uses n, the global norm of g, instead of computing it again."""

  def update_fn(updates, state, params=None, *, grad_norm: Array | None = None, **extra_args):
    del params, extra_args
    norm = global_norm(updates) if grad_norm is None else grad_norm
    keep = norm < max_norm
    clipped = jax.tree_util.tree_map(
        lambda t: jnp.where(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates
    )
    return clipped, state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
