"""Noise schedules, the forward process q(x_t | x_0) and the epsilon-prediction loss."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BETA_SCHEDULES = ("linear", "ldm_linear")


class Schedule(NamedTuple):
  """A discrete diffusion schedule of T steps (a pytree of arrays, safe to pass into jit).

  betas: (T,) float32; alphas_cumprod: (T,) float32, prod_{s<=t} (1 - beta_s).
  """

  betas: Array
  alphas_cumprod: Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def beta_schedule(kind: str, num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Betas (T,) in float64: 'linear' (DDPM) or 'ldm_linear' (linspace of sqrt betas, squared)."""
  if kind == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif kind == "ldm_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  else:
    raise ValueError(f"unknown beta schedule {kind!r}; valid: {BETA_SCHEDULES}")
  if num_timesteps < 1 or not (0 < betas.min() and betas.max() < 1):
    raise ValueError(
        f"betas must lie in (0, 1) for T >= 1, got T={num_timesteps}, "
        f"range [{beta_start}, {beta_end}]"
    )
  return betas


def make_schedule(
    kind: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Schedule:
  """The schedule of paper section 4 (CIFAR-10: linear 1e-4..0.02, T = 1000)."""
  betas = beta_schedule(kind, num_timesteps, beta_start, beta_end)
  return Schedule(
      jnp.asarray(betas, jnp.float32), jnp.asarray(np.cumprod(1.0 - betas), jnp.float32)
  )


def _gather(values: Array, t: Array, ndim: int) -> Array:
  return values[t].reshape((-1,) + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise: (B, ...); t: (B,) int."""
  abar = _gather(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


LOSS_REDUCTIONS = ("mean", "sum")


def epsilon_loss(eps_pred: Array, noise: Array, reduction: str = "mean") -> Array:
  """L_DM: squared error between predicted and true noise, (B, ...) x 2 -> ().

  reduction 'mean': averaged over all entries (the paper's MSE); 'sum': summed over each
  example's values and averaged over the batch, as the ddim repo and the authors' CIFAR code
  (`noise_estimation_loss`), i.e. H*W*C times the mean.
  """
  sq = jnp.square(eps_pred.astype(jnp.float32) - noise.astype(jnp.float32))
  if reduction == "mean":
    return jnp.mean(sq)
  if reduction == "sum":
    return jnp.mean(jnp.sum(sq.reshape(sq.shape[0], -1), axis=1))
  raise ValueError(f"reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
