"""The assembly layer: a config turned into what every mode runs, each part built in one place.

`make_model` (the U-Net of `config.model` binarized by a method), `make_schedule`,
`make_mesh`, `make_optimizer`, `make_distillation` (SPD / L2 with its weight and patches) and
`load_teacher` (the frozen FP teacher) and `load_first_stage` (an LDM's frozen autoencoder,
`latent_encoder` / `latent_decoder`, `first_stage_description` for the latent cache) serve
training, sampling, evaluation, the export, the conversion, the demo and the benchmarks. The
architecture a checkpoint must agree with is `model_description(config)`, and `describe_unet` /
`unet_from_description` turn a U-Net into that description and back. `config.model.family`
picks the U-Net: 'ddpm' (`models.unet.UNet`, fields `ARCHITECTURE`) or 'ldm'
(`models.ldm_unet.LDMUNet`, the `config.model.ldm` fields of CompVis' unet_config, described with
`family: 'ldm'`). Sampling, and `load_model`, live in `bidm_jax.sampling`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bidm_jax.bidm import spd
from bidm_jax.binarize.methods import FP, BinarizationMethod
from bidm_jax.diffusion.schedules import Schedule
from bidm_jax.diffusion.schedules import make_schedule as _beta_schedule
from bidm_jax.export import convert_first_stage
from bidm_jax.io import files
from bidm_jax.models import autoencoders
from bidm_jax.models.ldm_unet import LDMUNet, LDMUNetConfig
from bidm_jax.models.unet import UNet
from bidm_jax.training import checkpoint as ckpt_lib

Array = jax.Array

ARCHITECTURE = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "out_ch")
"""The U-Net fields a checkpoint's model description holds (the rest come from the config)."""


def ldm_description(ldm: LDMUNetConfig) -> dict:
  """The description of an LDMUNet of config `ldm`: `family` 'ldm' and its fields as JSON
  values (sequences as lists)."""
  fields = dataclasses.asdict(ldm)
  return dict(
      family="ldm", **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
  )


def ldm_config(config) -> LDMUNetConfig:
  """The LDMUNetConfig of config.model.ldm (ValueError naming the fields it refuses)."""
  return LDMUNetConfig(**config.model.ldm.to_dict())


def model_description(config) -> dict:
  """The architecture fields that must match between a checkpoint and a config."""
  m = config.model
  if m.family == "ldm":
    return ldm_description(ldm_config(config))
  return dict(
      ch=m.ch,
      ch_mult=list(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=list(m.attn_resolutions),
      dropout=m.dropout,
      out_ch=config.data.channels,
  )


def describe_unet(model: UNet | LDMUNet) -> dict:
  """The description of `model` as JSON values (`model_description`'s form)."""
  if isinstance(model, LDMUNet):
    return ldm_description(model.config)
  return dict(
      ch=int(model.ch),
      ch_mult=[int(k) for k in model.ch_mult],
      num_res_blocks=int(model.num_res_blocks),
      attn_resolutions=[int(r) for r in model.attn_resolutions],
      dropout=float(model.dropout),
      out_ch=int(model.out_ch),
  )


def unet_from_description(desc: Mapping[str, Any], **kwargs) -> UNet | LDMUNet:
  """The U-Net of an architecture description (`model_description`'s form; lists become
  tuples); `kwargs` set its other fields (method, TBS, dtype)."""
  if desc.get("family", "ddpm") == "ldm":
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in desc.items() if k != "family"}
    return LDMUNet(LDMUNetConfig(**fields), **kwargs)
  return UNet(
      ch=desc["ch"],
      ch_mult=tuple(desc["ch_mult"]),
      num_res_blocks=desc["num_res_blocks"],
      attn_resolutions=tuple(desc["attn_resolutions"]),
      dropout=desc["dropout"],
      out_ch=desc["out_ch"],
      **kwargs,
  )


def make_model(config, method: BinarizationMethod = FP) -> UNet | LDMUNet:
  """The U-Net of `config.model` binarized by `method` (FP for the teacher), with the config's
  TBS settings and distillation points."""
  return unet_from_description(
      model_description(config),
      method=method,
      tbs_connections=config.tbs.connections,
      tbs_buckets=config.tbs.buckets,
      tbs_init=config.tbs.init,
      num_timesteps=config.diffusion.num_timesteps,
      tbs_structure=config.tbs.structure,
      distill_points=config.distill.points,
      dtype=jnp.dtype(config.model.compute_dtype),
  )


def make_schedule(config) -> Schedule:
  """The beta schedule of `config.diffusion`."""
  d = config.diffusion
  return _beta_schedule(d.beta_schedule, d.num_timesteps, d.beta_start, d.beta_end)


def image_shape(config, batch: int) -> tuple[int, int, int, int]:
  """(batch, H, W, C) of the model's inputs: the config's images, or an LDM's latents."""
  if config.model.family == "ldm":
    ldm = ldm_config(config)
    return (batch, ldm.image_size, ldm.image_size, ldm.in_channels)
  return (batch, config.data.image_size, config.data.image_size, config.data.channels)


def init_params(model: UNet | LDMUNet, config, rng: Array):
  """Fresh parameters of `model` for the config's image shape."""
  x = jnp.zeros(image_shape(config, 1), jnp.float32)
  return jax.jit(model.init)(rng, x, jnp.zeros((1,), jnp.int32))["params"]


def make_mesh(config) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over config.mesh.data devices (-1: all devices of all hosts)."""
  devices = jax.devices()
  n = len(devices) if config.mesh.data == -1 else config.mesh.data
  if not 1 <= n <= len(devices):
    raise ValueError(
        f"config.mesh.data: {config.mesh.data} devices requested, {len(devices)} available"
    )
  return jax.make_mesh((n,), ("data",), (jax.sharding.AxisType.Auto,), devices=devices[:n])


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam or AdamW with linear warm-up and global-norm gradient clipping (0 = no clipping)."""
  t = config.training
  lr = (
      optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
      if t.warmup_steps
      else t.learning_rate
  )
  opt = optax.adamw(lr, weight_decay=t.weight_decay) if t.optimizer == "adamw" else optax.adam(lr)
  return optax.chain(optax.clip_by_global_norm(t.grad_clip), opt) if t.grad_clip else opt


def make_distillation(config, method: BinarizationMethod) -> spd.Distillation | None:
  """The distillation loss of a binary `method` (`spd.DISTILLATION_LOSSES`) with
  `config.distill`'s weight and patches; None for FP and for methods that do not distil."""
  if not method.binary or method.distillation == "none":
    return None
  return spd.Distillation(method.distillation, config.distill.weight, config.distill.patches)


def load_teacher(config, mesh) -> tuple[UNet | LDMUNet, Any]:
  """The frozen FP teacher: (model, replicated params) from config.training.teacher."""
  path = config.training.teacher
  if not path:
    raise ckpt_lib.CheckpointError(
        f"config.training.teacher: QAT of method {config.binarization.method!r} starts from a "
        "full-precision model; point it at an FP training workdir or an exported/converted "
        "checkpoint (see README, 'Start from the public DDPM CIFAR-10 model')"
    )
  try:
    params, meta = ckpt_lib.load_params(path, model_description(config))
  except ckpt_lib.CheckpointError as e:  # missing, unreadable or another architecture
    raise ckpt_lib.CheckpointError(f"config.training.teacher: {e}") from e
  if meta.get("method", {}).get("binary"):
    raise ckpt_lib.CheckpointError(
        f"config.training.teacher: {path} holds a binary model "
        f"({meta['method']['name']}), not a full-precision one"
    )
  return make_model(config, FP), jax.device_put(params, NamedSharding(mesh, P()))


class FirstStage(NamedTuple):
  """A frozen first stage: its config, module and params (replicated over the mesh)."""

  config: autoencoders.FirstStageConfig
  module: autoencoders.VQModel | autoencoders.AutoencoderKL
  params: Any


@functools.lru_cache(maxsize=2)
def _read_first_stage(source: str, preset: str, scale_factor: float | None):
  """`convert_first_stage.load_first_stage` of the config's fields, read once per process."""
  return convert_first_stage.load_first_stage(
      source, autoencoders.PRESETS.get(preset), scale_factor=scale_factor
  )


def load_first_stage(config, mesh) -> FirstStage | None:
  """The first stage of config.first_stage (None without source and preset), checked to
  encode config.data's images to the LDM U-Net's input shape."""
  f = config.first_stage
  if not f.source and not f.preset:
    return None
  if not f.source:
    raise ValueError(
        f"config.first_stage.source: the model diffuses {f.preset!r} latents; give a converted "
        "first stage (--mode=convert), a diffusers folder or a CompVis .ckpt"
    )
  try:
    fs_config, params = _read_first_stage(f.source, f.preset, f.scale_factor)
  except (OSError, ValueError) as e:
    raise ValueError(f"config.first_stage.source: {e}") from None
  latent = image_shape(config, 1)[1:]
  if (
      config.data.image_size % fs_config.factor
      or fs_config.latent_shape(config.data.image_size) != latent
  ):
    raise ValueError(
        f"config.first_stage.source: {f.source} (factor {fs_config.factor}, "
        f"{fs_config.embed_dim} channels) does not encode data.image_size "
        f"{config.data.image_size} to the model's {latent} latents"
    )
  params = jax.device_put(params, NamedSharding(mesh, P()))
  return FirstStage(fs_config, autoencoders.make_first_stage(fs_config), params)


def latent_encoder(config, first_stage: FirstStage) -> Callable[[np.ndarray, int], np.ndarray]:
  """encode(images, index): images (B, H, W, C) float32 in [-1, 1] -> latents (B, h, w, c)
  float32 on the host; the KL posterior mean, or with first_stage.sample_posterior a sample
  keyed by fold_in(PRNGKey(seed), index)."""
  sample = config.first_stage.sample_posterior and first_stage.config.kind == "kl"

  @jax.jit
  def encode(params, x, key):
    posterior_sample = {"rng": key} if sample else {}
    return first_stage.module.apply({"params": params}, x, method="encode", **posterior_sample)

  key = jax.random.PRNGKey(config.seed)
  return lambda images, index: np.asarray(
      encode(first_stage.params, images, jax.random.fold_in(key, index))
  )


def first_stage_description(config, first_stage: FirstStage) -> dict:
  """What decides the latents `latent_encoder` makes, for data.latent_cache's description: the
  source (absolute when local), preset, FirstStageConfig (scale_factor included), posterior
  ('mean', or the seed of its samples), latent shape, and a SHA-256 of the parameters' checksums
  (so another autoencoder at the same path is never taken for this one)."""
  f = config.first_stage
  sample = f.sample_posterior and first_stage.config.kind == "kl"
  checksums = json.dumps(ckpt_lib.tree_checksum(first_stage.params), sort_keys=True)
  return dict(
      source=f.source if files.is_remote(f.source) else os.path.abspath(f.source),
      preset=f.preset,
      config=dataclasses.asdict(first_stage.config),
      posterior=f"sample, seed {config.seed}" if sample else "mean",
      latent_shape=list(first_stage.config.latent_shape(config.data.image_size)),
      params=hashlib.sha256(checksums.encode()).hexdigest(),
  )


def latent_decoder(first_stage: FirstStage) -> Callable[[Array], Array]:
  """decode(latents (B, h, w, c)) -> images (B, H, W, C) clipped to [-1, 1] (jitted)."""
  decode = jax.jit(
      lambda params, z: jnp.clip(
          first_stage.module.apply({"params": params}, z, method="decode"), -1.0, 1.0
      )
  )
  return lambda z: decode(first_stage.params, z)
