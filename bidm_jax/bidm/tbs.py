"""Timestep-friendly Binary Structure, cross-timestep part (paper section 3.2, Eq. 11-12).

At each connection point p (the output of one of the last n decoder blocks) the model blends
its output with the same block's output from the previous denoising step:
`h <- (1 - a[bucket(t), p]) * h + a[bucket(t), p] * stop_gradient(cache_p)`.
The model says which tensors the next step blends with (`UNetOutput.connections`; the U-Net's
'release' structure carries upsample outputs instead of the last blocks', `models/unet.py`).
The other half of TBS, the learnable k of the activation scale, lives in the binary layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bidm_jax.binarize.estimators import timestep_bucket

if TYPE_CHECKING:  # annotations only: models import this module
  from bidm_jax.models.unet import UNetOutput

Array = jax.Array


class TBSCache(NamedTuple):
  """The previous step's outputs at the n connection points.

  features: n arrays (B, H_p, W_p, C_p); valid: () or (B,) bool, False where there is no
  previous step (the blend is then the identity, exactly).
  """

  features: tuple[Array, ...]
  valid: Array


def empty_cache(feature_shapes) -> TBSCache:
  """An invalid cache of zeros for features shaped like `feature_shapes` (ShapeDtypeStructs)."""
  return TBSCache(tuple(jnp.zeros(s.shape, s.dtype) for s in feature_shapes), jnp.zeros((), bool))


def blend_weights(table: Array, t: Array, valid: Array, num_timesteps: int) -> Array:
  """a[bucket(t), p] per sample and point, zero where the cache is not valid.

  table: (buckets, n); t: (B,); valid: () or (B,) -> (B, n).
  """
  a = table[timestep_bucket(t, table.shape[0], num_timesteps)]
  return jnp.where(jnp.reshape(valid, (-1, 1)), a, jnp.zeros_like(a))


def table_blend_weights(
    module,
    name: str,
    init: float,
    shape: tuple[int, int],
    t: Array,
    cache: "TBSCache | None",
    num_timesteps: int,
) -> Array | None:
  """Creates the learnable blend table `name` (buckets, points) on the Flax `module` and returns
  its (B, points) weights for `t` (`blend_weights`), or None without a cache."""
  table = module.param(name, lambda _, shp: jnp.full(shp, init, jnp.float32), shape)
  return None if cache is None else blend_weights(table, t, cache.valid, num_timesteps)


def blend(h: Array, cached: Array, a: Array) -> Array:
  """(1 - a) * h + a * stop_gradient(cached); h, cached: (B, H, W, C), a: (B,)."""
  a = a.astype(h.dtype)[:, None, None, None]
  return (1 - a) * h + a * jax.lax.stop_gradient(cached).astype(h.dtype)


StepFn = Callable[..., "UNetOutput"]  # (x, t, cache) -> UNetOutput


def cached_step(apply_fn: StepFn, x: Array, t: Array, cache: TBSCache):
  """One denoising step with the TBS cache: (apply_fn(x, t, cache), the next step's cache).

  The next cache holds the step's `connections`, valid. x: (B, H, W, C); t: (B,). Training's
  paired-timestep forward and the samplers chain their steps through it.
  """
  out = apply_fn(x, t, cache)
  return out, TBSCache(tuple(out.connections), jnp.ones((), bool))


ApplyFn = Callable[..., "UNetOutput"]  # (params, x, t, cache, rng) -> UNetOutput


def paired_timestep_forward(
    apply_fn: ApplyFn, params, x_prev: Array, t_prev: Array, x_t: Array, t: Array, rng: Array
):
  """The TBS training forward: the model at t' = t + 1, then at t with the first pass's cache.

  A `lax.scan` over the two timesteps (one trace of the model) whose carry is the TBS cache
  and the latest output, each pass a `cached_step`. The first pass runs on stop-gradient
  parameters, so the backward pass skips it: its outputs reach the loss only through the
  stop-gradient cache anyway. The scan is unrolled: XLA then sees straight-line code (a rolled
  loop of convolutions runs tens of times slower on XLA:CPU) and can drop the first pass's
  backward.

  apply_fn(params, x, t, cache, rng) -> UNetOutput; x_prev, x_t: (B, H, W, C); t_prev, t: (B,).
  Returns the second pass's UNetOutput (eps and features at t).
  """
  abstract = jax.eval_shape(lambda: apply_fn(params, x_t, t, None, rng))
  cache0 = empty_cache(abstract.connections)
  out0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)

  def step(carry, inputs):
    cache, _ = carry
    x, tt, r = inputs
    # The first pass (no valid cache yet) sees stop-gradient parameters. The scan is unrolled,
    # so `cache.valid` is a compile-time constant per pass and XLA drops that pass's backward.
    p = jax.tree_util.tree_map(
        lambda a: jnp.where(cache.valid, a, jax.lax.stop_gradient(a)), params
    )
    out, cache = cached_step(lambda x, tt, c: apply_fn(p, x, tt, c, r), x, tt, cache)
    return (cache, out), None

  xs = (jnp.stack([x_prev, x_t]), jnp.stack([t_prev, t]), jax.random.split(rng, 2))
  (_, out), _ = jax.lax.scan(step, (cache0, out0), xs, unroll=True)
  return out
