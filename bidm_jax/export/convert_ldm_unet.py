"""Convert PyTorch latent-diffusion U-Nets into the parameters of `models.ldm_unet.LDMUNet` (FP).

Two layouts are read, without torch (`io.torch_files`):

* ``"compvis"``: the ``model.diffusion_model.*`` keys of a CompVis latent-diffusion Lightning
  ``.ckpt`` (guided-diffusion's UNetModel: ``time_embed.{0,2}``, ``input_blocks.{n}``,
  ``middle_block.{0,1,2}``, ``output_blocks.{n}``, ``out.{0,2}``; res blocks ``in_layers.{0,2}``,
  ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``; attention ``norm``, a fused
  ``qkv`` Conv1d split here per head into q, k, v, and ``proj_out``; resampling ``op`` / ``conv``
  or a res block). When the checkpoint also holds the EMA copy (``model_ema.*``, whose names
  LitEma writes without dots, e.g. ``model_ema.diffusion_modelinput_blocks00weight``), the EMA
  weights are taken unless ``use_ema=False``. A bare UNetModel state dict works too.
* ``"diffusers"``: a ``UNet2DModel`` folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors`` or ``.bin``), or a pipeline folder holding it as
  ``unet/``, as the CompVis LDM pipelines publish it: ``time_embedding.linear_{1,2}``,
  ``down_blocks.{i}.{resnets,attentions}.{j}``, ``downsamplers.0[.conv]``, ``mid_block``,
  ``up_blocks`` deepest level first, attention ``group_norm``, ``to_q/to_k/to_v/to_out.0`` (or
  ``query/key/value/proj_attn``). The architecture comes from ``config.json``.

All or nothing: every tensor of the selected U-Net must be used and every parameter filled with
its shape, else one ValueError (one line) lists the shape mismatches, the missing targets and the
unused source tensors. The CompVis ``.ckpt``'s other models (``first_stage_model.*``,
``cond_stage_model.*``) and the schedule buffers lie outside the selected U-Net.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from bidm_jax.export import convert_ddpm, param_shapes
from bidm_jax.export import convert_first_stage as cfs
from bidm_jax.models import autoencoders as ae
from bidm_jax.models import ldm_unet
from bidm_jax.training import checkpoint as ckpt_lib

LAYOUTS = ("compvis", "diffusers")
WEIGHT_FILES = cfs.WEIGHT_FILES
COMPVIS_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
_QKV = {"q": 0, "k": 1, "v": 2}

__all__ = [
    "LAYOUTS",
    "config_from_diffusers",
    "convert_state_dict",
    "load_ldm_unet",
    "source_key",
    "target_shapes",
]


def target_shapes(config: ldm_unet.LDMUNetConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{parameter path: shape} of the FP `LDMUNet(config)` (jax.eval_shape: nothing is computed)."""
  x = jax.ShapeDtypeStruct(
      (1, config.image_size, config.image_size, config.in_channels), jnp.float32
  )
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return param_shapes(ldm_unet.LDMUNet(config), x, t)


# ---------------------------------------------------------------------------------------------
# Our module names -> source module names.

# Our res-block / attention sub-module -> (CompVis name, diffusers names in order of preference).
_SUB_NAMES = {
    "norm1": ("in_layers.0", ("norm1",)),
    "conv1": ("in_layers.2", ("conv1",)),
    "temb_proj": ("emb_layers.1", ("time_emb_proj",)),
    "norm2": ("out_layers.0", ("norm2",)),
    "conv2": ("out_layers.3", ("conv2",)),
    "nin_shortcut": ("skip_connection", ("conv_shortcut",)),
    "norm": ("norm", ("group_norm",)),
    "q": ("qkv", ("to_q", "query")),
    "k": ("qkv", ("to_k", "key")),
    "v": ("qkv", ("to_v", "value")),
    "proj_out": ("proj_out", ("to_out.0", "proj_attn")),
}
_TOP_NAMES = {
    "conv_in": ("input_blocks.0.0", "conv_in"),
    "norm_out": ("out.0", "conv_norm_out"),
    "conv_out": ("out.2", "conv_out"),
    "temb_dense0": ("time_embed.0", "time_embedding.linear_1"),
    "temb_dense1": ("time_embed.2", "time_embedding.linear_2"),
}


def _compvis_module(module: str, config: ldm_unet.LDMUNetConfig) -> str | None:
  """CompVis name of one of our top-level modules (input/output block indices counted here)."""
  if module in _TOP_NAMES:
    return _TOP_NAMES[module][0]
  per_level = config.num_res_blocks + 1
  if m := re.fullmatch(r"down_(\d+)_(block|attn)_(\d+)", module):
    i, kind, j = int(m[1]), m[2], int(m[3])
    return f"input_blocks.{1 + i * per_level + j}.{0 if kind == 'block' else 1}"
  if m := re.fullmatch(r"down_(\d+)_downsample", module):
    n = 1 + int(m[1]) * per_level + config.num_res_blocks
    return f"input_blocks.{n}.0" + ("" if config.resblock_updown else ".op")
  if m := re.fullmatch(r"mid_(block|attn)_(\d)", module):
    return f"middle_block.{1 if m[1] == 'attn' else 2 * (int(m[2]) - 1)}"
  levels = len(config.channel_mult)
  if m := re.fullmatch(r"up_(\d+)_(block|attn)_(\d+)", module):
    i, kind, j = int(m[1]), m[2], int(m[3])
    return f"output_blocks.{(levels - 1 - i) * per_level + j}.{0 if kind == 'block' else 1}"
  if m := re.fullmatch(r"up_(\d+)_upsample", module):
    i = int(m[1])
    n = (levels - 1 - i) * per_level + config.num_res_blocks
    index = 2 if config.has_attention(i) else 1
    return f"output_blocks.{n}.{index}" + ("" if config.resblock_updown else ".conv")
  return None


def _diffusers_module(module: str, config: ldm_unet.LDMUNetConfig) -> str | None:
  """diffusers name of one of our top-level modules (up_blocks run deepest level first)."""
  if module in _TOP_NAMES:
    return _TOP_NAMES[module][1]
  levels = len(config.channel_mult)
  if m := re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", module):
    side, i, kind, j = m[1], int(m[2]), m[3], int(m[4])
    level = i if side == "down" else levels - 1 - i
    return f"{side}_blocks.{level}.{'resnets' if kind == 'block' else 'attentions'}.{j}"
  if m := re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", module):
    side, i, what = m[1], int(m[2]), m[3]
    level = i if side == "down" else levels - 1 - i
    return f"{side}_blocks.{level}.{what}rs.0" + ("" if config.resblock_updown else ".conv")
  if m := re.fullmatch(r"mid_(block|attn)_(\d)", module):
    kind, n = m[1], int(m[2])
    return f"mid_block.{'resnets' if kind == 'block' else 'attentions'}.{n - 1}"
  return None


def source_key(path: tuple[str, ...], layout: str, config: ldm_unet.LDMUNetConfig) -> list[str]:
  """The state-dict keys that may hold our parameter `path`, in order of preference.

  CompVis' q, k and v all come from the fused ``qkv`` tensor (`_slice_qkv` takes their part).
  """
  module, *subs, leaf = path
  compvis = layout == "compvis"
  base = (_compvis_module if compvis else _diffusers_module)(module, config)
  if base is None or len(subs) > 1:
    return []
  suffix = "bias" if leaf == "bias" else "weight"
  if not subs:
    return [f"{base}.{suffix}"]
  if subs[0] not in _SUB_NAMES:
    return []
  name, alternatives = _SUB_NAMES[subs[0]]
  return [f"{base}.{n}.{suffix}" for n in ((name,) if compvis else alternatives)]


def _ema_key(key: str) -> str:
  """LitEma's buffer name of a CompVis U-Net key: the wrapper's name without its dots."""
  return EMA_PREFIX + ("diffusion_model." + key).replace(".", "")


# ---------------------------------------------------------------------------------------------
# Tensors.


def _slice_qkv(arr: np.ndarray, part: str, heads: int) -> np.ndarray:
  """q, k or v of guided-diffusion's fused qkv (its legacy order: per head, q then k then v).

  arr: (3C, C, 1) weight or (3C,) bias -> (C, C, 1) or (C,).
  """
  c3 = arr.shape[0]
  split = arr.reshape((heads, 3, c3 // (3 * heads)) + arr.shape[1:])
  return split[:, _QKV[part]].reshape((c3 // 3,) + arr.shape[1:])


def _to_flax(arr: np.ndarray, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray | None:
  """A PyTorch tensor in our parameter's layout: Conv1d (O, I, 1) and Linear (O, I) weights of
  a 1x1 conv target become (O, I, 1, 1) first; the rest is the first stages' rule."""
  if len(shape) == 4 and arr.ndim in (2, 3) and arr.shape[2:] in ((), (1,)):
    arr = arr.reshape(arr.shape[:2] + (1, 1))
  return cfs._to_flax(arr, path, shape)


# ---------------------------------------------------------------------------------------------
# The U-Net inside a state dict.


def _find_compvis(keys, use_ema: bool) -> tuple[str, Callable[[str], str]]:
  """(description, key function) of the CompVis U-Net: EMA names when present and wanted."""
  keys = set(keys)
  marker = "input_blocks.0.0.weight"
  bases = sorted(
      k[: -len(marker)]
      for k in keys
      if k.endswith(marker) and (k == marker or k[: -len(marker)].endswith("."))
  )
  roots = [b for b in bases if b.endswith(COMPVIS_PREFIX) or b == ""]
  if len(roots) != 1:
    raise ValueError(
        f"expected one CompVis U-Net (a key ending in {COMPVIS_PREFIX}{marker} or "
        f"a bare {marker}), found {len(roots)}: {roots}"
    )
  base = roots[0]
  root = base[: -len(COMPVIS_PREFIX)] if base.endswith(COMPVIS_PREFIX) else None
  if use_ema and root is not None and root + _ema_key(marker) in keys:
    return f"{root}{EMA_PREFIX}", lambda k: root + _ema_key(k)
  return base, lambda k: base + k


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: ldm_unet.LDMUNetConfig,
    *,
    layout: str | None = None,
    use_ema: bool = True,
) -> dict:
  """The ``params`` of the FP `LDMUNet(config)` from a PyTorch state dict.

  Args:
    state_dict: ``{name: array}`` as `load_torch_state_dict` returns it: a CompVis checkpoint
      (``[state_dict.]model.diffusion_model.*``, maybe ``model_ema.*``), a bare UNetModel, or a
      diffusers UNet2DModel.
    config: the architecture.
    layout: 'compvis', 'diffusers', or None to tell from the key names.
    use_ema: take a CompVis checkpoint's EMA weights when it holds them.
  Returns:
    Nested dicts of float32 numpy arrays, applied as ``LDMUNet(config).apply({'params': p}, ...)``.
  Raises:
    ValueError: an unknown layout, no U-Net, or any mismatch (one line listing them all).
  """
  if layout is None:
    layout = "diffusers" if "time_embedding.linear_1.weight" in state_dict else "compvis"
  if layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
  if layout == "compvis":
    where, key_of = _find_compvis(state_dict, use_ema)
    selected = {k for k in state_dict if k.startswith(where)}
    if where.endswith(EMA_PREFIX):
      selected -= {where + "decay", where + "num_updates"}
  else:
    where, key_of, selected = "", lambda k: k, set(state_dict)

  def transform(arr, path, shape):
    if layout == "compvis" and path[-2] in _QKV and arr.shape[:1] == (3 * shape[-1],):
      arr = _slice_qkv(arr, path[-2], config.heads_of(shape[-1]))
    return _to_flax(arr, path, shape)

  targets = target_shapes(config)
  params = cfs.map_tensors(
      state_dict,
      targets,
      lambda path: [key_of(k) for k in source_key(path, layout, config)],
      transform,
      selected,
      f"the {layout}-layout U-Net" + (f" under {where!r}" if where else "") + f" into {config}",
  )
  logging.info(
      "converted %d tensors of a %s-layout LDM U-Net%s",
      len(targets),
      layout,
      f" under {where!r}" if where else "",
  )
  return params


# ---------------------------------------------------------------------------------------------
# diffusers config.json.

# Fields whose other values describe a model that ours is not (absent fields are not checked).
_DIFFUSERS_REQUIRED = {
    "act_fn": ("silu", "swish"),
    "time_embedding_type": ("positional",),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "downsample_padding": (1,),
    "norm_eps": (ldm_unet.NORM_EPS,),
    "center_input_sample": (False,),
    "mid_block_scale_factor": (1,),
    "mid_block_type": ("UNetMidBlock2D",),
    "add_attention": (True,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "downsample_type": ("conv", "resnet"),
    "upsample_type": ("conv", "resnet"),
}


def config_from_diffusers(config: Mapping[str, Any]) -> ldm_unet.LDMUNetConfig:
  """Our architecture from a diffusers UNet2DModel ``config.json`` (parsed).

  Raises ValueError naming every field that describes something we do not build. diffusers
  expresses heads only as `attention_head_dim` (channels per head): LDM-8's fixed 8 heads at
  widths 192 to 768 have no UNet2DModel form. Its middle attention has no norm under
  'scale_shift' unless `attn_norm_num_groups` is set.
  """
  problems = []
  if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
    problems.append(f"_class_name {config.get('_class_name')!r} is not 'UNet2DModel'")
  widths = [int(w) for w in config.get("block_out_channels", (224, 448, 672, 896))]
  groups = int(config.get("norm_num_groups", 32))
  shift = config.get("resnet_time_scale_shift", "default") == "scale_shift"
  if config.get("attn_norm_num_groups") not in ((groups,) if shift else (None, groups)):
    problems.append(
        f"attn_norm_num_groups: {config.get('attn_norm_num_groups')!r}, expected "
        f"{groups}" + ("" if shift else " or None")
    )
  if config.get("time_embedding_dim") not in (None, 4 * widths[0]):
    problems.append(
        f"time_embedding_dim: {config['time_embedding_dim']!r}, expected "
        f"{4 * widths[0]} or None"
    )
  updown = config.get("downsample_type", "conv")
  if config.get("upsample_type", "conv") != updown:
    problems.append(
        f"upsample_type {config.get('upsample_type')!r} differs from downsample_type {updown!r}"
    )
  plain = {
      "conv": ("DownBlock2D", "UpBlock2D"),
      "resnet": ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"),
  }.get(updown)
  down = list(config.get("down_block_types", ()))
  up = list(config.get("up_block_types", ()))
  attention = [t == "AttnDownBlock2D" for t in down]
  levels = len(widths)
  if plain is not None:
    # The deepest level does not resample, so its plain blocks may be either kind.
    allowed_down = [
        ("AttnDownBlock2D",)
        if a
        else (plain[0],) + (("DownBlock2D", "ResnetDownsampleBlock2D") if i == levels - 1 else ())
        for i, a in enumerate(attention)
    ]
    allowed_up = [
        ("AttnUpBlock2D",)
        if a
        else (plain[1],) + (("UpBlock2D", "ResnetUpsampleBlock2D") if i == 0 else ())
        for i, a in enumerate(attention)
    ][::-1]
    if len(down) != levels or any(t not in a for t, a in zip(down, allowed_down)):
      problems.append(f"down_block_types: {down}, expected per level one of {allowed_down}")
    if len(up) != levels or any(t not in a for t, a in zip(up, allowed_up)):
      problems.append(f"up_block_types: {up}, expected per level one of {allowed_up}")
  cfs.check_config(config, _DIFFUSERS_REQUIRED, widths, problems, "a U-Net")
  head_dim = config.get("attention_head_dim", 8)
  size = config.get("sample_size", 64)
  try:
    return ldm_unet.LDMUNetConfig(
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=int(config.get("layers_per_block", 2)),
        attention_resolutions=tuple(2**i for i, a in enumerate(attention) if a),
        num_heads=1 if head_dim is None else -1,
        num_head_channels=-1 if head_dim is None else int(head_dim),
        use_scale_shift_norm=shift,
        resblock_updown=updown == "resnet",
        dropout=float(config.get("dropout", 0.0)),
        norm_groups=groups,
        image_size=int(size[0] if isinstance(size, (list, tuple)) else size),
    )
  except ValueError as e:
    raise ValueError(f"the diffusers config.json does not describe a U-Net we build: {e}") from None


def load_ldm_unet(
    source,
    config: ldm_unet.LDMUNetConfig | None = None,
    *,
    layout: str | None = None,
    use_ema: bool = True,
) -> tuple[ldm_unet.LDMUNetConfig, dict]:
  """Reads and converts a latent-diffusion U-Net: returns (its config, its FP params).

  Args:
    source: a diffusers UNet2DModel folder (or a pipeline folder with unet/, or the weights file
      next to its config.json), or a CompVis ``.ckpt`` / torch / safetensors file.
    config: the architecture. Required for a CompVis file (e.g. `ldm_unet.LDM4`, `LDM8`); for a
      diffusers folder it is read from config.json, and a given one must equal it.
    layout, use_ema: see `convert_state_dict`.
  Raises:
    FileNotFoundError: nothing at `source`, or a folder without weights.
    ValueError: an unreadable file, a config that does not fit, a conversion mismatch.
  """
  weights, diffusers_config = cfs.resolve_source(source, ("unet",))
  if diffusers_config is not None:
    found = config_from_diffusers(diffusers_config)
    if config is not None and config != found:
      raise ValueError(
          f"{weights.parent}: its config.json describes {found}, not the given {config}"
      )
    config, layout = found, layout or "diffusers"
  elif config is None:
    raise ValueError(
        f"{weights}: a CompVis checkpoint does not hold the architecture; pass "
        "config=ldm_unet.LDM4, LDM8 or an LDMUNetConfig"
    )
  state_dict = cfs._read_state_dict(weights)
  try:
    params = convert_state_dict(state_dict, config, layout=layout, use_ema=use_ema)
  except ValueError as e:
    raise ValueError(f"{weights}: {e}") from None
  return config, params


FIRST_STAGE_FOLDER = "first_stage"
"""Where `convert_checkpoint` writes the first stage, inside the teacher folder."""


def convert_checkpoint(
    source,
    out_dir,
    desc: Mapping[str, Any],
    unet: ldm_unet.LDMUNetConfig,
    first_stage: ae.FirstStageConfig | None,
    *,
    use_ema: bool = True,
    scale_factor: float | None = None,
) -> epath.Path:
  """An LDM checkpoint (CompVis .ckpt, or a diffusers pipeline folder with unet/ and vqvae/ or
  vae/) to a teacher folder `out_dir` (`convert_ddpm.export_atomically` of the U-Net's params,
  described by `desc`) holding the first stage in FIRST_STAGE_FOLDER
  (`convert_first_stage.write_converted`). Both convert before anything is written.

  unet, first_stage: the architectures (a diffusers config.json must agree with them).
  """
  out = epath.Path(out_dir)
  ckpt_lib.check_export_target(out)
  _, params = load_ldm_unet(source, unet, use_ema=use_ema)
  fs_config, fs_params = cfs.load_first_stage(source, first_stage, scale_factor=scale_factor)
  convert_ddpm.export_atomically(out, params, desc)
  cfs.write_converted(out / FIRST_STAGE_FOLDER, fs_config, fs_params)
  return out
