"""Schedules, the forward process and samplers."""

from bidm_jax.diffusion.samplers import (
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    dynamic_threshold_x0,
    process_x0,
)
from bidm_jax.diffusion.schedules import Schedule, epsilon_loss, make_schedule, q_sample
