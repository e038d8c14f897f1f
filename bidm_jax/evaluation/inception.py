"""Inception-v3 of the FID graph ``inception-2015-12-05`` in Flax Linen (NHWC).

This is the network behind FID, sFID, Inception Score and precision/recall in TTUR, pytorch-fid
and the guided-diffusion evaluator. Every layer is ``conv (no bias) -> (x - mean) /
sqrt(var + 1e-3) + beta -> ReLU``; the 3x3 average pools in the A, C and E blocks exclude padding,
and the pool branch of the last E block (``mixed_10``) is a max pool, as in the TF graph.

Parameter names follow the TF graph (``conv``, ``mixed_3/tower/conv_1``, ``mixed_9/tower_conv``),
each layer holding ``kernel`` (HWIO), ``beta``, ``mean`` and ``var``; ``fc`` holds the 1008-way
classifier (``kernel`` (2048, 1008), ``bias`` (1008,)) when the weights have it.

Weight files are read by `inception_weights.load_inception_params`; `featurizer.Featurizer`
runs the network over uint8 images in batches.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "INCEPTION_SIZE",
    "NUM_CLASSES",
    "POOL_DIM",
    "SPATIAL_CHANNELS",
    "SPATIAL_DIM",
    "InceptionV3",
    "tf1_resize_bilinear",
]

INCEPTION_SIZE = 299
SPATIAL_CHANNELS = 7
BN_EPS = 1e-3
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


# ---------------------------------------------------------------------------------------------
# Resize.


def _tf1_interpolation(in_size: int, out_size: int):
  """Source indices and weights of TF1 ``resize_bilinear`` (align_corners=False, legacy)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  floor = np.floor(src)
  lo = np.maximum(floor.astype(np.int32), 0)
  hi = np.minimum(np.ceil(src).astype(np.int32), in_size - 1)
  return lo, hi, (src - floor).astype(np.float32)


def tf1_resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize as TF1's ``tf.image.resize_bilinear`` (no half-pixel centres).

  Output pixel ``i`` samples source coordinate ``i * in_size / out_size`` (clamped at the last
  pixel), which is what the FID graph does; ``jax.image.resize`` uses half-pixel centres instead.

  Args:
    images: (B, H, W, C) float.
    size: (out_h, out_w).
  Returns:
    (B, out_h, out_w, C) float32.
  """
  x = jnp.asarray(images, jnp.float32)
  y_lo, y_hi, y_w = _tf1_interpolation(x.shape[1], size[0])
  x_lo, x_hi, x_w = _tf1_interpolation(x.shape[2], size[1])
  x_w = jnp.asarray(x_w)[None, None, :, None]
  y_w = jnp.asarray(y_w)[None, :, None, None]

  def horizontal(rows):
    left = jnp.take(rows, x_lo, axis=2)
    right = jnp.take(rows, x_hi, axis=2)
    return left + (right - left) * x_w

  top = horizontal(jnp.take(x, y_lo, axis=1))
  bottom = horizontal(jnp.take(x, y_hi, axis=1))
  return top + (bottom - top) * y_w


# ---------------------------------------------------------------------------------------------
# Layers.


def _max_pool(x: jax.Array, stride: int, padding: int) -> jax.Array:
  """3x3 max pool, (B, H, W, C) -> (B, H', W', C); padding counts as -inf."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 'SAME' average pool that divides by the number of real pixels (as TF)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
  count = lax.reduce_window(ones, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  return total / count


class ConvBN(nn.Module):
  """conv (no bias) -> batch norm without scale (eps 1e-3) -> ReLU; (B,H,W,Cin) -> (B,H',W',F).

  ``padding`` is symmetric (pad_h, pad_w); ``None`` pads by kernel_size // 2 ('SAME' at
  stride 1). Convolution runs in ``dtype`` at ``precision``; the normalisation in float32.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] | None = None
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    ph, pw = (kh // 2, kw // 2) if self.padding is None else self.padding
    kernel = self.param(
        "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features)
    )
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    y = lax.conv_general_dilated(
        x.astype(self.dtype),
        jnp.asarray(kernel, self.dtype),
        window_strides=(self.strides, self.strides),
        padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=self.precision,
        preferred_element_type=jnp.float32,
    )
    y = (y - mean) * lax.rsqrt(var + BN_EPS) + beta
    return jax.nn.relu(y)


class _Tower(nn.Module):
  """A chain of ConvBN named conv, conv_1, conv_2, ...; specs are ConvBN keyword dicts."""

  specs: Sequence[Mapping[str, Any]]
  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x):
    for i, spec in enumerate(self.specs):
      x = self.conv(**spec, name="conv" if i == 0 else f"conv_{i}")(x)
    return x


def _spec(features, kernel_size=(1, 1), strides=1, padding=None):
  return dict(features=features, kernel_size=kernel_size, strides=strides, padding=padding)


_VALID = (0, 0)


class _BlockA(nn.Module):
  """mixed, mixed_1, mixed_2 (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  pool_features: int
  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x):
    c = self.conv
    b0 = c(**_spec(64), name="conv")(x)
    b1 = _Tower((_spec(48), _spec(64, (5, 5))), c, name="tower")(x)
    b2 = _Tower((_spec(64), _spec(96, (3, 3)), _spec(96, (3, 3))), c, name="tower_1")(x)
    b3 = _Tower((_spec(self.pool_features),), c, name="tower_2")(_avg_pool_exclude_pad(x))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class _BlockB(nn.Module):
  """mixed_3 (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x):
    c = self.conv
    b0 = c(**_spec(384, (3, 3), 2, _VALID), name="conv")(x)
    b1 = _Tower((_spec(64), _spec(96, (3, 3)), _spec(96, (3, 3), 2, _VALID)), c, name="tower")(x)
    return jnp.concatenate([b0, b1, _max_pool(x, 2, 0)], axis=-1)


class _BlockC(nn.Module):
  """mixed_4..mixed_7 (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

  channels_7x7: int
  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x):
    c, n = self.conv, self.channels_7x7
    b0 = c(**_spec(192), name="conv")(x)
    b1 = _Tower((_spec(n), _spec(n, (1, 7)), _spec(192, (7, 1))), c, name="tower")(x)
    b2 = _Tower(
        (_spec(n), _spec(n, (7, 1)), _spec(n, (1, 7)), _spec(n, (7, 1)), _spec(192, (1, 7))),
        c,
        name="tower_1",
    )(x)
    b3 = _Tower((_spec(192),), c, name="tower_2")(_avg_pool_exclude_pad(x))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class _BlockD(nn.Module):
  """mixed_8 (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x):
    c = self.conv
    b0 = _Tower((_spec(192), _spec(320, (3, 3), 2, _VALID)), c, name="tower")(x)
    b1 = _Tower(
        (_spec(192), _spec(192, (1, 7)), _spec(192, (7, 1)), _spec(192, (3, 3), 2, _VALID)),
        c,
        name="tower_1",
    )(x)
    return jnp.concatenate([b0, b1, _max_pool(x, 2, 0)], axis=-1)


class _BlockE(nn.Module):
  """mixed_9, mixed_10 (8x8): 1x1 | 1x1-(1x3,3x1) | 1x1-3x3-(1x3,3x1) | pool-1x1."""

  max_pool_branch: bool
  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x):
    c = self.conv
    b0 = c(**_spec(320), name="conv")(x)
    a = c(**_spec(384), name="tower_conv")(x)
    b = c(**_spec(448), name="tower_1_conv")(x)
    b = c(**_spec(384, (3, 3)), name="tower_1_conv_1")(b)
    pooled = _max_pool(x, 1, 1) if self.max_pool_branch else _avg_pool_exclude_pad(x)
    return jnp.concatenate(
        [
            b0,
            c(**_spec(384, (1, 3)), name="tower_mixed_conv")(a),
            c(**_spec(384, (3, 1)), name="tower_mixed_conv_1")(a),
            c(**_spec(384, (1, 3)), name="tower_1_mixed_conv")(b),
            c(**_spec(384, (3, 1)), name="tower_1_mixed_conv_1")(b),
            c(**_spec(192), name="tower_2_conv")(pooled),
        ],
        axis=-1,
    )


class _Logits(nn.Module):
  """The 2048 -> 1008 classifier ``fc``; the bias is applied only when ``use_bias``."""

  use_bias: bool

  @nn.compact
  def __call__(self, pool):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], NUM_CLASSES))
    bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
    logits = jnp.dot(pool, kernel, precision=lax.Precision.HIGHEST)
    return logits + bias if self.use_bias else logits


class InceptionV3(nn.Module):
  """The FID Inception-v3.

  Attributes:
    with_logits: also return the 1008-way logits (needs ``fc`` parameters, which the shared
      npz lacks; pytorch-fid's .pth has them).
    logits_bias: add the classifier bias. The guided-diffusion evaluator and torch-fidelity
      compute the Inception Score from the logits without bias (``softmax/logits/MatMul``),
      hence the default False.
    dtype: compute dtype of the convolutions (float32, or bfloat16 for speed); normalisation
      and outputs stay float32.
    precision: ``lax.Precision`` of the convolutions; None means HIGHEST for float32 (no TF32
      on GPUs) and DEFAULT otherwise.
  """

  with_logits: bool = False
  logits_bias: bool = False
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """Features of RGB images.

    Args:
      images: (B, H, W, 3), values in [0, 255] (uint8 or float), any H and W; resized to
        299x299 like the TF graph unless already that size.
    Returns:
      dict of float32 arrays: 'pool' (B, 2048); 'spatial' (B, 17*17*7), the first 7 channels
      of ``mixed_6/conv`` flattened in (h, w, c) order; 'logits' (B, 1008) if with_logits.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images of shape (B, H, W, 3), got {images.shape}")
    x = jnp.asarray(images, jnp.float32)
    if x.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
      x = tf1_resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
    x = (x - 128.0) / 128.0

    precision = self.precision
    if precision is None:
      is_f32 = jnp.dtype(self.dtype) == jnp.float32
      precision = lax.Precision.HIGHEST if is_f32 else lax.Precision.DEFAULT
    conv = functools.partial(ConvBN, dtype=self.dtype, precision=precision)

    x = conv(**_spec(32, (3, 3), 2, _VALID), name="conv")(x)
    x = conv(**_spec(32, (3, 3), 1, _VALID), name="conv_1")(x)
    x = conv(**_spec(64, (3, 3)), name="conv_2")(x)
    x = _max_pool(x, 2, 0)
    x = conv(**_spec(80), name="conv_3")(x)
    x = conv(**_spec(192, (3, 3), 1, _VALID), name="conv_4")(x)
    x = _max_pool(x, 2, 0)
    x = _BlockA(32, conv, name="mixed")(x)
    x = _BlockA(64, conv, name="mixed_1")(x)
    x = _BlockA(64, conv, name="mixed_2")(x)
    x = _BlockB(conv, name="mixed_3")(x)
    x = _BlockC(128, conv, name="mixed_4")(x)
    x = _BlockC(160, conv, name="mixed_5")(x)
    x = _BlockC(160, conv, name="mixed_6")(x)
    spatial = x[..., :SPATIAL_CHANNELS]  # mixed_6/conv is the first branch of the concat
    x = _BlockC(192, conv, name="mixed_7")(x)
    x = _BlockD(conv, name="mixed_8")(x)
    x = _BlockE(False, conv, name="mixed_9")(x)
    x = _BlockE(True, conv, name="mixed_10")(x)
    pool = jnp.mean(x, axis=(1, 2))
    out = {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1)}
    if self.with_logits:
      out["logits"] = _Logits(self.logits_bias, name="fc")(pool)
    return out
