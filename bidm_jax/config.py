"""The default configuration that every `configs/*.py` file overrides, and its validation.

Field groups: model, data, diffusion, binarization, tbs, distill, training, sampling, eval,
convert, export, mesh. `configs/cifar10.py` is the paper's CIFAR-10 setting; `configs/digits.py`
the embedded demo.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import ml_collections
from ml_collections import config_dict

from bidm_jax.binarize.methods import METHODS, BinarizationMethod, get_method
from bidm_jax.data import default_data_config
from bidm_jax.diffusion.schedules import BETA_SCHEDULES, LOSS_REDUCTIONS
from bidm_jax.layers.packed import ALL_IMPLS as PACKED_IMPLS
from bidm_jax.models.autoencoders import PRESETS as FIRST_STAGE_PRESETS
from bidm_jax.models.ldm_unet import LDM4, LDMUNetConfig
from bidm_jax.models.ldm_unet import PRESETS as LDM_PRESETS
from bidm_jax.models.unet import DISTILL_POINTS, TBS_STRUCTURES, release_tbs_error

COMPUTE_DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adam", "adamw")
SAMPLERS = ("ddim", "ddpm")
ENGINES = ("simulated", "packed")
EXPORT_FP_DTYPES = ("float32", "bfloat16")
FAMILIES = ("ddpm", "ldm")


def default_config() -> ml_collections.ConfigDict:
  """The paper's CIFAR-10 BiDM QAT setting (paper section 4), FP teacher path left empty."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compilation_cache = "auto"  # JAX's persistent cache: 'auto' (user cache dir), a path, 'off'
  c.model = dict(
      family="ddpm",  # 'ddpm': the fields below; 'ldm': the latent-diffusion U-Net of `ldm`
      ch=128,
      ch_mult=(1, 2, 2, 2),
      num_res_blocks=2,
      attn_resolutions=(16,),
      dropout=0.1,
      compute_dtype="float32",
      ldm=dataclasses.asdict(LDM4),  # CompVis' unet_config names (models.ldm_unet.LDMUNetConfig)
  )
  c.data = default_data_config()
  c.data.source = "tfds"
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.channels = 3
  c.data.random_flip = True
  c.diffusion = dict(beta_schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
  c.binarization = dict(
      method="bidm",
      learnable_k=config_dict.placeholder(bool),
      cross_timestep=config_dict.placeholder(bool),
      distillation=config_dict.placeholder(str),
      fp_init=config_dict.placeholder(str),
      binary_bias=config_dict.placeholder(bool),
      width_shortcut=config_dict.placeholder(str),  # 'conv' or 'none' (Table 4's layout)
      binary_skip_conv=config_dict.placeholder(bool),  # True: binary nin_shortcut (Table 4's)
  )
  c.tbs = dict(connections=2, buckets=100, init=0.3, structure="blocks")
  c.distill = dict(weight=3e-2, patches=4, reduction="mean", points="blocks")
  c.training = dict(
      steps=100_000,
      batch_size=64,
      optimizer="adam",
      learning_rate=6e-5,
      weight_decay=0.0,
      warmup_steps=0,
      grad_clip=1.0,
      ema_decay=0.9999,
      teacher="",
      log_every=100,
      checkpoint_every=5000,
      keep_checkpoints=3,
      sample_every=0,
      progress_bar=True,
      profile_start=-1,  # >= 0: a jax.profiler trace of steps [start, start + profile_steps)
      profile_steps=5,  # written to <workdir>/profile (benchmarks/profile_summary.py reads it)
  )
  c.sampling = dict(
      sampler="ddim",
      steps=100,
      eta=0.0,
      num_samples=64,
      batch_size=64,
      checkpoint="",
      checkpoint_step=0,  # 0: the newest intact step of a training workdir; else exactly that
      use_ema=True,  # False: the raw parameters of a training workdir
      save_npz=True,
      clip_x0=False,
      dynamic_threshold=0.0,
      engine="simulated",
      packed_impl="int8",
  )  # engine 'packed': run a --mode=export file's packed bits; packed_impl: layers.packed's
  # product form, 'int8' (XLA int8 conv), 'popcount' (XLA bit counts) or 'cuda' (the extension)
  c.eval = dict(
      num_samples=50_000,
      batch_size=500,
      inception_batch_size=250,  # at most this many images per Inception call (1,000: 15 GiB)
      inception_weights="",
      reference="",
      keep_samples=False,
      samples="",  # an .npz of uint8 samples to evaluate instead of sampling a model
      num_reference=0,
      pr_reference=50_000,
      progress_bar=True,
  )
  c.first_stage = dict(
      source="",  # '' (none) or a converted folder, a diffusers folder, a CompVis .ckpt
      preset="",  # models.autoencoders.PRESETS name: the architecture of a CompVis .ckpt
      scale_factor=config_dict.placeholder(float),  # overrides the source's latent scale
      sample_posterior=False,  # KL: a posterior sample per image instead of its mean
  )
  c.convert = dict(source="", layout="", use_ema=True)
  c.export = dict(path="", fp_dtype="float32")  # --mode=export: file, dtype of the FP layers
  c.mesh = dict(data=-1)
  return c


LDM_DATASETS = {
    "lsun_bedrooms": (
        "ldm4",
        "vq_f4",
        0.0195,
        dict(source="tfds", name="lsun/bedroom", random_flip=True),
    ),
    "ffhq": (
        "ldm4",
        "vq_f4",
        0.0195,
        dict(source="folder", name="", data_dir="ffhq", random_flip=False),
    ),
    "lsun_churches": (
        "ldm8",
        "kl_f8",
        0.0155,
        dict(source="tfds", name="lsun/church_outdoor", random_flip=True),
    ),
}
"""The paper's latent settings: U-Net and first stage presets, the betas' end, the data (flips
as CompVis' loaders: its LSUN ones flip, its FFHQ one does not)."""


def latent_diffusion_config(dataset: str, variant: str = ""):
  """The paper's LDM setting (paper section 4 and appendix A) for an `LDM_DATASETS` entry
  (256x256 images, flipped for LSUN): the LDM 'ldm_linear' betas 0.0015 .. beta_end, BiDM W1A1
  QAT with AdamW lr 2e-5, batch 4, 200k iterations, 8 TBS connections, SPD lambda 1e-2 on a mean
  loss, DDIM 200.

  variant: '' (that setting) or 'tiny' (the 'tiny_' U-Net and first stage on 32x32 images, 2
  TBS connections, a few steps and samples).
  """
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown {dataset} variant {variant!r}; valid: '' or 'tiny'")
  unet, first_stage, beta_end, data = LDM_DATASETS[dataset]
  prefix = "tiny_" if variant else ""
  size = 32 if variant else 256
  c = default_config()
  c.first_stage.preset = prefix + first_stage
  c.model.family = "ldm"
  c.model.ldm = dataclasses.asdict(LDM_PRESETS[prefix + unet])
  c.model.ldm.image_size = size // FIRST_STAGE_PRESETS[prefix + first_stage].factor
  c.data.update(image_size=size, **data)
  c.diffusion.update(beta_schedule="ldm_linear", beta_start=0.0015, beta_end=beta_end)
  c.tbs.connections = 8
  c.distill.update(weight=1e-2, reduction="mean")
  c.training.update(steps=200_000, batch_size=4, optimizer="adamw", learning_rate=2e-5)
  c.sampling.update(steps=200, num_samples=64, batch_size=16)
  if variant == "tiny":
    c.training.update(steps=4, log_every=2, checkpoint_every=2, progress_bar=False)
    c.sampling.update(steps=4, num_samples=4, batch_size=4)
    c.tbs.connections = 2
  return c


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of "path/to/config.py[:variant]", as `--config=` on the command line reads it."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bidm_config_file", path)
  if module_spec is None:
    raise FileNotFoundError(f"no config file at {path!r}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def method_from_config(config) -> BinarizationMethod:
  """The BinarizationMethod named by config.binarization, with its non-None overrides and the
  diffusion's number of timesteps."""
  b = config.binarization
  overrides = {k: v for k, v in b.items() if k != "method"}
  return get_method(b.method, num_timesteps=config.diffusion.num_timesteps, **overrides)


def validate(config) -> None:
  """Raises ValueError with a one-line message naming the first invalid field."""

  def need(ok, field, msg):
    if not ok:
      raise ValueError(f"config.{field}: {msg}")

  m, t, s, d = config.model, config.training, config.sampling, config.diffusion
  need(
      config.binarization.method in METHODS,
      "binarization.method",
      f"{config.binarization.method!r} is not one of {', '.join(METHODS)}",
  )
  need(m.family in FAMILIES, "model.family", f"{m.family!r} is not one of {FAMILIES}")
  need(
      m.family == "ldm" or not (config.first_stage.source or config.first_stage.preset),
      "first_stage.source",
      "a first stage feeds the LDM U-Net: set model.family 'ldm'",
  )
  need(
      not config.data.latent_cache or config.first_stage.source or config.first_stage.preset,
      "data.latent_cache",
      "only latents are cached: it needs a first stage (first_stage.source), or leave it ''",
  )
  if m.family == "ldm":
    _validate_ldm(config, need)
  else:
    _validate_ddpm(config, need)
  need(
      d.beta_schedule in BETA_SCHEDULES,
      "diffusion.beta_schedule",
      f"{d.beta_schedule!r} is not one of {BETA_SCHEDULES}",
  )
  need(d.num_timesteps >= 2, "diffusion.num_timesteps", f"must be >= 2, got {d.num_timesteps}")
  need(
      0 < d.beta_start < d.beta_end < 1,
      "diffusion.beta_start",
      f"need 0 < beta_start < beta_end < 1, got {d.beta_start}, {d.beta_end}",
  )
  need(config.tbs.buckets >= 1, "tbs.buckets", f"must be >= 1, got {config.tbs.buckets}")
  need(
      config.tbs.structure in TBS_STRUCTURES,
      "tbs.structure",
      f"{config.tbs.structure!r} is not one of {TBS_STRUCTURES}",
  )
  need(config.distill.weight >= 0, "distill.weight", f"must be >= 0, got {config.distill.weight}")
  need(
      config.distill.patches >= 1, "distill.patches", f"must be >= 1, got {config.distill.patches}"
  )
  need(
      config.distill.reduction in LOSS_REDUCTIONS,
      "distill.reduction",
      f"{config.distill.reduction!r} is not one of {LOSS_REDUCTIONS} (of the eps loss L_DM)",
  )
  need(
      config.distill.points in DISTILL_POINTS,
      "distill.points",
      f"{config.distill.points!r} is not one of {DISTILL_POINTS}",
  )
  need(
      m.compute_dtype in COMPUTE_DTYPES,
      "model.compute_dtype",
      f"{m.compute_dtype!r} is not one of {COMPUTE_DTYPES}",
  )
  need(t.steps >= 1, "training.steps", f"must be >= 1, got {t.steps}")
  need(t.batch_size >= 1, "training.batch_size", f"must be >= 1, got {t.batch_size}")
  need(
      t.optimizer in OPTIMIZERS, "training.optimizer", f"{t.optimizer!r} is not one of {OPTIMIZERS}"
  )
  need(t.learning_rate > 0, "training.learning_rate", f"must be > 0, got {t.learning_rate}")
  need(0.0 <= t.ema_decay < 1.0, "training.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
  need(t.grad_clip >= 0, "training.grad_clip", f"must be >= 0 (0 = off), got {t.grad_clip}")
  need(
      t.log_every >= 1 and t.checkpoint_every >= 1,
      "training.log_every",
      "log_every and checkpoint_every must be >= 1",
  )
  need(
      t.keep_checkpoints >= 1,
      "training.keep_checkpoints",
      f"must be >= 1, got {t.keep_checkpoints}",
  )
  need(
      t.profile_steps >= 1,
      "training.profile_steps",
      f"must be >= 1, got {t.profile_steps}",
  )
  need(
      t.profile_start < t.steps,
      "training.profile_start",
      f"must be < training.steps ({t.steps}) to trace anything (< 0: off), got {t.profile_start}",
  )
  need(s.sampler in SAMPLERS, "sampling.sampler", f"{s.sampler!r} is not one of {SAMPLERS}")
  need(
      1 <= s.steps <= d.num_timesteps,
      "sampling.steps",
      f"must be in [1, {d.num_timesteps}], got {s.steps}",
  )
  need(s.eta >= 0, "sampling.eta", f"must be >= 0, got {s.eta}")
  need(
      s.checkpoint_step >= 0,
      "sampling.checkpoint_step",
      f"must be >= 0 (0: the newest), got {s.checkpoint_step}",
  )
  need(
      0 <= s.dynamic_threshold <= 100,
      "sampling.dynamic_threshold",
      f"must be a percentile in (0, 100] or 0 (off), got {s.dynamic_threshold}",
  )
  need(
      s.num_samples >= 1 and s.batch_size >= 1,
      "sampling.num_samples",
      "num_samples and batch_size must be >= 1",
  )
  need(s.engine in ENGINES, "sampling.engine", f"{s.engine!r} is not one of {ENGINES}")
  need(
      s.packed_impl in PACKED_IMPLS,
      "sampling.packed_impl",
      f"{s.packed_impl!r} is not one of {PACKED_IMPLS}",
  )
  need(
      s.engine != "packed" or (s.checkpoint_step == 0 and s.use_ema),
      "sampling.checkpoint_step",
      "the packed engine runs an export, which has one set of parameters: leave "
      "checkpoint_step at 0 and use_ema True",
  )
  need(
      config.export.fp_dtype in EXPORT_FP_DTYPES,
      "export.fp_dtype",
      f"{config.export.fp_dtype!r} is not one of {EXPORT_FP_DTYPES}",
  )
  ev = config.eval
  need(
      ev.num_samples >= 4,
      "eval.num_samples",
      f"must be >= 4 (precision/recall use k=3 neighbours), got {ev.num_samples}",
  )
  need(ev.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {ev.batch_size}")
  need(
      ev.inception_batch_size >= 1,
      "eval.inception_batch_size",
      f"must be >= 1, got {ev.inception_batch_size}",
  )
  need(
      ev.num_reference >= 0,
      "eval.num_reference",
      f"must be >= 0 (0 = the whole split), got {ev.num_reference}",
  )
  need(
      ev.pr_reference >= 4,
      "eval.pr_reference",
      f"must be >= 4 (precision/recall use k=3 neighbours), got {ev.pr_reference}",
  )
  method_from_config(config)


def _validate_ddpm(config, need) -> None:
  """The DDPM U-Net's fields (config.model) and the image side they need."""
  m = config.model
  need(
      m.ch > 0 and m.ch % 32 == 0,
      "model.ch",
      f"must be a positive multiple of 32 (GroupNorm groups), got {m.ch}",
  )
  need(
      len(m.ch_mult) >= 1 and all(k > 0 for k in m.ch_mult),
      "model.ch_mult",
      f"must be positive integers, got {tuple(m.ch_mult)}",
  )
  need(m.num_res_blocks >= 1, "model.num_res_blocks", f"must be >= 1, got {m.num_res_blocks}")
  need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
  size = config.data.image_size
  need(
      size > 0 and size % 2 ** (len(m.ch_mult) - 1) == 0,
      "data.image_size",
      f"{size} must be divisible by 2^(len(ch_mult)-1) = {2 ** (len(m.ch_mult) - 1)}",
  )
  _need_connections(config, need, len(m.ch_mult) * (m.num_res_blocks + 1))
  release_error = release_tbs_error(m.ch_mult, m.attn_resolutions, size)
  need(config.tbs.structure != "release" or not release_error, "tbs.structure", release_error)


def _validate_ldm(config, need) -> None:
  """The latent-diffusion U-Net's fields (config.model.ldm): an LDMUNetConfig, eps of the input
  shape, only the paper's 'blocks' TBS and distillation points."""
  ldm = config.model.ldm
  unknown = sorted(set(ldm) - {f.name for f in dataclasses.fields(LDMUNetConfig)})
  need(not unknown, "model.ldm", f"unknown fields {unknown}")
  try:
    cfg = LDMUNetConfig(**ldm.to_dict())
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model.ldm: {e}") from None
  need(
      cfg.in_channels == cfg.out_channels,
      "model.ldm.out_channels",
      f"the eps prediction has the input's {cfg.in_channels} channels, got {cfg.out_channels}",
  )
  need(0.0 <= cfg.dropout < 1.0, "model.ldm.dropout", f"must be in [0, 1), got {cfg.dropout}")
  latent = (cfg.image_size, cfg.image_size, cfg.in_channels)
  f, size = config.first_stage, config.data.image_size
  need(
      f.preset in ("", *FIRST_STAGE_PRESETS),
      "first_stage.preset",
      f"{f.preset!r} is not one of {sorted(FIRST_STAGE_PRESETS)} or ''",
  )
  if f.preset:
    preset = FIRST_STAGE_PRESETS[f.preset]
    found = preset.latent_shape(size) if size % preset.factor == 0 else f"{size}/{preset.factor}"
    what = f"first stage {f.preset!r} encodes data.image_size {size} to"
  elif f.source:
    found, what = latent, ""  # a diffusers folder's shape is checked when it is read
  else:
    found = (size, size, config.data.channels)
    what = "without a first stage (first_stage.source, preset) the data are"
  need(
      found == latent,
      "data.image_size",
      f"the LDM U-Net diffuses {latent} inputs (model.ldm.image_size, in_channels), {what} {found}",
  )
  _need_connections(config, need, len(cfg.channel_mult) * (cfg.num_res_blocks + 1))
  need(
      config.tbs.structure == "blocks",
      "tbs.structure",
      "the LDM U-Net has only 'blocks' (the authors' LDM code blends its last decoder blocks "
      f"with their own previous outputs, which is 'blocks'), got {config.tbs.structure!r}",
  )


def _need_connections(config, need, blocks: int) -> None:
  need(
      0 <= config.tbs.connections <= blocks,
      "tbs.connections",
      f"must be in [0, {blocks}] (decoder blocks), got {config.tbs.connections}",
  )
