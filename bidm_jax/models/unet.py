"""The DDPM/DDIM pixel-space U-Net (Ho et al. 2020; the ddim repo's `Model`), binarizable.

The forward returns the noise prediction and, explicitly, the output of every timestep block
(encoder units, the middle block, decoder units): the features that SPD distils and whose last
decoder entries TBS carries from one denoising step to the next. It also returns, by name, the
feature points of the authors' release (`UNetOutput.points`) and the tensors the next denoising
step blends with (`UNetOutput.connections`). Which layers are binarized follows paper section
3.1: the first conv, the time-embedding MLP, the last conv, group norms, the 1x1 nin shortcuts of
res blocks and the attention products stay full precision (the nin shortcuts are binary convs of
the method where it has `binary_skip_conv`, the layout the paper's Table 4 counts).

TBS structures (`tbs_structure`, with a method that has `cross_timestep`):
  'blocks'   (ours, the paper's reading) the outputs of the last n decoder blocks are blended
             with their own previous-step outputs, `tbs_table` (buckets, n), init `tbs_init`.
  'release'  (the authors' CIFAR code) at the two highest-resolution decoder levels i < 2,
             every attention output of level i is blended with the previous step's output of
             the upsample that enters level i (up_{i+1}_upsample), and the upsample leaving
             level i (up_i_upsample, i = 1) with its own previous output, all with the weight
             `tbs_release_table[bucket(t), i]` (buckets, len(ch_mult)), initialised to 0. On
             CIFAR-10 (attention at 16x16 = level 1) these are the three 16x16 decoder attention
             outputs and up_1_upsample, carrying up_2_upsample and up_1_upsample.
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


TBS_STRUCTURES = ("blocks", "release")
DISTILL_POINTS = ("blocks", "release")
"""`UNetOutput.distill`: every timestep block's output, or the release's points."""
RELEASE_TBS_LEVELS = 2
"""The release blends at decoder levels i < 2 (its `i_level < 2`)."""
RELEASE_TBS_INIT = 0.0
"""The release's blend weights start at 0 (`torch.ones(100, 4) * 0.0`)."""


def check_distill_points(points: str) -> None:
  """ValueError unless `points` (a U-Net's `distill_points`) is one of DISTILL_POINTS."""
  if points not in DISTILL_POINTS:
    raise ValueError(f"distill_points must be one of {DISTILL_POINTS}, got {points!r}")


def release_tbs_error(ch_mult: Sequence[int], attn_resolutions: Sequence[int], side: int) -> str:
  """Why the 'release' TBS cannot run on this U-Net ('' if it can): it blends the attention
  outputs of level i < 2 with the upsample entering level i, so both need the same width."""
  if len(ch_mult) < 2:
    return "'release' blends upsample outputs: ch_mult needs at least 2 levels"
  for i in range(min(RELEASE_TBS_LEVELS, len(ch_mult) - 1)):
    if side // 2 ** i in attn_resolutions and ch_mult[i] != ch_mult[i + 1]:
      return (
          f"'release' blends level {i}'s attention outputs (ch_mult {ch_mult[i]}) with "
          f"up_{i + 1}_upsample (ch_mult {ch_mult[i + 1]}): their widths must be equal"
      )
  return ""


class UNetOutput(NamedTuple):
  """The noise prediction and the U-Net's feature points, each set by name.

  eps: (B, H, W, C) noise prediction.
  features: every timestep block's output, in forward order (encoder units, the middle block,
    decoder units; the connected decoder units after their TBS blend).
  connections: the tensors the next denoising step's TBS blends with (the TBS cache), in
    `UNet.connection_points` order; () for a model without TBS connections.
  distill: the features SPD (or L2) distils, by `UNet.distill_points`: 'blocks' = `features`,
    'release' = the release points in `UNet.release_points` order.
  points: the release's distillation points by name (`UNet.release_points`): the encoder
    downsamples 'down_{i}_downsample', the last encoder res block's conv2
    'down_{L-1}_block_{R-1}/conv2', the middle block's conv2 'mid_block_2/conv2' and the decoder
    upsamples 'up_{i}_upsample' (after any TBS blend); None from stand-in models.
  """

  eps: Array
  features: tuple[Array, ...]
  connections: tuple[Array, ...] = ()
  distill: tuple[Array, ...] = ()
  points: dict[str, Array] | None = None


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
  """GroupNorm-swish-conv, + time projection, GroupNorm-swish-dropout-conv, + skip (the input,
  through the 1x1 `nin_shortcut` when the width changes: FP, or binary under `binary_skip_conv`).

  Returns (block output, conv2's output): the second is one of the release's SPD points.
  """

  out_ch: int
  dropout: float
  method: BinarizationMethod
  dtype: Any

  @nn.compact
  def __call__(self, x, temb, ctx, train):
    h = nn.swish(_norm("norm1", self.dtype)(x))
    h = BinaryConv(self.out_ch, method=self.method, dtype=self.dtype, name="conv1")(h, ctx)
    h = (
        h
        + BinaryDense(self.out_ch, method=self.method, dtype=self.dtype, name="temb_proj")(
            nn.swish(temb), ctx
        )[:, None, None, :]
    )
    h = nn.swish(_norm("norm2", self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = BinaryConv(self.out_ch, method=self.method, dtype=self.dtype, name="conv2")(h, ctx)
    if x.shape[-1] != self.out_ch:
      skip = BinaryConv(
          self.out_ch,
          (1, 1),
          method=self.method.skip_conv_method,
          dtype=self.dtype,
          name="nin_shortcut",
      )
      x = skip(x, ctx)
    return x + h, h


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
    logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c**-0.5)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    h = jnp.einsum("bij,bjc->bic", attn, v).reshape(b, hgt, wid, c)
    record_cost(self, flops=2 * 2.0 * (hgt * wid) ** 2 * c, kind="attention_products")
    return x + conv("proj_out")(h, ctx)


class UNet(nn.Module):
  """DDPM U-Net. Defaults are the CIFAR-10 model of the ddim repo (35.7M parameters).

  Attributes:
    ch, ch_mult, num_res_blocks, attn_resolutions, dropout: the architecture.
    out_ch: output channels (= input channels for epsilon prediction).
    method: binarization method of the binarizable layers (FP for the teacher).
    tbs_connections: number n of TBS cross-timestep connection points, the outputs of the
      last n decoder blocks (used when `method.cross_timestep` and tbs_structure is 'blocks').
    tbs_buckets, tbs_init, num_timesteps: the learnable blend table a[bucket, point]
      (tbs_init: of 'blocks'; 'release' starts at RELEASE_TBS_INIT).
    tbs_structure: 'blocks' or 'release' (module docstring).
    distill_points: which features `UNetOutput.distill` holds, one of DISTILL_POINTS.
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
  tbs_structure: str = "blocks"
  distill_points: str = "blocks"
  dtype: Any = jnp.float32

  @property
  def num_connections(self) -> int:
    """Tensors carried to the next step (0 unless the method uses TBS): 'blocks' n, 'release'
    len(release_connections)."""
    if not self.method.cross_timestep:
      return 0
    if self.tbs_structure == "release":
      return len(self.release_connections)
    return self.tbs_connections

  @property
  def release_connections(self) -> tuple[str, ...]:
    """The upsamples whose outputs the 'release' TBS carries, deepest first: up_{i+1}_upsample
    (entering level i < 2) and up_1_upsample, where the U-Net has them."""
    levels = len(self.ch_mult)
    return tuple(f"up_{k}_upsample" for k in range(RELEASE_TBS_LEVELS, 0, -1) if k < levels)

  @property
  def connection_points(self) -> tuple[str, ...]:
    """Names of the outputs the next step's TBS blends with (`UNetOutput.connections`), in
    order: 'blocks' the last `num_connections` decoder units 'up_{i}_block_{j}' (res block,
    its attention and, at j = num_res_blocks, the upsample), 'release' `release_connections`."""
    if not self.num_connections:
      return ()
    if self.tbs_structure == "release":
      return self.release_connections
    units = tuple(
        f"up_{i}_block_{j}"
        for i in reversed(range(len(self.ch_mult)))
        for j in range(self.num_res_blocks + 1)
    )
    return units[len(units) - self.num_connections :]

  @property
  def release_points(self) -> tuple[str, ...]:
    """Names of the release's distillation points (`UNetOutput.points`), in forward order."""
    levels, last = len(self.ch_mult), self.num_res_blocks - 1
    return (
        tuple(f"down_{i}_downsample" for i in range(levels - 1))
        + (f"down_{levels - 1}_block_{last}/conv2", "mid_block_2/conv2")
        + tuple(f"up_{i}_upsample" for i in reversed(range(1, levels)))
    )

  @property
  def num_decoder_blocks(self) -> int:
    return len(self.ch_mult) * (self.num_res_blocks + 1)

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
    """x: (B, H, W, C) noisy images; t: (B,) int timesteps.

    cache: the previous denoising step's connection features (TBS); None runs without it.
    progress: training progress in [0, 1] for methods whose estimators follow a schedule.
    Returns the UNetOutput: eps (B, H, W, out_ch) and the named feature points.
    """
    if self.tbs_structure not in TBS_STRUCTURES:
      raise ValueError(f"tbs_structure must be one of {TBS_STRUCTURES}, got {self.tbs_structure!r}")
    check_distill_points(self.distill_points)
    release = self.tbs_structure == "release"
    if release and self.num_connections:
      error = release_tbs_error(self.ch_mult, self.attn_resolutions, x.shape[1])
      if error:
        raise ValueError(error)
    if not release and self.num_connections > self.num_decoder_blocks:
      raise ValueError(
          f"tbs_connections={self.tbs_connections} exceeds the "
          f"{self.num_decoder_blocks} decoder blocks of this U-Net"
      )
    if x.shape[1] != x.shape[2] or x.shape[1] % 2 ** (len(self.ch_mult) - 1):
      raise ValueError(
          f"input of shape {x.shape} must be square with a side divisible by "
          f"{2 ** (len(self.ch_mult) - 1)}"
      )
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    ctx = QuantContext.create(t, progress)
    method, dtype = self.method, self.dtype
    blend_weights = None
    if self.num_connections:
      name, init, points = (
          ("tbs_release_table", RELEASE_TBS_INIT, len(self.ch_mult))
          if release
          else ("tbs_table", self.tbs_init, self.num_connections)
      )
      blend_weights = tbs.table_blend_weights(
          self, name, init, (self.tbs_buckets, points), t, cache, self.num_timesteps
      )
    carried = self.connection_points

    def release_blend(h, name, level):
      """The release's blend of h with the cached `name` at `level` (no-op elsewhere)."""
      if not release or blend_weights is None or name not in carried or level >= RELEASE_TBS_LEVELS:
        return h
      return tbs.blend(h, cache.features[carried.index(name)], blend_weights[:, level])

    temb = timestep_embedding(t, self.ch)
    temb = BinaryDense(self.ch * 4, name="temb_dense0")(temb)
    temb = BinaryDense(self.ch * 4, name="temb_dense1")(nn.swish(temb)).astype(dtype)

    features, points, decoder = [], {}, {}
    hs = [BinaryConv(self.ch, dtype=dtype, name="conv_in")(x)]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        name = f"down_{i}_block_{j}"
        h, points[f"{name}/conv2"] = ResBlock(
            self.ch * mult, self.dropout, method, dtype, name=name
        )(hs[-1], temb, ctx, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(method, dtype, name=f"down_{i}_attn_{j}")(h, ctx)
        hs.append(h)
        features.append(h)
      if i != len(self.ch_mult) - 1:
        h = BinaryConv(
            h.shape[-1],
            strides=2,
            padding=((0, 1), (0, 1)),
            method=method,
            dtype=dtype,
            name=f"down_{i}_downsample",
        )(hs[-1], ctx)
        points[f"down_{i}_downsample"] = h
        hs.append(h)
        features.append(h)

    h, _ = ResBlock(h.shape[-1], self.dropout, method, dtype, name="mid_block_1")(
        h, temb, ctx, train
    )
    h = AttnBlock(method, dtype, name="mid_attn_1")(h, ctx)
    h, points["mid_block_2/conv2"] = ResBlock(
        h.shape[-1], self.dropout, method, dtype, name="mid_block_2"
    )(h, temb, ctx, train)
    features.append(h)

    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h, _ = ResBlock(
            self.ch * self.ch_mult[i], self.dropout, method, dtype, name=f"up_{i}_block_{j}"
        )(jnp.concatenate([h, hs.pop()], -1), temb, ctx, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(method, dtype, name=f"up_{i}_attn_{j}")(h, ctx)
          h = release_blend(h, f"up_{i + 1}_upsample", i)
        if j == self.num_res_blocks and i != 0:
          name = f"up_{i}_upsample"
          h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest 2x
          h = release_blend(
              BinaryConv(h.shape[-1], method=method, dtype=dtype, name=name)(h, ctx), name, i
          )
          points[name] = decoder[name] = h
        name = f"up_{i}_block_{j}"
        if not release and blend_weights is not None and name in carried:
          point = carried.index(name)
          h = tbs.blend(h, cache.features[point], blend_weights[:, point])
          if j == self.num_res_blocks and i != 0:
            points[f"up_{i}_upsample"] = h
        decoder[name] = h
        features.append(h)

    h = nn.swish(_norm("norm_out", dtype)(h))
    eps = BinaryConv(self.out_ch, dtype=dtype, name="conv_out")(h)
    points = {name: points[name] for name in self.release_points}
    distill = (
        tuple(points[name] for name in self.release_points)
        if self.distill_points == "release"
        else tuple(features)
    )
    return UNetOutput(
        eps.astype(jnp.float32),
        tuple(features),
        tuple(decoder[name] for name in carried),
        distill,
        points,
    )
