"""The DDPM/DDIM pixel-space U-Net (Ho et al. 2020; the ddim repo's `Model`), binarizable.

The forward returns the noise prediction and, explicitly, the output of every timestep block
(encoder units, the middle block, decoder units): the features that SPD distils and whose last
decoder entries TBS carries from one denoising step to the next. Which layers are binarized
follows spec section 2: the first conv, the time-embedding MLP, the last conv, group norms, the
1x1 nin shortcuts of res blocks and the attention products stay full precision.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bidm_jax.bidm import tbs
from bidm_jax.binarize.methods import FP, BinarizationMethod, QuantContext
from bidm_jax.layers.binary import BinaryConv, BinaryDense, record_cost

Array = jax.Array


class UNetOutput(NamedTuple):
  """eps: (B, H, W, C) noise prediction; features: the timestep blocks' outputs, in order."""
  eps: Array
  features: tuple[Array, ...]


def timestep_embedding(t: Array, dim: int) -> Array:
  """Sinusoidal embedding of integer timesteps as in DDPM: (B,) -> (B, dim), float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _norm(name: str, dtype) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name)


class ResBlock(nn.Module):
  """GroupNorm-swish-conv, + time projection, GroupNorm-swish-dropout-conv, + skip."""
  out_ch: int
  dropout: float
  method: BinarizationMethod
  dtype: Any

  @nn.compact
  def __call__(self, x, temb, ctx, train):
    h = nn.swish(_norm("norm1", self.dtype)(x))
    h = BinaryConv(self.out_ch, method=self.method, dtype=self.dtype, name="conv1")(h, ctx)
    h = h + BinaryDense(self.out_ch, method=self.method, dtype=self.dtype,
                        name="temb_proj")(nn.swish(temb), ctx)[:, None, None, :]
    h = nn.swish(_norm("norm2", self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = BinaryConv(self.out_ch, method=self.method, dtype=self.dtype, name="conv2")(h, ctx)
    if x.shape[-1] != self.out_ch:
      x = BinaryConv(self.out_ch, (1, 1), dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention; q, k, v and proj_out are (binary) 1x1 convs."""
  method: BinarizationMethod
  dtype: Any

  @nn.compact
  def __call__(self, x, ctx):
    b, hgt, wid, c = x.shape
    h = _norm("norm", self.dtype)(x)
    conv = lambda name: BinaryConv(c, (1, 1), method=self.method, dtype=self.dtype, name=name)
    q, k, v = (conv(n)(h, ctx).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
    logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c ** -0.5)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    h = jnp.einsum("bij,bjc->bic", attn, v).reshape(b, hgt, wid, c)
    record_cost(self, flops=2 * 2.0 * (hgt * wid) ** 2 * c)  # the two FP attention products
    return x + conv("proj_out")(h, ctx)


class UNet(nn.Module):
  """DDPM U-Net. Defaults are the CIFAR-10 model of the ddim repo (35.7M parameters).

  Attributes:
    ch, ch_mult, num_res_blocks, attn_resolutions, dropout: the architecture.
    out_ch: output channels (= input channels for epsilon prediction).
    method: binarization method of the binarizable layers (FP for the teacher).
    tbs_connections: number n of TBS cross-timestep connection points, the outputs of the
      last n decoder blocks (used when `method.cross_timestep`).
    tbs_buckets, tbs_init, num_timesteps: the learnable blend table a[bucket, point].
    dtype: compute dtype (parameters stay float32).
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  out_ch: int = 3
  method: BinarizationMethod = FP
  tbs_connections: int = 0
  tbs_buckets: int = 100
  tbs_init: float = 0.3
  num_timesteps: int = 1000
  dtype: Any = jnp.float32

  @property
  def num_connections(self) -> int:
    """Connection points this model really has (0 unless the method uses TBS)."""
    return self.tbs_connections if self.method.cross_timestep else 0

  @property
  def num_decoder_blocks(self) -> int:
    return len(self.ch_mult) * (self.num_res_blocks + 1)

  @nn.compact
  def __call__(self, x: Array, t: Array, *, cache: tbs.TBSCache | None = None,
               train: bool = False, progress: float | Array = 1.0) -> UNetOutput:
    """x: (B, H, W, C) noisy images; t: (B,) int timesteps.

    cache: the previous denoising step's connection features (TBS); None runs without it.
    progress: training progress in [0, 1] for methods whose estimators follow a schedule.
    Returns eps (B, H, W, out_ch) and the timestep blocks' outputs (the last
    `num_connections` of them after the TBS blend).
    """
    if self.num_connections > self.num_decoder_blocks:
      raise ValueError(f"tbs_connections={self.tbs_connections} exceeds the "
                       f"{self.num_decoder_blocks} decoder blocks of this U-Net")
    if x.shape[1] != x.shape[2] or x.shape[1] % 2 ** (len(self.ch_mult) - 1):
      raise ValueError(f"input of shape {x.shape} must be square with a side divisible by "
                       f"{2 ** (len(self.ch_mult) - 1)}")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    ctx = QuantContext.create(t, progress)
    method, dtype = self.method, self.dtype
    blend_weights = None
    if self.num_connections:
      table = self.param("tbs_table", nn.initializers.constant(self.tbs_init),
                         (self.tbs_buckets, self.num_connections))
      if cache is not None:
        blend_weights = tbs.blend_weights(table, t, cache.valid, self.num_timesteps)

    temb = timestep_embedding(t, self.ch)
    temb = BinaryDense(self.ch * 4, name="temb_dense0")(temb)
    temb = BinaryDense(self.ch * 4, name="temb_dense1")(nn.swish(temb)).astype(dtype)

    features = []
    hs = [BinaryConv(self.ch, dtype=dtype, name="conv_in")(x)]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, self.dropout, method, dtype,
                     name=f"down_{i}_block_{j}")(hs[-1], temb, ctx, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(method, dtype, name=f"down_{i}_attn_{j}")(h, ctx)
        hs.append(h)
        features.append(h)
      if i != len(self.ch_mult) - 1:
        h = BinaryConv(h.shape[-1], strides=2, padding=((0, 1), (0, 1)), method=method,
                       dtype=dtype, name=f"down_{i}_downsample")(hs[-1], ctx)
        hs.append(h)
        features.append(h)

    h = ResBlock(h.shape[-1], self.dropout, method, dtype, name="mid_block_1")(h, temb, ctx,
                                                                              train)
    h = AttnBlock(method, dtype, name="mid_attn_1")(h, ctx)
    h = ResBlock(h.shape[-1], self.dropout, method, dtype, name="mid_block_2")(h, temb, ctx,
                                                                              train)
    features.append(h)

    first_connection = self.num_decoder_blocks - self.num_connections
    block = 0
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = ResBlock(self.ch * self.ch_mult[i], self.dropout, method, dtype,
                     name=f"up_{i}_block_{j}")(jnp.concatenate([h, hs.pop()], -1), temb, ctx,
                                               train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(method, dtype, name=f"up_{i}_attn_{j}")(h, ctx)
        if j == self.num_res_blocks and i != 0:
          h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest 2x
          h = BinaryConv(h.shape[-1], method=method, dtype=dtype,
                         name=f"up_{i}_upsample")(h, ctx)
        if blend_weights is not None and block >= first_connection:
          point = block - first_connection
          h = tbs.blend(h, cache.features[point], blend_weights[:, point])
        features.append(h)
        block += 1

    h = nn.swish(_norm("norm_out", dtype)(h))
    eps = BinaryConv(self.out_ch, dtype=dtype, name="conv_out")(h)
    return UNetOutput(eps.astype(jnp.float32), tuple(features))
