"""Convert public PyTorch DDPM checkpoints into the parameters of our full-precision U-Net.

Two source layouts are understood (auto-detected, or named by `layout`):

* ``"ddim"``: the `Model` of the ddim / pytorch_diffusion repositories (``temb.dense.0``,
  ``down.{i}.block.{j}``, ``down.{i}.attn.{j}``, ``mid.block_1``, ``up.{i}.upsample.conv``,
  ...). Accepted as a bare state dict (``model-790000.ckpt`` of pytorch_diffusion's
  ``ema_diffusion_cifar10_model``), with a DataParallel ``module.`` prefix, or as the ddim
  repo's training checkpoint ``ckpt.pth`` = ``[model, optimizer, epoch, step, ema]`` (the EMA
  weights, the last entry, are taken unless ``use_ema=False``).
* ``"diffusers"``: ``diffusers.UNet2DModel`` as published for ``google/ddpm-cifar10-32``
  (``time_embedding.linear_1``, ``down_blocks.{i}.resnets.{j}``, attentions with
  ``to_q/to_k/to_v/to_out.0`` or the older ``query/key/value/proj_attn`` names, ``up_blocks``
  in reverse level order, ``conv_norm_out``). The Linear attention projections become our 1x1
  convolutions.

PyTorch NCHW / OIHW tensors become NHWC / HWIO kernels, Linear ``(out, in)`` weights become
``(in, out)``. The conversion is all or nothing: every tensor of the selected model state dict
must be used and every parameter of our FP U-Net (`jax.eval_shape` of its init with the given
architecture) filled with the right shape; otherwise a ValueError lists the unused source keys,
the missing targets and the shape mismatches, and nothing is written.

Only the weights are in a checkpoint; the architectural details that weights do not show are
those of our U-Net: the DDPM sinusoidal embedding (sin then cos, frequencies
``10000^(-k/(half-1))``), single-head attention scaled by ``C^-1/2``, GroupNorm(32, eps 1e-6),
SiLU, a (0, 1, 0, 1)-padded stride-2 downsample conv and nearest upsampling followed by a conv.
A diffusers ``config.json`` next to the weights is checked against exactly these
(``flip_sin_to_cos=False``, ``freq_shift=1``, ``downsample_padding=0``, one attention head, ...),
which is what ``google/ddpm-cifar10-32`` declares.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from bidm_jax import builders
from bidm_jax.export import param_shapes
from bidm_jax.io import files
from bidm_jax.io.torch_files import load_torch_state_dict
from bidm_jax.models.unet import UNet
from bidm_jax.training import checkpoint as ckpt_lib

_LAYOUT_ALIASES = {"ddim": "ddim", "pytorch_diffusion": "ddim", "diffusers": "diffusers"}
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_MAX_LISTED = 25
_LOW_PRECISION_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e5m2")

__all__ = [
    "convert_state_dict",
    "convert_checkpoint",
    "model_description",
    "detect_layout",
    "check_diffusers_config",
]


# ---------------------------------------------------------------------------------------------
# Architecture and target parameters.


def model_description(model_kwargs: Mapping[str, Any] | None = None) -> dict:
  """The six FP U-Net constructor fields (`builders.ARCHITECTURE`), defaults filled in,
  sequences as lists (`builders.describe_unet`).

  This dict is what `export_params` stores as the model description (`model.json`) and what
  training compares with `builders.model_description(config)`.
  """
  model_kwargs = dict(model_kwargs or {})
  unknown = sorted(set(model_kwargs) - set(builders.ARCHITECTURE))
  if unknown:
    raise ValueError(
        f"model_kwargs: unknown field(s) {unknown}; the converted FP U-Net is "
        f"described by {list(builders.ARCHITECTURE)}"
    )
  return builders.describe_unet(UNet(**model_kwargs))


def _target_shapes(desc: Mapping[str, Any], image_size: int, in_channels: int) -> dict:
  """{(module, [sub,] leaf): shape} of the FP U-Net's parameters, from jax.eval_shape (no FLOPs)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return param_shapes(builders.unet_from_description(desc), x, t)


# ---------------------------------------------------------------------------------------------
# Source key names of each target module.

# Our res-block / attention sub-module -> (ddim name, diffusers names in order of preference).
_RES_FIELDS = {
    "norm1": ("norm1", ("norm1",)),
    "conv1": ("conv1", ("conv1",)),
    "temb_proj": ("temb_proj", ("time_emb_proj",)),
    "norm2": ("norm2", ("norm2",)),
    "conv2": ("conv2", ("conv2",)),
    "nin_shortcut": ("nin_shortcut", ("conv_shortcut",)),
}
_ATTN_FIELDS = {
    "norm": ("norm", ("group_norm",)),
    "q": ("q", ("to_q", "query")),
    "k": ("k", ("to_k", "key")),
    "v": ("v", ("to_v", "value")),
    "proj_out": ("proj_out", ("to_out.0", "proj_attn")),
}


def _source_modules(module: str, sub: str | None, layout: str, levels: int) -> tuple[str, ...]:
  """Candidate source module names (without .weight/.bias) for our module[/sub]."""
  ddim = layout == "ddim"
  fixed = {
      "conv_in": ("conv_in", "conv_in"),
      "norm_out": ("norm_out", "conv_norm_out"),
      "conv_out": ("conv_out", "conv_out"),
      "temb_dense0": ("temb.dense.0", "time_embedding.linear_1"),
      "temb_dense1": ("temb.dense.1", "time_embedding.linear_2"),
  }
  if module in fixed:
    return (fixed[module][0 if ddim else 1],)
  m = re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", module)
  mid = re.fullmatch(r"mid_(block|attn)_(\d+)", module)
  sample = re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", module)
  if m:
    side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    if ddim:
      base = f"{side}.{i}.{kind}.{j}"
    else:
      k = i if side == "down" else levels - 1 - i  # diffusers up_blocks run deepest first
      base = f"{side}_blocks.{k}.{'resnets' if kind == 'block' else 'attentions'}.{j}"
  elif mid:
    kind, n = mid.group(1), int(mid.group(2))
    if ddim:
      base = f"mid.{kind}_{n}"
    else:  # block_1 = resnets.0, attn_1 = attentions.0, block_2 = resnets.1
      base = f"mid_block.{'resnets' if kind == 'block' else 'attentions'}.{n - 1}"
  elif sample:
    side, i, what = sample.group(1), int(sample.group(2)), sample.group(3)
    if ddim:
      return (f"{side}.{i}.{what}.conv",)
    k = i if side == "down" else levels - 1 - i
    return (f"{side}_blocks.{k}.{what}rs.0.conv",)
  else:
    return ()
  if sub is None:
    return (base,)
  fields = _RES_FIELDS if ("block" in module) else _ATTN_FIELDS
  if sub not in fields:
    return ()
  ddim_name, diffusers_names = fields[sub]
  return (f"{base}.{ddim_name}",) if ddim else tuple(f"{base}.{n}" for n in diffusers_names)


def _split_module(path: tuple[str, ...]) -> tuple[str, str | None, str]:
  """('down_0_block_0', 'conv1', 'kernel') style flat paths -> (module, sub, leaf)."""
  if len(path) == 3:
    return path[0], path[1], path[2]
  if len(path) == 2:
    return path[0], None, path[1]
  return "/".join(path[:-1]), None, path[-1]


# ---------------------------------------------------------------------------------------------
# Finding the model inside a checkpoint.


_ROOT_MARKERS = ("temb.dense.0.weight", "time_embedding.linear_1.weight")


def _candidate_prefixes(keys) -> list[str]:
  """Prefixes P under which a U-Net lies: P + 'conv_in.weight' and P + the first time
  embedding layer (ddim or diffusers name) are keys."""
  keys = set(keys)
  out = set()
  for k in keys:
    if k == "conv_in.weight" or k.endswith(".conv_in.weight"):
      p = k[: -len("conv_in.weight")]
      if any(p + m in keys for m in _ROOT_MARKERS):
        out.add(p)
  return sorted(out)


def _choose_prefix(prefixes: list[str], use_ema: bool) -> str:
  if len(prefixes) == 1:
    return prefixes[0]
  ema = [p for p in prefixes if "ema" in p.lower()]
  if ema and use_ema:
    return ema[0] if len(ema) == 1 else _ambiguous(prefixes)
  if ema and not use_ema:
    rest = [p for p in prefixes if p not in ema]
    return rest[0] if len(rest) == 1 else _ambiguous(prefixes)
  tops = [p.split(".", 1)[0] for p in prefixes]
  if all(t.isdigit() for t in tops) and len(set(tops)) == len(tops):
    # A list checkpoint such as the ddim repo's [model, optimizer, epoch, step, ema].
    order = sorted(prefixes, key=lambda p: int(p.split(".", 1)[0]))
    return order[-1] if use_ema else order[0]
  return _ambiguous(prefixes)


def _ambiguous(prefixes):
  raise ValueError(
      f"the checkpoint holds several U-Nets (under the prefixes {prefixes}); "
      "choose one with prefix=..."
  )


def _select_model(
    state_dict: Mapping[str, np.ndarray], prefix: str | None, use_ema: bool
) -> tuple[dict[str, np.ndarray], str]:
  """The sub-dict of one U-Net, keys relative to it, and the prefix it was found under."""
  keys = list(state_dict)
  prefixes = _candidate_prefixes(keys)
  if prefix is None:
    if not prefixes:
      shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
      raise ValueError(
          "no DDPM U-Net in this checkpoint: no prefix holds both 'conv_in.weight' and "
          "'temb.dense.0.weight' or 'time_embedding.linear_1.weight' "
          f"({len(keys)} tensors: {shown or 'none'}); expected the ddim/pytorch_diffusion "
          "layout (temb.dense.0, down.0.block.0, ...) or diffusers UNet2DModel "
          "(time_embedding.linear_1, down_blocks.0.resnets.0, ...)"
      )
    prefix = _choose_prefix(prefixes, use_ema)
  elif prefix and not prefix.endswith("."):
    prefix += "."
  # Keys under a longer candidate prefix belong to another U-Net (e.g. '' vs 'ema.').
  others = [p for p in prefixes if p != prefix and p.startswith(prefix)]
  sub = {
      k[len(prefix) :]: v
      for k, v in state_dict.items()
      if k.startswith(prefix) and not any(k.startswith(o) for o in others)
  }
  if not sub:
    raise ValueError(f"no tensors under the prefix {prefix!r}")
  return sub, prefix


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """'ddim' or 'diffusers' from the key names of one U-Net's state dict (prefix removed)."""
  keys = set(state_dict)
  if any(k.startswith(("temb.dense.", "down.0.block.", "mid.block_1.")) for k in keys):
    return "ddim"
  if any(k.startswith(("time_embedding.", "down_blocks.", "mid_block.")) for k in keys):
    return "diffusers"
  raise ValueError(
      "cannot tell the checkpoint layout: neither ddim keys (temb.dense.0, "
      "down.0.block.0, mid.block_1) nor diffusers keys (time_embedding.linear_1, "
      "down_blocks.0, mid_block) are present"
  )


# ---------------------------------------------------------------------------------------------
# The conversion.


def _to_target(arr: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray | None:
  """PyTorch tensor -> our layout for a target of `target_shape`; None if no rule applies."""
  if arr.ndim == 4 and len(target_shape) == 4:  # Conv2d OIHW -> HWIO
    return np.transpose(arr, (2, 3, 1, 0))
  if arr.ndim == 2 and len(target_shape) == 4:  # Linear (out, in) -> 1x1 conv HWIO
    return np.transpose(arr)[None, None]
  if arr.ndim == 2 and len(target_shape) == 2:  # Linear (out, in) -> Dense (in, out)
    return np.transpose(arr)
  if arr.ndim == 1 and len(target_shape) == 1:
    return arr
  return None


def _fmt_list(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    layout: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    image_size: int = 32,
    in_channels: int | None = None,
    use_ema: bool = True,
    prefix: str | None = None,
) -> dict:
  """Converts a PyTorch DDPM state dict into the params of our FP U-Net.

  Args:
    state_dict: ``{name: array}`` as `load_torch_state_dict` returns it: a bare model state
      dict, or a container holding one (``module.`` prefix, ``[model, optimizer, ..., ema]``).
    layout: 'ddim' (alias 'pytorch_diffusion'), 'diffusers', or None to detect it.
    model_kwargs: the U-Net fields of `builders.ARCHITECTURE` (missing ones take the UNet
      defaults, the DDPM CIFAR-10 model).
    image_size: input side; decides at which levels `attn_resolutions` puts attention.
    in_channels: input channels (default out_ch).
    use_ema: when the checkpoint holds both raw and EMA weights, take the EMA ones.
    prefix: the key prefix of the U-Net to take, instead of finding it.
  Returns:
    The ``params`` collection (nested dicts of float32 numpy arrays), to be applied as
    ``UNet(...).apply({'params': params}, x, t)``.
  Raises:
    ValueError: no U-Net in the checkpoint, an unknown layout, or any mismatch; the message
      lists every unused source tensor, missing target and shape mismatch.

  "Every source tensor used" is checked within the selected U-Net: the other entries of a
  training checkpoint (optimizer state, the non-EMA copy) are not part of it and are ignored.
  """
  desc = model_description(model_kwargs)
  sub, found_prefix = _select_model(state_dict, prefix, use_ema)
  if layout is None:
    layout = detect_layout(sub)
  elif layout not in _LAYOUT_ALIASES:
    raise ValueError(f"layout {layout!r} is not one of {sorted(_LAYOUT_ALIASES)}")
  layout = _LAYOUT_ALIASES[layout]
  targets = _target_shapes(desc, image_size, in_channels or desc["out_ch"])
  levels = len(desc["ch_mult"])

  params: dict[str, dict] = {}
  used: set[str] = set()
  missing, mismatched, bad = [], [], []
  for path, shape in sorted(targets.items()):
    module, sub_name, leaf = _split_module(path)
    names = (
        _source_modules(module, sub_name, layout, levels)
        if len(path) in (2, 3) and leaf in ("kernel", "bias", "scale")
        else ()
    )
    suffix = "bias" if leaf == "bias" else "weight"
    cands = [f"{n}.{suffix}" for n in names]
    key = next((c for c in cands if c in sub), None)
    target_name = "/".join(path)
    if key is None:
      missing.append(f"{target_name} {shape} <- {' or '.join(cands) or '(no mapping)'}")
      continue
    used.add(key)
    arr = np.asarray(sub[key])
    if arr.dtype.kind != "f" and arr.dtype.name not in _LOW_PRECISION_FLOATS:
      bad.append(f"{key}: dtype {arr.dtype} is not floating point")
      continue
    value = _to_target(arr, shape)
    if value is None or value.shape != shape:
      mismatched.append(f"{target_name} expects {shape} <- {key} {tuple(arr.shape)}")
      continue
    value = np.ascontiguousarray(value, dtype=np.float32)
    if not np.all(np.isfinite(value)):
      bad.append(f"{key}: holds NaN or Inf")
      continue
    node = params.setdefault(module, {})
    if sub_name is not None:
      node = node.setdefault(sub_name, {})
    node[leaf] = value
  unused = sorted(set(sub) - used)

  if missing or mismatched or unused or bad:
    parts = [
        f"cannot convert the {layout}-layout checkpoint"
        + (f" (U-Net under prefix {found_prefix!r})" if found_prefix else "")
        + f" into the U-Net {desc} at image_size={image_size}:"
    ]
    if mismatched:
      parts.append(_fmt_list("shape mismatches", mismatched))
    if missing:
      parts.append(_fmt_list("targets missing from the checkpoint", missing))
    if unused:
      parts.append(
          _fmt_list(
              "unused source tensors",
              [f"{found_prefix}{k} {tuple(np.shape(sub[k]))}" for k in unused],
          )
      )
    if bad:
      parts.append(_fmt_list("unusable tensors", bad))
    raise ValueError("\n".join(parts))
  logging.info(
      "converted %d tensors of a %s-layout DDPM U-Net%s",
      len(used),
      layout,
      f" (prefix {found_prefix!r})" if found_prefix else "",
  )
  return params


# ---------------------------------------------------------------------------------------------
# diffusers config.json: the details that the weights do not show.


def _expected_diffusers_config(desc: Mapping[str, Any], image_size: int) -> dict[str, Any]:
  attn = _attn_levels(desc, image_size)
  return {
      "block_out_channels": [desc["ch"] * m for m in desc["ch_mult"]],
      "layers_per_block": desc["num_res_blocks"],
      "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      "out_channels": desc["out_ch"],
      "act_fn": ("silu", "swish"),
      "time_embedding_type": "positional",
      "flip_sin_to_cos": False,  # sin first, as our timestep_embedding
      "freq_shift": 1,  # frequencies 10000^(-k / (half - 1))
      "downsample_padding": 0,  # (0, 1, 0, 1) padding before the stride-2 conv
      "downsample_type": "conv",
      "upsample_type": "conv",
      "norm_num_groups": 32,
      "norm_eps": 1e-6,
      "center_input_sample": False,
      "mid_block_scale_factor": 1,
      "resnet_time_scale_shift": "default",
      "add_attention": True,
      "class_embed_type": None,
      "num_class_embeds": None,
      "attn_norm_num_groups": (None, 32),
      "time_embedding_dim": (None, 4 * desc["ch"]),
      "time_embedding_act_fn": None,
  }


def check_diffusers_config(
    config: Mapping[str, Any],
    model_kwargs: Mapping[str, Any] | None,
    *,
    image_size: int = 32,
    in_channels: int | None = None,
) -> None:
  """Raises ValueError naming every field of a diffusers UNet2DModel config.json that does not
  describe our U-Net with `model_kwargs` (fields absent from the config are not checked).

  Besides the shapes, this catches what the weights cannot show: the embedding's sin/cos order
  and frequency shift, the downsample padding, multi-head attention, norm eps.
  """
  desc = model_description(model_kwargs)
  expected = _expected_diffusers_config(desc, image_size)
  expected["in_channels"] = in_channels or desc["out_ch"]
  expected["sample_size"] = (image_size, [image_size, image_size])
  diffs = []
  cls = config.get("_class_name")
  if cls is not None and cls != "UNet2DModel":
    diffs.append(f"_class_name: {cls!r}, expected 'UNet2DModel'")
  for key, want in expected.items():
    if key not in config:
      continue
    got = config[key]
    got_n = list(got) if isinstance(got, (list, tuple)) else got
    allowed = want if isinstance(want, tuple) else (want,)
    if not any(got_n == (list(a) if isinstance(a, (list, tuple)) else a) for a in allowed):
      shown = " or ".join(repr(a) for a in allowed)
      diffs.append(f"{key}: {got!r}, expected {shown}")
  # One attention head: attention_head_dim None (diffusers then uses the channel count) or
  # equal to the channels of every level that has attention.
  head_dim = config.get("attention_head_dim", None)
  if head_dim is not None:
    widths = {desc["ch"] * m for m, a in zip(desc["ch_mult"], _attn_levels(desc, image_size)) if a}
    widths.add(desc["ch"] * desc["ch_mult"][-1])  # the middle block's attention
    if any(head_dim != w for w in widths):
      diffs.append(
          f"attention_head_dim: {head_dim!r} gives multi-head attention; our U-Net "
          "has one head (attention_head_dim null)"
      )
  if diffs:
    raise ValueError(
        "the diffusers config.json does not describe our U-Net with "
        f"{desc} at image_size={image_size}:\n  " + "\n  ".join(diffs)
    )


def _attn_levels(desc, image_size) -> list[bool]:
  """Whether each level of the U-Net has attention (its side is in attn_resolutions)."""
  return [image_size // 2 ** i in desc["attn_resolutions"] for i in range(len(desc["ch_mult"]))]


# ---------------------------------------------------------------------------------------------
# Files.


def _resolve_source(source) -> tuple[epath.Path, dict | None]:
  """The weights file and, for a diffusers folder, its parsed config.json."""
  path = epath.Path(source)
  if not path.exists():
    raise FileNotFoundError(f"no such checkpoint: {path}")
  config_path = None
  if path.is_dir():
    folder = path
    if not any((folder / w).exists() for w in DIFFUSERS_WEIGHTS) and (folder / "unet").is_dir():
      folder = folder / "unet"  # a whole DDPMPipeline folder
    weights = next((folder / w for w in DIFFUSERS_WEIGHTS if (folder / w).exists()), None)
    if weights is None:
      listing = sorted(p.name for p in folder.iterdir())[:10]
      raise FileNotFoundError(
          f"{path}: a folder must hold one of {list(DIFFUSERS_WEIGHTS)} (found {listing})"
      )
    path, config_path = weights, folder / "config.json"
  else:
    sibling = path.parent / "config.json"
    if path.name in DIFFUSERS_WEIGHTS and sibling.exists():
      config_path = sibling
  config = None
  if config_path is not None and config_path.exists():
    try:
      config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
      raise ValueError(f"{config_path}: not a JSON object")
  return path, config


def convert_checkpoint(
    source_path,
    out_dir,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    layout: str | None = None,
    image_size: int = 32,
    in_channels: int | None = None,
    use_ema: bool = True,
    prefix: str | None = None,
) -> epath.Path:
  """Converts a PyTorch DDPM checkpoint and exports it as an Orbax parameter folder.

  Args:
    source_path: a ``.pth``/``.ckpt``/``.bin`` torch file, a ``.safetensors`` file, or a
      diffusers folder with ``diffusion_pytorch_model.safetensors`` (or ``.bin``) and
      ``config.json`` (a DDPMPipeline folder with ``unet/`` works too).
    out_dir: the folder `export_params` writes (``params/`` and ``model.json``); usable as
      ``--config.training.teacher``.
    model_kwargs, layout, image_size, in_channels, use_ema, prefix: see `convert_state_dict`.
  Returns:
    out_dir as an epath.Path.
  Raises:
    FileNotFoundError: no checkpoint at source_path.
    ValueError: an unreadable (truncated, foreign) file, a config.json of another
      architecture, or a checkpoint that does not map onto the U-Net.
    CheckpointError: out_dir already holds exported parameters or a training run (its
      checkpoints/), or is a file.
  Nothing is written unless the whole conversion succeeded: the export goes to a temporary
  folder next to out_dir and is moved into place at the end (a gs:// out_dir is written in
  place, model.json last).
  """
  desc = model_description(model_kwargs)
  out = epath.Path(out_dir)
  ckpt_lib.check_export_target(out)  # neither an export nor a training run is ever shadowed
  weights, config = _resolve_source(source_path)
  if config is not None:
    check_diffusers_config(config, desc, image_size=image_size, in_channels=in_channels)
  try:
    state_dict = load_torch_state_dict(weights)
  except ValueError as e:
    raise ValueError(f"cannot read the checkpoint: {e}") from None
  try:
    params = convert_state_dict(
        state_dict,
        layout,
        desc,
        image_size=image_size,
        in_channels=in_channels,
        use_ema=use_ema,
        prefix=prefix,
    )
  except ValueError as e:
    raise ValueError(f"{weights}: {e}") from None
  export_atomically(out, params, desc)
  logging.info("wrote the converted %s to %s", weights, out)
  return out


def export_atomically(out: epath.Path, params, desc: Mapping[str, Any]) -> None:
  """export_params into a temporary sibling folder, then move it (or its entries) to `out`.

  A URI (gs://...) has no atomic folder rename: there export_params writes `out` directly;
  Orbax commits params/ as a whole and model.json, which readers test, is written last.
  """
  if files.is_remote(out):
    ckpt_lib.export_params(out, params, desc)
    return
  out = epath.Path(os.path.abspath(os.fspath(out)))
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = epath.Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=os.fspath(out.parent)))
  try:
    ckpt_lib.export_params(tmp / "export", params, desc)
    if not out.exists():
      os.rename(tmp / "export", out)
    else:  # an existing (e.g. work) folder: params first, model.json (what readers test) last
      os.rename(tmp / "export" / "params", out / "params")
      try:
        os.rename(tmp / "export" / ckpt_lib.MODEL_JSON, out / ckpt_lib.MODEL_JSON)
      except BaseException:
        shutil.rmtree(out / "params", ignore_errors=True)
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
