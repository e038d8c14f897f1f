"""Binarizable Flax layers."""

from bidm_jax.layers.binary import BinaryConv, BinaryDense
