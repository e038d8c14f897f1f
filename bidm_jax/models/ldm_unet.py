"""The latent-diffusion U-Net (guided-diffusion's UNetModel as CompVis LDM uses it), binarizable.

The architecture of the LDM-4 and LDM-8 models of the paper: GroupNorm(32, eps 1e-5)-SiLU res
blocks with a time projection (added, or as a scale and shift of the second norm), multi-head
self-attention at the given downsample factors, a stride-2 conv (or a res block that average-pools)
to go down and a nearest doubling with a conv (or a res block) to go up. Arrays are NHWC.

Binarization follows the CIFAR U-Net (`models/unet.py`, paper section 3.1): the res blocks' convs and
time projections, the attention's q, k, v and proj_out and the resampling convs are
`BinaryConv` / `BinaryDense` layers given the method; the first conv, the time-embedding MLP, the
last conv, the norms, the 1x1 skip convs and the attention products stay full precision (the skip
convs are binary under a method with `binary_skip_conv`, the layout of the paper's Table 4).
CompVis' fused qkv conv is three 1x1 convs here (q, k, v), so that each is a square binary conv
with an identity shortcut, as in the CIFAR U-Net; the conversion splits it per head.

The forward returns `UNetOutput`: eps and the output of every timestep block (the encoder blocks
and downsamples, the middle block, the decoder blocks), which SPD distils (`distill_points`
'release' adds conv_in's output, as the authors' LDM code does). TBS blends the last
`tbs_connections` decoder blocks with the previous denoising step's outputs (`cache`), as the
CIFAR U-Net's 'blocks' structure (`bidm.tbs`); the authors' LDM code does the same (its last 8
output blocks, each with its own previous output, one weight per bucket and block, init 0.3), so
the LDM U-Net has no separate 'release' TBS structure.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bidm_jax.bidm import tbs
from bidm_jax.binarize.methods import FP, BinarizationMethod, QuantContext
from bidm_jax.layers.binary import BinaryConv, BinaryDense, record_cost
from bidm_jax.models.unet import UNetOutput, check_distill_points

Array = jax.Array

NORM_EPS = 1e-5
"""guided-diffusion's GroupNorm32 keeps PyTorch's default epsilon."""
MAX_PERIOD = 10000.0


@dataclasses.dataclass(frozen=True)
class LDMUNetConfig:
  """Hyperparameters of the latent-diffusion U-Net (the names of CompVis' `unet_config`).

  Attributes:
    in_channels, out_channels: latent channels (eps prediction: the same).
    model_channels: base width; level i has model_channels * channel_mult[i] channels.
    channel_mult: width multipliers, one level each; the side halves between levels.
    num_res_blocks: res blocks per encoder level (the decoder has one more per level).
    attention_resolutions: downsample factors (1, 2, 4, ...) of the levels with attention
      (stored sorted, so configs compare equal whatever the order given).
    num_heads: heads of every attention block; used when num_head_channels is -1.
    num_head_channels: channels per head (heads = width // it), or -1 to use num_heads.
    use_scale_shift_norm: the time projection gives a scale and shift of the second norm.
    resblock_updown: resample with parameter-free res blocks (avg-pool / nearest) instead of
      strided / upsampling convs.
    dropout: before each res block's second conv, in training.
    norm_groups: GroupNorm groups (32 in CompVis; smaller for tiny test models).
    image_size: the latent side the model is built for (shapes, parameter counts).
  """

  in_channels: int = 3
  out_channels: int = 3
  model_channels: int = 224
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: int = 2
  attention_resolutions: tuple[int, ...] = (8, 4, 2)
  num_heads: int = -1
  num_head_channels: int = 32
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  dropout: float = 0.0
  norm_groups: int = 32
  image_size: int = 64

  def __post_init__(self):
    object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
    object.__setattr__(
        self, "attention_resolutions", tuple(sorted({int(f) for f in self.attention_resolutions}))
    )
    errors = []
    if not self.channel_mult:
      errors.append("channel_mult is empty")
    if self.num_head_channels == -1 and self.num_heads <= 0:
      errors.append("set num_heads or num_head_channels")
    elif self.channel_mult:
      widths = [w for i, w in enumerate(self.widths) if self.has_attention(i)]
      bad = [w for w in widths + [self.widths[-1]] if self.heads_of(w) <= 0 or w % self.heads_of(w)]
      if bad:
        errors.append(f"the heads do not divide the attention widths {bad}")
    bad_norm = [w for w in self.widths if w % self.norm_groups]
    if bad_norm:
      errors.append(f"norm_groups={self.norm_groups} does not divide the widths {bad_norm}")
    if self.image_size % self.factor:
      errors.append(f"image_size {self.image_size} is not a multiple of {self.factor}")
    if errors:
      raise ValueError("LDMUNetConfig: " + "; ".join(errors))

  @property
  def widths(self) -> tuple[int, ...]:
    """Channels of each level."""
    return tuple(self.model_channels * m for m in self.channel_mult)

  @property
  def factor(self) -> int:
    """The input side must be a multiple of this (2 ** (levels - 1))."""
    return 2 ** (len(self.channel_mult) - 1)

  def heads_of(self, width: int) -> int:
    """Attention heads of a block of `width` channels (num_head_channels wins, as in CompVis)."""
    if self.num_head_channels != -1:
      return width // self.num_head_channels
    return self.num_heads

  def has_attention(self, level: int) -> bool:
    return 2**level in self.attention_resolutions


LDM4 = LDMUNetConfig()
"""LDM-4 (LSUN-Bedrooms, FFHQ; 64x64x3 VQ-f4 latents): CompVis configs/latent-diffusion/
lsun_bedrooms-ldm-vq-4.yaml and ffhq-ldm-vq-4.yaml."""
LDM8 = LDMUNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=192,
    channel_mult=(1, 2, 2, 4, 4),
    attention_resolutions=(1, 2, 4, 8),
    num_heads=8,
    num_head_channels=-1,
    use_scale_shift_norm=True,
    resblock_updown=True,
    image_size=32,
)
"""LDM-8 (LSUN-Churches; 32x32x4 KL-f8 latents): CompVis configs/latent-diffusion/
lsun_churches-ldm-kl-8.yaml."""
TINY_LDM4 = dataclasses.replace(
    LDM4,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_head_channels=8,
    norm_groups=4,
    image_size=8,
)
"""LDM-4's layout (conv resampling, added time projection, head channels) at test size."""
TINY_LDM8 = dataclasses.replace(
    LDM8,
    model_channels=16,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    num_heads=2,
    norm_groups=4,
    image_size=8,
)
"""LDM-8's layout (res-block resampling, scale-shift norm, fixed heads) at test size."""
PRESETS = {"ldm4": LDM4, "ldm8": LDM8, "tiny_ldm4": TINY_LDM4, "tiny_ldm8": TINY_LDM8}


def timestep_embedding(t: Array, dim: int) -> Array:
  """guided-diffusion's sinusoidal embedding: cos then sin, frequencies 10000^(-k/half).

  (B,) -> (B, dim), float32. The DDPM U-Net's `unet.timestep_embedding` puts sin first and
  divides by half - 1, so the two are not interchangeable.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(MAX_PERIOD) / half * jnp.arange(half, dtype=jnp.float32))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _norm(config: LDMUNetConfig, name: str, dtype) -> nn.GroupNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits that the PyTorch reference keeps.
  return nn.GroupNorm(
      num_groups=config.norm_groups,
      epsilon=NORM_EPS,
      use_fast_variance=False,
      dtype=dtype,
      name=name,
  )


def _upsample(x: Array) -> Array:
  """Nearest-neighbour doubling of the side: (B, H, W, C) -> (B, 2H, 2W, C)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample(x: Array) -> Array:
  """2x2 average pooling: (B, H, W, C) -> (B, H/2, W/2, C)."""
  return nn.avg_pool(x, (2, 2), (2, 2))


class ResBlock(nn.Module):
  """norm-SiLU-[resample]-conv, time projection (added or scale-shift), norm-SiLU-dropout-conv,
  plus the (resampled; 1x1-projected when widths differ, by an FP conv or, under
  `binary_skip_conv`, a binary one) input. resample: None, 'up', 'down'."""

  config: LDMUNetConfig
  out_ch: int
  method: BinarizationMethod
  dtype: Any
  resample: str | None = None

  @nn.compact
  def __call__(self, x, temb, ctx, train):
    cfg, method, dtype = self.config, self.method, self.dtype
    h = nn.silu(_norm(cfg, "norm1", dtype)(x))
    if self.resample is not None:
      resample = _upsample if self.resample == "up" else _downsample
      h, x = resample(h), resample(x)
    h = BinaryConv(self.out_ch, method=method, dtype=dtype, name="conv1")(h, ctx)
    proj = 2 * self.out_ch if cfg.use_scale_shift_norm else self.out_ch
    emb = BinaryDense(proj, method=method, dtype=dtype, name="temb_proj")(nn.silu(temb), ctx)
    emb = emb[:, None, None, :]
    if cfg.use_scale_shift_norm:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = _norm(cfg, "norm2", dtype)(h) * (1 + scale) + shift
    else:
      h = _norm(cfg, "norm2", dtype)(h + emb)
    h = nn.Dropout(cfg.dropout, deterministic=not train)(nn.silu(h))
    h = BinaryConv(self.out_ch, method=method, dtype=dtype, name="conv2")(h, ctx)
    if x.shape[-1] != self.out_ch:
      skip = BinaryConv(
          self.out_ch, (1, 1), method=method.skip_conv_method, dtype=dtype, name="nin_shortcut"
      )
      x = skip(x, ctx)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over all positions; q, k, v, proj_out are (binary) 1x1 convs.

  Head n uses channels [n d, (n + 1) d) of q, k and v (d = C / heads). (B, H, W, C) -> same.
  """

  heads: int
  config: LDMUNetConfig
  method: BinarizationMethod
  dtype: Any

  @nn.compact
  def __call__(self, x, ctx):
    b, hgt, wid, c = x.shape
    d = c // self.heads
    h = _norm(self.config, "norm", self.dtype)(x)
    conv = lambda name: BinaryConv(c, (1, 1), method=self.method, dtype=self.dtype, name=name)
    q, k, v = (conv(n)(h, ctx).reshape(b, hgt * wid, self.heads, d) for n in ("q", "k", "v"))
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) * d**-0.5
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    h = jnp.einsum("bnqk,bknd->bqnd", attn, v).reshape(b, hgt, wid, c)
    record_cost(self, flops=2 * 2.0 * (hgt * wid) ** 2 * c, kind="attention_products")
    return x + conv("proj_out")(h, ctx)


def make_output(
    eps: Array, features: Sequence[Array], num_connections: int, distill: Sequence[Array]
) -> UNetOutput:
  """The model's `UNetOutput`: eps, every timestep block's output, the last `num_connections`
  of them as the tensors the next denoising step's TBS blends with, and the distilled points.

  The one place that knows `UNetOutput`'s fields (no named `points`: those are the CIFAR
  release's).
  """
  features = tuple(features)
  return UNetOutput(
      eps.astype(jnp.float32),
      features,
      connections=features[len(features) - num_connections :],
      distill=tuple(distill),
  )


class LDMUNet(nn.Module):
  """The latent-diffusion U-Net of `config`, binarized by `method`.

  Attributes:
    config: the architecture (`LDM4`, `LDM8`, ...).
    method: binarization method of the binarizable layers (FP for the teacher).
    tbs_connections: TBS connection points, the outputs of the last n decoder blocks (used
      when `method.cross_timestep`; the paper's LDMs use 8).
    tbs_buckets, tbs_init, num_timesteps: the learnable blend table a[bucket, point].
    tbs_structure: 'blocks' only (each blended block with its own previous output; the
      authors' LDM code does the same), a field so that both U-Nets describe TBS alike.
    distill_points: what `UNetOutput.distill` holds: 'blocks' (the paper's reading) every
      timestep block's output, 'release' (the authors' LDM code, which hooks every
      TimestepEmbedSequential) conv_in's output and then every timestep block's.
    dtype: compute dtype (parameters stay float32).
  """

  config: LDMUNetConfig = LDM4
  method: BinarizationMethod = FP
  tbs_connections: int = 0
  tbs_buckets: int = 100
  tbs_init: float = 0.3
  num_timesteps: int = 1000
  tbs_structure: str = "blocks"
  distill_points: str = "blocks"
  dtype: Any = jnp.float32

  @property
  def num_connections(self) -> int:
    """Tensors carried to the next step: tbs_connections under a TBS method, else 0."""
    return self.tbs_connections if self.method.cross_timestep else 0

  @property
  def num_decoder_blocks(self) -> int:
    return len(self.config.channel_mult) * (self.config.num_res_blocks + 1)

  @nn.compact
  def __call__(
      self,
      x: Array,
      t: Array,
      *,
      cache: tbs.TBSCache | None = None,
      train: bool = False,
      progress: float | Array = 1.0,
  ) -> UNetOutput:
    """x: (B, H, W, in_channels) noisy latents; t: (B,) int timesteps.

    cache: the previous denoising step's connection features (TBS); None runs without it.
    progress: training progress in [0, 1] for methods whose estimators follow a schedule.
    Returns eps (B, H, W, out_channels) and the timestep blocks' outputs (the last
    `num_connections` of them after the TBS blend).
    """
    cfg, method, dtype = self.config, self.method, self.dtype
    check_distill_points(self.distill_points)
    if self.tbs_structure != "blocks":
      raise ValueError(
          f"the LDM U-Net's tbs_structure is 'blocks' only, got {self.tbs_structure!r}"
      )
    if self.num_connections > self.num_decoder_blocks:
      raise ValueError(
          f"tbs_connections={self.tbs_connections} exceeds the "
          f"{self.num_decoder_blocks} decoder blocks of this U-Net"
      )
    if x.shape[1] % cfg.factor or x.shape[2] % cfg.factor or x.shape[-1] != cfg.in_channels:
      raise ValueError(
          f"input of shape {x.shape} must have {cfg.in_channels} channels and "
          f"sides divisible by {cfg.factor}"
      )
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    ctx = QuantContext.create(t, progress)
    blend_weights = None
    if self.num_connections:
      blend_weights = tbs.table_blend_weights(
          self,
          "tbs_table",
          self.tbs_init,
          (self.tbs_buckets, self.num_connections),
          t,
          cache,
          self.num_timesteps,
      )

    temb = timestep_embedding(t, cfg.model_channels)
    temb = BinaryDense(4 * cfg.model_channels, name="temb_dense0")(temb)
    temb = BinaryDense(4 * cfg.model_channels, name="temb_dense1")(nn.silu(temb)).astype(dtype)

    def res_block(name, out_ch, h, resample=None):
      return ResBlock(cfg, out_ch, method, dtype, resample, name=name)(h, temb, ctx, train)

    def attention(name, h):
      return AttnBlock(cfg.heads_of(h.shape[-1]), cfg, method, dtype, name=name)(h, ctx)

    levels = len(cfg.channel_mult)
    features = []
    stem = BinaryConv(cfg.model_channels, dtype=dtype, name="conv_in")(x)
    hs = [stem]
    for i, width in enumerate(cfg.widths):
      for j in range(cfg.num_res_blocks):
        h = res_block(f"down_{i}_block_{j}", width, hs[-1])
        if cfg.has_attention(i):
          h = attention(f"down_{i}_attn_{j}", h)
        hs.append(h)
        features.append(h)
      if i != levels - 1:
        name = f"down_{i}_downsample"
        if cfg.resblock_updown:
          h = res_block(name, width, hs[-1], "down")
        else:
          h = BinaryConv(
              width, strides=2, padding=((1, 1), (1, 1)), method=method, dtype=dtype, name=name
          )(hs[-1], ctx)
        hs.append(h)
        features.append(h)

    h = res_block("mid_block_1", h.shape[-1], h)
    h = attention("mid_attn_1", h)
    h = res_block("mid_block_2", h.shape[-1], h)
    features.append(h)

    first_connection = self.num_decoder_blocks - self.num_connections
    block = 0
    for i in reversed(range(levels)):
      width = cfg.widths[i]
      for j in range(cfg.num_res_blocks + 1):
        h = res_block(f"up_{i}_block_{j}", width, jnp.concatenate([h, hs.pop()], -1))
        if cfg.has_attention(i):
          h = attention(f"up_{i}_attn_{j}", h)
        if j == cfg.num_res_blocks and i != 0:
          name = f"up_{i}_upsample"
          if cfg.resblock_updown:
            h = res_block(name, width, h, "up")
          else:
            h = BinaryConv(width, method=method, dtype=dtype, name=name)(_upsample(h), ctx)
        if blend_weights is not None and block >= first_connection:
          point = block - first_connection
          h = tbs.blend(h, cache.features[point], blend_weights[:, point])
        features.append(h)
        block += 1

    h = nn.silu(_norm(cfg, "norm_out", dtype)(h))
    eps = BinaryConv(cfg.out_channels, dtype=dtype, name="conv_out")(h)
    distill = [stem, *features] if self.distill_points == "release" else features
    return make_output(eps, features, self.num_connections, distill)
