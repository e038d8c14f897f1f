"""The full-precision first stages of latent diffusion: VQ-f4 (`VQModel`), KL-f8 (`AutoencoderKL`).

BiDM binarizes only the U-Net; the autoencoder that maps images to latents stays full precision
and frozen. Both models share the CompVis / taming encoder and decoder (GroupNorm-SiLU ResNet
blocks, one single-head attention in each middle block, a (0, 1, 0, 1)-padded stride-2 conv to
downsample, nearest-neighbour doubling followed by a conv to upsample). Arrays are NHWC, images
in [-1, 1], all float32.

`encode` returns latents in the diffusion model's space, i.e. already multiplied by the
checkpoint's `scale_factor`, and `decode` divides by it first, as CompVis' LatentDiffusion does
in `get_first_stage_encoding` / `decode_first_stage`. The VQ model's `encode` stops before the
codebook (the diffusion runs on the continuous `quant_conv` output) and its `decode` snaps each
latent vector to its nearest code, as CompVis' `VQModelInterface`.

Apply a method with ``model.apply(variables, x, method='encode')``; every method is pure and
jittable. ``model.init(rng, images)`` creates all parameters (it runs encode then decode).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

KINDS = ("vq", "kl")
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
"""The KL posterior's log-variance is clipped to this range (as CompVis and diffusers)."""


@dataclasses.dataclass(frozen=True)
class FirstStageConfig:
  """The architecture of a first stage: what the weights need plus the latent scale.

  Attributes:
    kind: 'vq' (vector-quantized, `VQModel`) or 'kl' (Gaussian posterior, `AutoencoderKL`).
    in_channels, out_channels: image channels.
    ch: base width; level i has ch * ch_mult[i] channels.
    ch_mult: width multipliers; the image side is divided by 2 ** (len(ch_mult) - 1).
    num_res_blocks: ResNet blocks per encoder level (the decoder has one more per level).
    z_channels: channels at the encoder output / decoder input.
    embed_dim: latent channels after `quant_conv` (the diffusion model's channels).
    n_embed: VQ codebook size (0 for 'kl').
    norm_groups: GroupNorm groups (must divide every width).
    scale_factor: latents are multiplied by this in `encode`, divided in `decode`.
  """

  kind: str = "vq"
  in_channels: int = 3
  out_channels: int = 3
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 3
  embed_dim: int = 3
  n_embed: int = 8192
  norm_groups: int = 32
  scale_factor: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    errors = []
    if self.kind not in KINDS:
      errors.append(f"kind {self.kind!r} is not one of {KINDS}")
    if (self.kind == "vq") != (self.n_embed > 0):
      errors.append(f"n_embed={self.n_embed}: a 'vq' model needs a codebook, a 'kl' one has none")
    bad = [w for w in self.widths if w % self.norm_groups]
    if not self.ch_mult:
      errors.append("ch_mult is empty")
    if bad:
      errors.append(f"norm_groups={self.norm_groups} does not divide the widths {bad}")
    if errors:
      raise ValueError("FirstStageConfig: " + "; ".join(errors))

  @property
  def widths(self) -> tuple[int, ...]:
    """Channels of each level."""
    return tuple(self.ch * m for m in self.ch_mult)

  @property
  def factor(self) -> int:
    """How many image pixels one latent pixel spans along each side."""
    return 2 ** (len(self.ch_mult) - 1)

  def latent_shape(self, image_size: int) -> tuple[int, int, int]:
    """(H, W, C) of the latents of a square image."""
    if image_size % self.factor:
      raise ValueError(f"image side {image_size} is not a multiple of {self.factor}")
    side = image_size // self.factor
    return side, side, self.embed_dim


VQ_F4 = FirstStageConfig()
"""CompVis vq-f4 (LDM-4 on LSUN-Bedrooms and FFHQ): 64x64x3 latents of 256x256 images."""
KL_F8 = FirstStageConfig(
    kind="kl", ch_mult=(1, 2, 4, 4), z_channels=4, embed_dim=4, n_embed=0, scale_factor=0.22765929
)
"""CompVis kl-f8 (LDM-8 on LSUN-Churches, whose config sets scale_factor 0.22765929)."""
TINY_VQ_F4 = dataclasses.replace(VQ_F4, ch=8, n_embed=16, norm_groups=4, num_res_blocks=1)
"""vq-f4's layout at test size."""
TINY_KL_F8 = dataclasses.replace(KL_F8, ch=8, norm_groups=4, num_res_blocks=1)
"""kl-f8's layout at test size."""
PRESETS = {"vq_f4": VQ_F4, "kl_f8": KL_F8, "tiny_vq_f4": TINY_VQ_F4, "tiny_kl_f8": TINY_KL_F8}


def make_first_stage(config: FirstStageConfig) -> VQModel | AutoencoderKL:
  """The module of `config.kind`."""
  return (VQModel if config.kind == "vq" else AutoencoderKL)(config)


def _norm(config: FirstStageConfig, name: str) -> nn.GroupNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits that the PyTorch reference keeps.
  return nn.GroupNorm(
      num_groups=config.norm_groups, epsilon=NORM_EPS, use_fast_variance=False, name=name
  )


def _conv3(features: int, name: str) -> nn.Conv:
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), name=name)


class ResnetBlock(nn.Module):
  """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 conv on x when widths differ."""

  config: FirstStageConfig
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _conv3(self.features, "conv1")(nn.silu(_norm(self.config, "norm1")(x)))
    h = _conv3(self.features, "conv2")(nn.silu(_norm(self.config, "norm2")(h)))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions; q, k, v, proj_out act on channels."""

  config: FirstStageConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hgt, wid, c = x.shape
    h = _norm(self.config, "norm")(x).reshape(b, hgt * wid, c)
    q, k, v = (nn.Dense(c, name=n)(h) for n in ("q", "k", "v"))
    attn = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * c**-0.5, axis=-1)
    h = nn.Dense(c, name="proj_out")(jnp.einsum("bij,bjc->bic", attn, v))
    return x + h.reshape(b, hgt, wid, c)


def _middle(config: FirstStageConfig, h: Array) -> Array:
  """block_1, attn_1, block_2 at the lowest resolution (called inside a compact method)."""
  h = ResnetBlock(config, h.shape[-1], name="mid_block_1")(h)
  h = AttnBlock(config, name="mid_attn_1")(h)
  return ResnetBlock(config, h.shape[-1], name="mid_block_2")(h)


def _out(config: FirstStageConfig, h: Array, features: int) -> Array:
  return _conv3(features, "conv_out")(nn.silu(_norm(config, "norm_out")(h)))


class Encoder(nn.Module):
  """(B, H, W, in_channels) images -> (B, H/f, W/f, z_channels [x2 if double_z]) features."""

  config: FirstStageConfig
  double_z: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    h = _conv3(cfg.ch, "conv_in")(x)
    for i, width in enumerate(cfg.widths):
      for j in range(cfg.num_res_blocks):
        h = ResnetBlock(cfg, width, name=f"down_{i}_block_{j}")(h)
      if i != len(cfg.widths) - 1:
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
        h = nn.Conv(width, (3, 3), strides=(2, 2), padding="VALID", name=f"down_{i}_downsample")(h)
    h = _middle(cfg, h)
    return _out(cfg, h, cfg.z_channels * (2 if self.double_z else 1))


class Decoder(nn.Module):
  """(B, h, w, z_channels) -> (B, h*f, w*f, out_channels) images (not clipped)."""

  config: FirstStageConfig

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg = self.config
    h = _middle(cfg, _conv3(cfg.widths[-1], "conv_in")(z))
    for i in reversed(range(len(cfg.widths))):
      for j in range(cfg.num_res_blocks + 1):
        h = ResnetBlock(cfg, cfg.widths[i], name=f"up_{i}_block_{j}")(h)
      if i != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = _conv3(h.shape[-1], f"up_{i}_upsample")(h)
    return _out(cfg, h, cfg.out_channels)


class VectorQuantizer(nn.Module):
  """Nearest-code lookup in an (n_embed, embed_dim) codebook, by Euclidean distance."""

  n_embed: int
  embed_dim: int

  @nn.compact
  def __call__(self, z: Array) -> tuple[Array, Array]:
    """(B, h, w, D) latents -> (their codes (B, h, w, D), code indices (B, h, w) int32).

    The distances are computed one image at a time (an (h*w, n_embed) matrix, not a batch's),
    at full matmul precision so that accelerators do not pick codes from TF32 products. The
    codes carry no gradient to z (the first stage is frozen).
    """
    limit = 1.0 / self.n_embed
    init = lambda key, shape: jax.random.uniform(key, shape, minval=-limit, maxval=limit)
    codebook = self.param("embedding", init, (self.n_embed, self.embed_dim))
    sq = jnp.sum(codebook**2, axis=1)

    def nearest(flat):  # (h*w, D) -> (h*w,)
      cross = jnp.dot(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
      return jnp.argmin(sq[None] - 2.0 * cross, axis=1).astype(jnp.int32)

    b, hgt, wid, d = z.shape
    idx = jax.lax.map(nearest, z.reshape(b, hgt * wid, d)).reshape(b, hgt, wid)
    return jnp.take(codebook, idx, axis=0), idx


class VQModel(nn.Module):
  """VQ-regularised autoencoder (CompVis VQModelInterface, diffusers VQModel)."""

  config: FirstStageConfig = VQ_F4

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, double_z=False)
    self.quant_conv = nn.Conv(cfg.embed_dim, (1, 1))
    self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
    self.post_quant_conv = nn.Conv(cfg.z_channels, (1, 1))
    self.decoder = Decoder(cfg)

  def encode(self, x: Array) -> Array:
    """(B, H, W, C) images -> (B, H/f, W/f, embed_dim) scaled, not yet quantized latents."""
    return self.quant_conv(self.encoder(x)) * self.config.scale_factor

  def quantized(self, z: Array) -> tuple[Array, Array]:
    """Scaled latents -> (unscaled nearest codes, code indices (B, h, w))."""
    return self.quantize(z / self.config.scale_factor)

  def decode(self, z: Array) -> Array:
    """(B, h, w, embed_dim) scaled latents -> (B, h*f, w*f, out_channels) images."""
    codes, _ = self.quantized(z)
    return self.decoder(self.post_quant_conv(codes))

  def __call__(self, x: Array) -> Array:
    """Reconstruction: decode(encode(x))."""
    return self.decode(self.encode(x))


class AutoencoderKL(nn.Module):
  """KL-regularised autoencoder with a diagonal Gaussian posterior (CompVis and diffusers)."""

  config: FirstStageConfig = KL_F8

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, double_z=True)
    self.quant_conv = nn.Conv(2 * cfg.embed_dim, (1, 1))
    self.post_quant_conv = nn.Conv(cfg.z_channels, (1, 1))
    self.decoder = Decoder(cfg)

  def moments(self, x: Array) -> tuple[Array, Array]:
    """Images -> the posterior's unscaled (mean, log-variance), each (B, H/f, W/f, embed_dim)."""
    mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def encode(self, x: Array, rng: Array | None = None) -> Array:
    """Images -> scaled latents: the posterior mean, or a sample from it when `rng` is given."""
    mean, logvar = self.moments(x)
    if rng is not None:
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return mean * self.config.scale_factor

  def decode(self, z: Array) -> Array:
    """(B, h, w, embed_dim) scaled latents -> (B, h*f, w*f, out_channels) images."""
    return self.decoder(self.post_quant_conv(z / self.config.scale_factor))

  def __call__(self, x: Array) -> Array:
    """Reconstruction from the posterior mean: decode(encode(x))."""
    return self.decode(self.encode(x))
