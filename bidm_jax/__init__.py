"""bidm-jax: BiDM (NeurIPS 2024) fully binarized diffusion models in JAX/Flax.

The pieces a user composes, by where they live:
  binarize   sign functions with straight-through estimators; binarization methods
  layers     BinaryConv, BinaryDense
  models     the DDPM U-Net returning eps and its timestep blocks' features
  diffusion  schedules, q_sample, epsilon loss, DDIM/DDPM samplers (lax.scan)
  bidm       TBS (cross-timestep connections, paired-timestep forward) and SPD
"""

from bidm_jax.bidm import TBSCache, l2_distillation_loss, paired_timestep_forward, spd_loss
from bidm_jax.binarize import (METHODS, BinarizationMethod, QuantContext, binarize_activation,
                               binarize_weight, get_method, sign_approx, sign_ste)
from bidm_jax.diffusion import (Schedule, ddim_sample, ddpm_sample, epsilon_loss, make_schedule,
                                q_sample)
from bidm_jax.layers import BinaryConv, BinaryDense
from bidm_jax.models import UNet, UNetOutput

__version__ = "0.1.0"
