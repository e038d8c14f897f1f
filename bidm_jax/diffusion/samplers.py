"""DDIM and DDPM samplers, each one `lax.scan` over steps carrying (x, TBS cache).

A sampler takes `apply_fn(x, t, cache) -> UNetOutput` (a model with its parameters bound);
each step is a `tbs.cached_step`, so step i blends with the connections
(`UNetOutput.connections`) of step i - 1, the first step with none (an invalid cache; a model
without TBS connections carries an empty one).

Both samplers can post-process the model's x0 prediction at every step (`process_x0`):
`clip_x0` clips it to [-1, 1] (DDPM's `clip_denoised`, diffusers' `clip_sample`), and
`dynamic_threshold` = p in (0, 100] applies Imagen's dynamic thresholding (per sample,
s = max(p-th percentile of |x0|, 1); x0 <- clip(x0, -s, s) / s). Both are off by default, the
paper's sampler. With either on, the step continues from the processed x0: DDIM recomputes eps
from it (guided-diffusion's `ddim_sample`, diffusers' `use_clipped_model_output=True`), DDPM
takes the posterior mean q(x_{t-1} | x_t, x0) of it (DDPM's `p_mean_variance`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bidm_jax.bidm import tbs
from bidm_jax.diffusion.schedules import Schedule

if TYPE_CHECKING:  # annotations only: models import this module
  from bidm_jax.models.unet import UNetOutput

Array = jax.Array
ApplyFn = Callable[[Array, Array, "tbs.TBSCache | None"], "UNetOutput"]


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """The uniform DDIM subsequence (ddim repo's 'uniform' skip), descending: (steps,) int32."""
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f"sampling steps must be in [1, {num_timesteps}], got {steps}")
  skip = num_timesteps // steps
  return np.arange(0, num_timesteps, skip, dtype=np.int32)[:steps][::-1].copy()


def dynamic_threshold_x0(x0: Array, percentile: float) -> Array:
  """Imagen's dynamic thresholding (Saharia et al. 2022, section 2.3), per sample.

  s = max(percentile-th percentile of |x0| over one sample's values, 1); returns
  clip(x0, -s, s) / s, in [-1, 1]. Samples whose values all lie in [-1, 1] are unchanged.
  x0: (B, ...) -> same shape; percentile in (0, 100] (Imagen: 99.5).
  """
  axes = tuple(range(1, x0.ndim))
  s = jnp.percentile(jnp.abs(x0), percentile, axis=axes, keepdims=True)
  s = jnp.maximum(s, 1.0).astype(x0.dtype)
  return jnp.clip(x0, -s, s) / s


def process_x0(x0: Array, clip_x0: bool = False, dynamic_threshold: float = 0.0) -> Array:
  """The x0 prediction after dynamic thresholding (percentile > 0), then clipping to [-1, 1].

  Both off (the defaults) returns x0 itself. Thresholding already ends in [-1, 1], so with
  both on the clip changes nothing.
  """
  if dynamic_threshold:
    x0 = dynamic_threshold_x0(x0, dynamic_threshold)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  return x0


def ddim_step(
    schedule: Schedule,
    x: Array,
    eps: Array,
    t: Array,
    t_next: Array,
    eta: float,
    noise: Array,
    *,
    clip_x0: bool = False,
    dynamic_threshold: float = 0.0,
) -> Array:
  """One generalized DDIM update x_t -> x_{t_next} (Song et al. 2021, Eq. 12).

  x, eps, noise: (B, H, W, C); t, t_next: () int, t_next = -1 meaning the clean image.
  clip_x0, dynamic_threshold: `process_x0` of the x0 prediction, eps then recomputed from it.
  """
  abar = schedule.alphas_cumprod[t]
  abar_next = jnp.where(t_next >= 0, schedule.alphas_cumprod[jnp.maximum(t_next, 0)], 1.0)
  x0 = (x - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)
  if clip_x0 or dynamic_threshold:
    x0 = process_x0(x0, clip_x0, dynamic_threshold)
    eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
  c1 = eta * jnp.sqrt((1 - abar / abar_next) * (1 - abar_next) / (1 - abar))
  c2 = jnp.sqrt(jnp.maximum(1 - abar_next - c1**2, 0.0))
  return jnp.sqrt(abar_next) * x0 + c1 * noise + c2 * eps


def _run(apply_fn, x, ts, rng, update):
  """Scans `update(x, eps, i, noise)` over the steps ts, carrying the TBS cache."""
  batch = x.shape[0]
  abstract = jax.eval_shape(lambda: apply_fn(x, jnp.full((batch,), ts[0]), None))
  cache = tbs.empty_cache(abstract.connections)

  def step(carry, inputs):
    x, cache = carry
    i, key = inputs
    out, cache = tbs.cached_step(apply_fn, x, jnp.full((batch,), ts[i], jnp.int32), cache)
    x = update(x, out.eps, i, jax.random.normal(key, x.shape, x.dtype))
    return (x, cache), None

  keys = jax.random.split(rng, len(ts))
  (x, _), _ = jax.lax.scan(step, (x, cache), (jnp.arange(len(ts)), keys))
  return x


def _check_x0_options(dynamic_threshold: float) -> None:
  if not 0 <= dynamic_threshold <= 100:
    raise ValueError(
        f"dynamic_threshold is a percentile in (0, 100] (0 = off), got {dynamic_threshold}"
    )


def ddim_sample(
    apply_fn: ApplyFn,
    schedule: Schedule,
    shape,
    rng: Array,
    *,
    steps: int = 100,
    eta: float = 0.0,
    clip_x0: bool = False,
    dynamic_threshold: float = 0.0,
) -> Array:
  """Samples `shape` = (B, H, W, C) images with DDIM; eta = 0 is deterministic given rng.

  clip_x0, dynamic_threshold: x0 post-processing at every step (module docstring), off by
  default.
  """
  _check_x0_options(dynamic_threshold)
  ts = jnp.asarray(ddim_timesteps(schedule.num_timesteps, steps))
  ts_next = jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])
  init_key, rng = jax.random.split(rng)
  x = jax.random.normal(init_key, shape, jnp.float32)
  update = lambda x, eps, i, noise: ddim_step(
      schedule,
      x,
      eps,
      ts[i],
      ts_next[i],
      eta,
      noise,
      clip_x0=clip_x0,
      dynamic_threshold=dynamic_threshold,
  )
  return _run(apply_fn, x, ts, rng, update)


def ddpm_sample(
    apply_fn: ApplyFn,
    schedule: Schedule,
    shape,
    rng: Array,
    *,
    variance: str = "fixedlarge",
    clip_x0: bool = False,
    dynamic_threshold: float = 0.0,
) -> Array:
  """Ancestral DDPM sampling over all T steps; variance 'fixedlarge' (beta) or 'fixedsmall'.

  clip_x0, dynamic_threshold: x0 post-processing at every step (module docstring); with
  either on, the mean is the posterior mean of the processed x0, off by default.
  """
  if variance not in ("fixedlarge", "fixedsmall"):
    raise ValueError(f"variance must be 'fixedlarge' or 'fixedsmall', got {variance!r}")
  _check_x0_options(dynamic_threshold)
  betas, abar = schedule.betas, schedule.alphas_cumprod
  abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
  small = betas * (1 - abar_prev) / (1 - abar)
  var = betas if variance == "fixedlarge" else small
  ts = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  init_key, rng = jax.random.split(rng)
  x = jax.random.normal(init_key, shape, jnp.float32)

  def update(x, eps, i, noise):
    t = ts[i]
    if clip_x0 or dynamic_threshold:
      x0 = process_x0(
          (x - jnp.sqrt(1 - abar[t]) * eps) / jnp.sqrt(abar[t]), clip_x0, dynamic_threshold
      )
      mean = (
          jnp.sqrt(abar_prev[t]) * betas[t] * x0 + jnp.sqrt(1 - betas[t]) * (1 - abar_prev[t]) * x
      ) / (1 - abar[t])
    else:
      mean = (x - betas[t] / jnp.sqrt(1 - abar[t]) * eps) / jnp.sqrt(1 - betas[t])
    return mean + jnp.where(t > 0, jnp.sqrt(var[t]), 0.0) * noise

  return _run(apply_fn, x, ts, rng, update)
