"""Convert PyTorch first-stage autoencoders (VQ-f4, KL-f8) into `models.autoencoders` parameters.

Two layouts are read, without torch (`io.torch_files`):

* ``"compvis"``: the ``first_stage_model.*`` keys of a CompVis latent-diffusion Lightning
  ``.ckpt`` (or a bare first-stage checkpoint, keys ``encoder.*``): ``encoder.down.{i}.block.{j}``,
  ``encoder.down.{i}.downsample.conv``, ``{encoder,decoder}.mid.{block_1,attn_1,block_2}``,
  ``decoder.up.{i}.block.{j}``, ``decoder.up.{i}.upsample.conv``, ``norm_out``, ``quant_conv``,
  ``post_quant_conv``, ``quantize.embedding.weight``; attention q/k/v/proj_out are 1x1 convs.
* ``"diffusers"``: a ``VQModel`` / ``AutoencoderKL`` folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors`` or ``.bin``), or a pipeline folder holding one as
  ``vqvae/`` or ``vae/``: ``down_blocks.{i}.resnets.{j}``, ``downsamplers.0.conv``,
  ``mid_block.{resnets,attentions}``, ``up_blocks`` deepest level first, ``conv_norm_out``,
  ``conv_shortcut``, attention ``group_norm`` with ``to_q/to_k/to_v/to_out.0`` Linears (or the
  older ``query/key/value/proj_attn``).

All or nothing: every tensor of the selected model must be used and every parameter filled with
its shape, else one ValueError (one line) lists the shape mismatches, the missing targets and the
unused source tensors. Keys under ``loss.`` (LPIPS, discriminator and logvar of a first stage's
own training checkpoint) are not part of the model and are skipped.

The latent scale: a diffusers AutoencoderKL's ``scaling_factor``; 1.0 for a diffusers VQModel
(the LDM-4 models were trained on unscaled VQ latents; a VQModel config.json without the field
gets diffusers' default 0.18215, which breaks CompVis/ldm-celebahq-256 in diffusers' LDMPipeline,
diffusers issue 6725); for a CompVis checkpoint its ``scale_factor`` buffer when it has one
(``scale_by_std``), else the given config's. An explicit ``scale_factor`` overrides all of these.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import flax
import numpy as np
from etils import epath

from bidm_jax.export import param_shapes
from bidm_jax.io import files
from bidm_jax.io.torch_files import load_torch_state_dict
from bidm_jax.models import autoencoders as ae

LAYOUTS = ("compvis", "diffusers")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PIPELINE_FOLDERS = ("vqvae", "vae")
CONVERTED_CONFIG = "first_stage.json"
CONVERTED_PARAMS = "first_stage.npz"
"""A converted first stage on disk: its FirstStageConfig fields (JSON) and its Flax params
(npz, one array per parameter, keys the '/'-joined paths)."""
_MAX_LISTED = 25

__all__ = [
    "LAYOUTS",
    "convert_state_dict",
    "config_from_diffusers",
    "load_first_stage",
    "check_config",
    "map_tensors",
    "resolve_source",
    "target_shapes",
    "write_converted",
    "read_converted",
]


# ---------------------------------------------------------------------------------------------
# Targets and their source names.


def target_shapes(config: ae.FirstStageConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{parameter path: shape} of the model of `config` (jax.eval_shape: nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, config.factor, config.factor, config.in_channels), jnp.float32)
  return param_shapes(ae.make_first_stage(config), x)


# Our module name -> (CompVis name, diffusers names in order of preference).
_FIXED_NAMES = {
    "norm_out": ("norm_out", ("conv_norm_out",)),
    "nin_shortcut": ("nin_shortcut", ("conv_shortcut",)),
    "norm": ("norm", ("group_norm",)),
    "q": ("q", ("to_q", "query")),
    "k": ("k", ("to_k", "key")),
    "v": ("v", ("to_v", "value")),
    "proj_out": ("proj_out", ("to_out.0", "proj_attn")),
}


def _component_names(part: str, layout: str, levels: int) -> tuple[str, ...]:
  """Source name alternatives of one component of our parameter path."""
  compvis = layout == "compvis"
  if part in _FIXED_NAMES:
    name, alternatives = _FIXED_NAMES[part]
    return (name,) if compvis else alternatives
  if m := re.fullmatch(r"(down|up)_(\d+)_(block_(\d+)|downsample|upsample)", part):
    side, i, what, j = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if compvis:
      return (f"{side}.{i}.block.{j}" if j is not None else f"{side}.{i}.{what}.conv",)
    level = i if side == "down" else levels - 1 - i  # diffusers' up_blocks run deepest first
    inner = f"resnets.{j}" if j is not None else f"{what}rs.0.conv"
    return (f"{side}_blocks.{level}.{inner}",)
  if m := re.fullmatch(r"mid_(block|attn)_(\d+)", part):
    kind, n = m.group(1), int(m.group(2))
    if compvis:
      return (f"mid.{kind}_{n}",)
    return (f"mid_block.resnets.{n - 1}" if kind == "block" else f"mid_block.attentions.{n - 1}",)
  return (part,)


def source_keys(path: tuple[str, ...], layout: str, levels: int) -> list[str]:
  """The state-dict keys that may hold our parameter `path`, in order of preference."""
  *modules, leaf = path
  suffix = "bias" if leaf == "bias" else "weight"
  alternatives = [_component_names(p, layout, levels) for p in modules]
  if leaf == "embedding":
    alternatives.append(("embedding",))
  return [".".join(names + (suffix,)) for names in itertools.product(*alternatives)]


def _to_flax(arr: np.ndarray, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray | None:
  """A PyTorch tensor in the layout of our parameter, or None when no rule fits."""
  if path[-1] == "embedding" or arr.ndim == len(shape) == 1:
    return arr
  if arr.ndim == len(shape) == 4:  # Conv2d OIHW -> HWIO
    return arr.transpose(2, 3, 1, 0)
  if len(shape) == 2 and arr.ndim == 4 and arr.shape[2:] == (1, 1):  # 1x1 Conv2d -> Dense
    return arr[:, :, 0, 0].T
  if len(shape) == 2 and arr.ndim == 2:  # Linear (out, in) -> Dense (in, out)
    return arr.T
  return None


# ---------------------------------------------------------------------------------------------
# The model inside a state dict.


def _find_prefix(keys) -> str:
  """The prefix of the first stage: where both encoder.conv_in and decoder.conv_in lie."""
  keys = set(keys)
  marker = "encoder.conv_in.weight"
  found = sorted(
      k[: -len(marker)]
      for k in keys
      if k.endswith(marker)
      and (k == marker or k[-len(marker) - 1] == ".")
      and k[: -len(marker)] + "decoder.conv_in.weight" in keys
  )
  first_stage = [p for p in found if p.endswith("first_stage_model.")]
  if len(found) == 1:
    return found[0]
  if len(first_stage) == 1:
    return first_stage[0]
  if not found:
    raise ValueError(
        "no first-stage autoencoder in this checkpoint: no prefix holds both "
        "'encoder.conv_in.weight' and 'decoder.conv_in.weight'"
    )
  raise ValueError(
      f"the checkpoint holds several autoencoders (prefixes {found}); choose one with prefix=..."
  )


def _with_dot(prefix: str) -> str:
  return prefix + "." if prefix and not prefix.endswith(".") else prefix


def detect_layout(keys) -> str:
  """'compvis' or 'diffusers' from the key names of one model (prefix removed)."""
  if any(k.startswith(("encoder.down.", "encoder.mid.")) for k in keys):
    return "compvis"
  if any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.")) for k in keys):
    return "diffusers"
  raise ValueError(
      "cannot tell the layout: neither CompVis keys (encoder.down.0, encoder.mid) "
      "nor diffusers keys (encoder.down_blocks.0, encoder.mid_block) are present"
  )


def _listing(title: str, items: list[str]) -> str:
  more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"{title} ({len(items)}): " + ", ".join(items[:_MAX_LISTED]) + more


def map_tensors(
    sources: Mapping[str, np.ndarray],
    targets: Mapping[tuple[str, ...], tuple],
    candidates: Callable[[tuple[str, ...]], list[str]],
    transform: Callable[[np.ndarray, tuple[str, ...], tuple], np.ndarray | None],
    selected: set[str],
    what: str,
    label: Callable[[str], str] = str,
) -> dict:
  """Fills every target parameter from its first present candidate key, all or nothing.

  sources: {key: array}; targets: {parameter path: shape}; candidates(path): the source keys of
  a parameter in order of preference; transform(array, path, shape): the array in our layout,
  or None; selected: the source keys that must all be used; what: the model, for the error;
  label(key): how an unused key is shown.
  Returns nested dicts of float32 numpy arrays. Raises ValueError (one line) listing the shape
  mismatches, the missing targets and the unused source tensors.
  """
  params: dict = {}
  used, missing, mismatched = set(), [], []
  for path, shape in sorted(targets.items()):
    keys = candidates(path)
    key = next((c for c in keys if c in sources), None)
    if key is None:
      missing.append(f"{'/'.join(path)} {shape} <- {' or '.join(keys) or '(no mapping)'}")
      continue
    used.add(key)
    arr = np.asarray(sources[key])
    value = transform(arr, path, shape) if "float" in arr.dtype.name else None
    if value is None or value.shape != shape:
      mismatched.append(f"{'/'.join(path)} expects {shape} <- {key} {tuple(arr.shape)} {arr.dtype}")
      continue
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
  unused = [f"{label(k)} {tuple(np.shape(sources[k]))}" for k in sorted(selected - used)]
  if missing or mismatched or unused:
    problems = [
        _listing(title, items)
        for title, items in (
            ("shape mismatches", mismatched),
            ("missing targets", missing),
            ("unused source tensors", unused),
        )
        if items
    ]
    raise ValueError(f"cannot convert {what}: " + "; ".join(problems))
  return params


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: ae.FirstStageConfig,
    *,
    layout: str | None = None,
    prefix: str | None = None,
) -> dict:
  """The ``params`` of `ae.make_first_stage(config)` from a PyTorch state dict.

  Args:
    state_dict: ``{name: array}`` as `load_torch_state_dict` returns it: a bare model (diffusers
      or CompVis names) or a checkpoint holding one (``state_dict.first_stage_model.*``).
    config: the architecture; its `kind` decides whether a codebook is expected.
    layout: 'compvis', 'diffusers', or None to detect it from the key names.
    prefix: the key prefix of the model, instead of finding it.
  Returns:
    Nested dicts of float32 numpy arrays, applied as ``model.apply({'params': params}, ...)``.
  Raises:
    ValueError: no model found, an unknown layout, or any mismatch (one line listing them all).
  """
  prefix = _find_prefix(state_dict) if prefix is None else _with_dot(prefix)
  sub = {
      k[len(prefix) :]: v
      for k, v in state_dict.items()
      if k.startswith(prefix) and not k[len(prefix) :].startswith("loss.")
  }
  if layout is None:
    layout = detect_layout(sub)
  elif layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")

  targets = target_shapes(config)
  params = map_tensors(
      sub,
      targets,
      lambda path: source_keys(path, layout, len(config.ch_mult)),
      _to_flax,
      set(sub),
      f"the {layout}-layout first stage"
      + (f" under {prefix!r}" if prefix else "")
      + f" into {config}",
      label=lambda key: prefix + key,
  )
  logging.info(
      "converted %d tensors of a %s-layout %s first stage", len(targets), layout, config.kind
  )
  return params


# ---------------------------------------------------------------------------------------------
# diffusers config.json and files.


_DIFFUSERS_CLASSES = {"VQModel": "vq", "AutoencoderKL": "kl"}
# Fields whose other values describe a model that ours is not (absent fields are not checked).
_DIFFUSERS_REQUIRED = {
    "act_fn": ("silu", "swish"),
    "norm_type": ("group",),
    "mid_block_add_attention": (True,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}


def check_config(
    config: Mapping[str, Any],
    required: Mapping[str, tuple],
    widths: list[int],
    problems: list[str],
    what: str,
) -> None:
  """Raises one ValueError naming `problems`, every field of a diffusers `config` whose value is
  not among its `required` ones (absent fields are not checked) and block_out_channels `widths`
  that are not multiples of the first; `what` names the model kind in the message."""
  problems = list(problems) + [
      f"{field}: {config[field]!r}, expected {' or '.join(map(repr, allowed))}"
      for field, allowed in required.items()
      if field in config and config[field] not in allowed
  ]
  if any(w % widths[0] for w in widths):
    problems.append(f"block_out_channels {widths} are not multiples of the first")
  if problems:
    raise ValueError(
        f"the diffusers config.json does not describe {what} we build: " + "; ".join(problems)
    )


def config_from_diffusers(
    config: Mapping[str, Any], scale_factor: float | None = None
) -> ae.FirstStageConfig:
  """Our architecture from a diffusers VQModel / AutoencoderKL ``config.json`` (parsed).

  Raises ValueError naming every field that describes something we do not build: attention or
  other block types at the encoder/decoder levels, spatial norms, no quant convs, a shift.
  """
  problems = []
  kind = _DIFFUSERS_CLASSES.get(config.get("_class_name"))
  if kind is None:
    problems.append(
        f"_class_name {config.get('_class_name')!r} is not one of {sorted(_DIFFUSERS_CLASSES)}"
    )
  widths = [int(w) for w in config.get("block_out_channels", (64,))]
  for field, block in (
      ("down_block_types", "DownEncoderBlock2D"),
      ("up_block_types", "UpDecoderBlock2D"),
  ):
    types = list(config.get(field, (block,)))
    if types != [block] * len(widths):
      problems.append(f"{field}: {types}, expected {len(widths)} x {block!r}")
  check_config(config, _DIFFUSERS_REQUIRED, widths, problems, "a model")
  latent = int(config.get("latent_channels", 3 if kind == "vq" else 4))
  if scale_factor is None:
    scale_factor = 1.0 if kind == "vq" else float(config.get("scaling_factor", 0.18215))
  return ae.FirstStageConfig(
      kind=kind,
      in_channels=int(config.get("in_channels", 3)),
      out_channels=int(config.get("out_channels", 3)),
      ch=widths[0],
      ch_mult=tuple(w // widths[0] for w in widths),
      num_res_blocks=int(config.get("layers_per_block", 1)),
      z_channels=latent,
      embed_dim=int(config.get("vq_embed_dim") or latent) if kind == "vq" else latent,
      n_embed=int(config.get("num_vq_embeddings", 256)) if kind == "vq" else 0,
      norm_groups=int(config.get("norm_num_groups", 32)),
      scale_factor=float(scale_factor),
  )


def _diffusers_folder(path: epath.Path, subfolders: tuple[str, ...]) -> epath.Path | None:
  """The folder holding the weights: `path` itself or one of its `subfolders`."""
  for folder in (path, *(path / name for name in subfolders)):
    if folder.is_dir() and any((folder / w).exists() for w in WEIGHT_FILES):
      return folder
  return None


def resolve_source(
    source, subfolders: tuple[str, ...] = PIPELINE_FOLDERS
) -> tuple[epath.Path, dict | None]:
  """The weights file of `source` and, for a diffusers model, its parsed config.json.

  source: a diffusers folder, a pipeline folder holding it in one of `subfolders`, the weights
  file next to its config.json (config: the parsed JSON), or any other checkpoint file (None).
  Raises FileNotFoundError (nothing there, a folder without weights) or ValueError (bad JSON).
  """
  path = epath.Path(source)
  if not path.exists():
    raise FileNotFoundError(f"no such checkpoint: {path}")
  if path.is_file() and path.name in WEIGHT_FILES and (path.parent / "config.json").exists():
    path = path.parent
  if not path.is_dir():
    return path, None
  folder = _diffusers_folder(path, subfolders)
  if folder is None or not (folder / "config.json").exists():
    raise FileNotFoundError(
        f"{path}: no config.json with one of {list(WEIGHT_FILES)} here or "
        f"in {'/, '.join(subfolders)}/"
    )
  try:
    config = json.loads((folder / "config.json").read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
  return next(folder / w for w in WEIGHT_FILES if (folder / w).exists()), config


def _read_state_dict(path) -> dict[str, np.ndarray]:
  try:
    return load_torch_state_dict(path)
  except ValueError as e:
    raise ValueError(f"cannot read the checkpoint: {e}") from None


def load_first_stage(
    source,
    config: ae.FirstStageConfig | None = None,
    *,
    layout: str | None = None,
    prefix: str | None = None,
    scale_factor: float | None = None,
) -> tuple[ae.FirstStageConfig, dict]:
  """Reads and converts a first stage: returns (its config, its params).

  Args:
    source: a folder `write_converted` wrote, a diffusers folder (or a pipeline folder with
      vqvae/ or vae/, or the weights file next to its config.json), or a CompVis ``.ckpt`` /
      torch / safetensors file.
    config: the architecture. Required for a CompVis file (e.g. `ae.VQ_F4`, `ae.KL_F8`); for a
      diffusers folder it is read from config.json, and a given one must agree with it.
    layout, prefix: see `convert_state_dict`.
    scale_factor: overrides the latent scale (module docstring says where it comes from).
  Raises:
    FileNotFoundError: nothing at `source`, or a folder without weights.
    ValueError: an unreadable file, a config that does not fit, a conversion mismatch.
  """
  if (epath.Path(source) / CONVERTED_CONFIG).exists():
    return read_converted(source, scale_factor)
  weights, diffusers_config = resolve_source(source)
  if diffusers_config is not None:
    found = config_from_diffusers(diffusers_config, scale_factor)
    if config is not None and dataclasses.replace(config, scale_factor=found.scale_factor) != found:
      raise ValueError(
          f"{weights.parent}: its config.json describes {found}, not the given {config}"
      )
    config = found
    state_dict = _read_state_dict(weights)
  else:
    if config is None:
      raise ValueError(
          f"{weights}: a CompVis checkpoint does not hold the architecture; pass "
          "config=autoencoders.VQ_F4, KL_F8 or a FirstStageConfig"
      )
    state_dict = _read_state_dict(weights)
    root = (_with_dot(prefix) if prefix is not None else _find_prefix(state_dict)).removesuffix(
        "first_stage_model."
    )
    stored = state_dict.get(root + "scale_factor")
    if scale_factor is None and stored is not None and np.size(stored) == 1:
      scale_factor = float(np.asarray(stored, np.float64).reshape(()))
    if scale_factor is not None:
      config = dataclasses.replace(config, scale_factor=float(scale_factor))
  try:
    params = convert_state_dict(state_dict, config, layout=layout, prefix=prefix)
  except ValueError as e:
    raise ValueError(f"{weights}: {e}") from None
  return config, params


def write_converted(folder, config: ae.FirstStageConfig, params) -> None:
  """Writes a first stage as `folder`/CONVERTED_CONFIG and CONVERTED_PARAMS."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  files.makedirs(folder)
  files.write_json(os.path.join(folder, CONVERTED_CONFIG), dataclasses.asdict(config))
  files.write_npz(
      os.path.join(folder, CONVERTED_PARAMS), **{k: np.asarray(v) for k, v in flat.items()}
  )


def read_converted(folder, scale_factor: float | None = None) -> tuple[ae.FirstStageConfig, dict]:
  """(config, params) of a `write_converted` folder, checked against the config's shapes."""
  path = epath.Path(folder)
  try:
    config = ae.FirstStageConfig(**json.loads((path / CONVERTED_CONFIG).read_text()))
    with np.load(io.BytesIO((path / CONVERTED_PARAMS).read_bytes())) as f:
      flat = {tuple(k.split("/")): f[k] for k in f.files}
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"{folder}: not a readable converted first stage ({e})") from None
  found = {k: tuple(v.shape) for k, v in flat.items()}
  if found != target_shapes(config):
    raise ValueError(f"{folder}: its {CONVERTED_PARAMS} does not fit its {CONVERTED_CONFIG}")
  if scale_factor is not None:
    config = dataclasses.replace(config, scale_factor=float(scale_factor))
  return config, flax.traverse_util.unflatten_dict(flat)
