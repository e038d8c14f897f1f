"""Diffusion backbones."""

from bidm_jax.models.unet import UNet, UNetOutput
