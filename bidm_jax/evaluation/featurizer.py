"""FID Inception features of uint8 images: the one feature extractor of ref_stats, evaluate
and the tests, in fixed batches sharded over this host's devices."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bidm_jax.evaluation import inception_weights
from bidm_jax.evaluation.inception import NUM_CLASSES, POOL_DIM, SPATIAL_DIM, InceptionV3

__all__ = ["Featurizer", "get_featurizer", "inception_batch_size", "to_rgb"]


def to_rgb(images: np.ndarray) -> np.ndarray:
  """(N, H, W, 1 or 3) -> (N, H, W, 3): grayscale is replicated to three channels."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected images of shape (N, H, W, 1 or 3), got {images.shape}")
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


class Featurizer:
  """Inception features of images, run in fixed-size jitted batches.

  `featurizer(images)`: images (N, H, W, 1 or 3) in [0, 255] (uint8 or float; grayscale is
  replicated to RGB) -> numpy float32 {'pool': (N, 2048), 'spatial': (N, 2023)[, 'logits':
  (N, 1008)]}; logits only when the parameters have the classifier `fc` (`with_logits`).
  The batch size is rounded up to a multiple of the device count and the last batch is padded,
  so there is one compilation per image size.

  Args:
    params: from `inception_weights.load_inception_params`.
    batch_size: images per device call, over all devices.
    dtype: convolution compute dtype (float32 reproduces the reference features).
    devices: default: this host's devices.
  """

  def __init__(self, params: Mapping, batch_size: int, *, dtype: Any = jnp.float32, devices=None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.with_logits = "fc" in params
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("data",))
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    self._data = NamedSharding(mesh, P("data"))
    self._params = jax.device_put(params, NamedSharding(mesh, P()))
    model = InceptionV3(with_logits=self.with_logits, dtype=dtype)
    self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x), out_shardings=self._data)

  def __call__(self, images) -> dict[str, np.ndarray]:
    images = to_rgb(np.asarray(images))
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, images.shape[0], self.batch_size):
      batch = images[start : start + self.batch_size]
      count = batch.shape[0]
      if count < self.batch_size:
        batch = np.pad(batch, [(0, self.batch_size - count)] + [(0, 0)] * 3)
      out = self._apply(self._params, jax.device_put(batch, self._data))
      for k, v in out.items():
        chunks.setdefault(k, []).append(np.asarray(v)[:count])
    if not chunks:
      dims = {"pool": POOL_DIM, "spatial": SPATIAL_DIM}
      if self.with_logits:
        dims["logits"] = NUM_CLASSES
      return {k: np.zeros((0, d), np.float32) for k, d in dims.items()}
    return {k: np.concatenate(v) for k, v in chunks.items()}


def inception_batch_size(eval_config) -> int:
  """Images per Inception call for config.eval: its batch, at most inception_batch_size (the
  network's activations at 299x299 take about 15 GiB for 1,000 images)."""
  return min(eval_config.batch_size, eval_config.inception_batch_size)


_FEATURIZERS: dict[tuple, Featurizer] = {}


def get_featurizer(weights: Path, batch_size: int) -> Featurizer:
  """A Featurizer of a weight file, cached per (file, batch size, devices): one compile per
  process, and one set of Inception parameters on the devices at most."""
  key = (
      str(weights.resolve()),
      weights.stat().st_mtime_ns,
      batch_size,
      tuple(d.id for d in jax.local_devices()),
  )
  if key not in _FEATURIZERS:
    _FEATURIZERS.clear()
    _FEATURIZERS[key] = Featurizer(inception_weights.load_inception_params(weights), batch_size)
  return _FEATURIZERS[key]
