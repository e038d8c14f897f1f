"""The packed W1A1 inference export: one self-describing safetensors file (issue 15, item 1).

`export_tree` turns a binary U-Net's (simulated) parameters into its inference form: every
binary conv and dense layer becomes its packed sign bits (`layers.packed` layout: (Cout,
ceil(K / 32)) uint32, K = kh * kw * Cin, Cin fastest) with its per-channel alpha (XNOR++'s
Gamma folded in), thresholds, the k filter folded for sum-instead-of-mean (k / Cin, paper
appendix B), bias, shortcut scale and real 1x1 shortcut; every other parameter (first and
last conv, time MLP, group norms, nin shortcuts unless `binary_skip_conv`, TBS table) stays
real, as float32 or bfloat16 (`fp_dtype`). `layers.packed.apply` runs the U-Net on that tree.

The file is safetensors (written and read here, no safetensors package needed): tensors named
by their '/'-joined parameter path, and in its `__metadata__` a JSON description (format,
version, architecture, method, TBS settings, image size, fp_dtype, the table of binary layers
with their shapes, strides and padding, the source checkpoint, and a CRC-32 per tensor). A
reader checks the format, every checksum and that the tensors are exactly those of the model
the description names; any problem is one CheckpointError line. docs/packed.md has the
layout, the sizes and what a CUDA kernel needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import zlib
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax.binarize.methods import (
    FP,
    METHODS,
    BinarizationMethod,
    method_differences,
    recorded_fields,
)
from bidm_jax.io import files
from bidm_jax.layers.binary import BinaryConv, BinaryDense, _pad_amounts
from bidm_jax.layers.packed import num_words, pack_kernel
from bidm_jax.models.ldm_unet import LDMUNet
from bidm_jax.models.unet import UNet
from bidm_jax.training import checkpoint as ckpt_lib

FORMAT = "bidm-jax-packed"
VERSION = 1
EXPORT_FILE = "packed.safetensors"
TBS_KEYS = ("tbs_connections", "tbs_buckets", "tbs_init", "tbs_structure", "num_timesteps")

_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.uint32): "U32",
}
_WIRE = {"F32": np.dtype("<f4"), "BF16": np.dtype("<u2"), "U32": np.dtype("<u4")}
_NATIVE = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype(np.uint32),
}


def unsupported_reason(method: BinarizationMethod) -> str | None:
  """Why `method` has no packed inference form here, or None when it has one."""
  if not method.binary:
    return "it is full precision: there are no binary layers to pack"
  parts = method.binarizers
  if not parts.activation.packed:
    return f"its activations are {method.activation_binarizer!r}, not a sign (+-1) binarizer"
  if not parts.weight.packed:
    return f"its weights are {method.weight_binarizer!r}, not a scaled sign"
  if not parts.output_scale.packed:
    return f"its output scale {method.output_scale!r} has no packed form"
  return None


PACKED_METHODS = tuple(name for name, m in METHODS.items() if unsupported_reason(m) is None)
"""The named methods export supports: +-1 weights with a per-channel or per-tensor scale and
+-1 activations (xnor, xnorpp, reactnet, reste, bbcu, bidm)."""


def check_supported(method: BinarizationMethod) -> None:
  """Raises a one-line ValueError naming `method` when it cannot be exported packed."""
  reason = unsupported_reason(method)
  if reason:
    raise ValueError(
        f"method {method.name!r} cannot be exported as packed bits ({reason}); "
        f"export supports {', '.join(PACKED_METHODS)}"
    )


# ---------------------------------------------------------------------------------------------
# Which layers are binary, and their packed parameters.


def trace_binary_layers(model: UNet, image_shape) -> tuple[dict[str, dict], Any]:
  """(binary layer table, parameter shapes) of `model` on (H, W, C) images, traced only.

  The table maps each binary layer's '/'-joined path to its kind, kernel shape (HWIO or
  (Cin, Cout)), stride, explicit padding, input and output sizes, reduction length K and words.
  """
  layers = {}

  def record(next_fun, args, kwargs, context):
    module, y = context.module, next_fun(*args, **kwargs)
    if (
        context.method_name == "__call__"
        and isinstance(module, (BinaryConv, BinaryDense))
        and module.method.binary
    ):
      cin, cout = args[0].shape[-1], module.features
      if isinstance(module, BinaryConv):
        kh, kw = module.kernel_size
        pads = _pad_amounts(module.padding, (kh, kw))
        spec = dict(
            kind="conv",
            kernel=[kh, kw, cin, cout],
            strides=module.strides,
            padding=[list(p) for p in pads],
            input=list(args[0].shape[1:3]),
            output=list(y.shape[1:3]),
        )
      else:
        spec = dict(kind="dense", kernel=[cin, cout])
      k = math.prod(spec["kernel"][:-1])
      layers["/".join(module.path)] = dict(spec, reduction=k, words=num_words(k))
    return y

  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  with nn.intercept_methods(record):
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  return layers, shapes


def pack_layer(
    p: Mapping[str, Any],
    spec: Mapping[str, Any],
    method: BinarizationMethod,
    fp_dtype: str = "float32",
) -> dict[str, jax.Array]:
  """One binary layer's simulated parameters -> its packed ones (see layers.packed).

  p: the layer's parameters ('kernel', 'bias', 'threshold', 'scale_kernel', ...); spec: its
  entry of the layer table. Small per-channel values stay float32; the real 1x1 shortcut
  kernel is stored in `fp_dtype`.
  """
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  kernel = p["kernel"]
  alpha = method.binarizers.weight.packed_scale(f32(kernel))
  if method.output_scale != "none":
    alpha = alpha * f32(p["output_scale"])
  out = {"sign_bits": pack_kernel(kernel), "alpha": alpha}
  if method.learnable_threshold:
    out["threshold"] = f32(p["threshold"])
  if method.binary_bias and "bias" in p:
    out["bias"] = f32(p["bias"])
  if spec["kind"] == "dense":
    return out
  kh, kw, cin, cout = spec["kernel"]
  if method.activation_scale == "xnor":
    k = (
        f32(p["scale_kernel"])
        if method.learnable_k
        else jnp.full((kh, kw, 1, 1), 1.0 / (kh * kw), jnp.float32)
    )
    out["scale_kernel"] = k / cin
  if method.output_scale == "factorised":
    out["output_scale_h"] = f32(p["output_scale_h"])
    out["output_scale_w"] = f32(p["output_scale_w"])
  if method.rprelu != "none":
    for name in ("rprelu_shift_in", "rprelu_slope", "rprelu_shift_out"):
      out[name] = f32(p[name])
  if method.has_shortcut(cin, cout):
    out["shortcut_scale"] = (
        f32(p["shortcut_scale"])
        if method.learnable_shortcut_scale
        else jnp.asarray(method.shortcut_scale_init, jnp.float32)
    )
    if "shortcut_kernel" in p:
      out["shortcut_kernel"] = jnp.asarray(p["shortcut_kernel"], fp_dtype)
  return out


def export_tree(
    params,
    layers: Mapping[str, Mapping[str, Any]],
    method: BinarizationMethod,
    fp_dtype: str = "float32",
):
  """The packed parameter tree: `params` with every layer of `layers` packed (`pack_layer`)
  and every other floating-point leaf cast to `fp_dtype`. Traceable (jax.eval_shape)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  out, grouped = {}, {}
  for key, value in flat.items():
    layer = "/".join(key[:-1])
    if layer in layers:
      grouped.setdefault(layer, {})[key[-1]] = value
    elif jnp.issubdtype(value.dtype, jnp.floating):
      out[key] = jnp.asarray(value, fp_dtype)
    else:
      out[key] = value
  for name, spec in layers.items():
    for leaf, value in pack_layer(grouped.get(name, {}), spec, method, fp_dtype).items():
      out[tuple(name.split("/")) + (leaf,)] = value
  return flax.traverse_util.unflatten_dict(out)


def _flat_names(tree) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _check_params_fit(params, shapes, method: BinarizationMethod, where: str) -> None:
  """Raises CheckpointError when `params` is not the parameter tree of the traced model."""
  found = {k: tuple(np.shape(v)) for k, v in _flat_names(flax.core.unfreeze(params)).items()}
  expected = {k: tuple(s.shape) for k, s in _flat_names(flax.core.unfreeze(shapes)).items()}
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  bad = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
  if missing or extra or bad:
    what = (
        f"missing {len(missing)} (e.g. {missing[0]})"
        if missing
        else f"{len(extra)} unknown (e.g. {extra[0]})"
        if extra
        else f"{len(bad)} of another shape (e.g. {bad[0]}: {found[bad[0]]} vs "
        f"{expected[bad[0]]})"
    )
    raise ckpt_lib.CheckpointError(
        f"the parameters in {where} do not fit a {method.name!r} model of the config: {what}"
    )


# ---------------------------------------------------------------------------------------------
# Sizes.


def _category(key: tuple[str, ...], layers) -> str:
  """What a parameter of the packed tree is, for the size report."""
  layer, leaf = "/".join(key[:-1]), key[-1]
  if layer in layers:
    if leaf == "sign_bits":
      return "binary_sign_bits"
    return "binary_shortcut_1x1" if leaf == "shortcut_kernel" else "binary_scales"
  if key[0].startswith("tbs_"):
    return "tbs_table"
  if key[0] in ("conv_in", "conv_out"):
    return "first_last_conv"
  if key[0].startswith("temb_dense"):
    return "time_mlp"
  if "nin_shortcut" in key:
    return "nin_shortcuts"
  if len(key) > 1 and key[-2].startswith("norm"):
    return "group_norms"
  return "other"


def size_report(tree, layers, fp_params: int) -> dict:
  """Bytes of a packed tree (arrays or ShapeDtypeStructs) by category, against the FP model's
  float32 parameters (`fp_params` values)."""
  by = {}
  for key, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
    n = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    cat = _category(key, layers)
    by[cat] = by.get(cat, 0) + n
  total = sum(by.values())
  return dict(
      tensor_bytes=total,
      fp_f32_bytes=4 * fp_params,
      ratio=4 * fp_params / total,
      by_category=dict(sorted(by.items())),
  )


def _fp_param_count(model: UNet, image_shape) -> int:
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  shapes = jax.eval_shape(
      model.clone(method=FP).init, jax.random.key(0), x, jax.ShapeDtypeStruct((1,), jnp.int32)
  )
  return sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))


def export_sizes(model: UNet, image_shape, fp_dtype: str = "float32") -> dict:
  """The size report of `model`'s export, from shapes alone (nothing is initialised)."""
  check_supported(model.method)
  layers, shapes = trace_binary_layers(model, image_shape)
  tree = jax.eval_shape(lambda p: export_tree(p, layers, model.method, fp_dtype), shapes)
  return size_report(tree, layers, _fp_param_count(model, image_shape))


# ---------------------------------------------------------------------------------------------
# The safetensors file.


def _crc(a: np.ndarray) -> str:
  return f"{zlib.crc32(_wire_bytes(a)):08x}"


def _wire_bytes(a: np.ndarray) -> bytes:
  code = _CODES[a.dtype]
  if code == "BF16":
    a = a.view(np.uint16)
  return np.ascontiguousarray(a, _WIRE[code]).tobytes()


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
  """A safetensors file: u64 header length, JSON header (8-byte aligned), little-endian data,
  tensors ordered by item size then name so every one is aligned to its size."""
  names = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n))
  header, chunks, offset = {"__metadata__": dict(metadata)}, [], 0
  for name in names:
    data = _wire_bytes(tensors[name])
    header[name] = {
        "dtype": _CODES[tensors[name].dtype],
        "shape": list(tensors[name].shape),
        "data_offsets": [offset, offset + len(data)],
    }
    chunks.append(data)
    offset += len(data)
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)
  return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def parse_safetensors(data: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of a safetensors file's bytes; CheckpointError on anything malformed."""

  def bad(why):
    return ckpt_lib.CheckpointError(f"{where} is not a readable safetensors file ({why})")

  if len(data) < 8:
    raise bad(f"{len(data)} bytes")
  (n,) = struct.unpack("<Q", data[:8])
  if 8 + n > len(data):
    raise bad(f"its {n}-byte header runs past the end of the {len(data)}-byte file")
  try:
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise bad(f"its header is not JSON: {type(e).__name__}") from None
  if not isinstance(header, dict):
    raise bad("its header is not a JSON object")
  metadata = header.pop("__metadata__", {}) or {}
  if not isinstance(metadata, dict):
    raise bad("its __metadata__ is not a JSON object")
  buffer, tensors, end_max = memoryview(data)[8 + n :], {}, 0
  for name, info in header.items():
    try:
      code, shape = info["dtype"], tuple(int(s) for s in info["shape"])
      begin, end = (int(v) for v in info["data_offsets"])
      wire = _WIRE[code]
    except (KeyError, TypeError, ValueError):
      raise bad(f"bad entry for {name!r}") from None
    if not 0 <= begin <= end <= len(buffer) or end - begin != math.prod(shape) * wire.itemsize:
      raise bad(
          f"tensor {name!r} (bytes {begin}..{end}) does not fit the {len(buffer)}-byte "
          "data; the file is truncated or damaged"
      )
    a = np.frombuffer(buffer[begin:end], wire).reshape(shape).astype(wire.newbyteorder("="))
    tensors[name] = a.view(_NATIVE[code]) if code == "BF16" else a.astype(_NATIVE[code])
    end_max = max(end_max, end)
  if end_max != len(buffer):
    raise bad(f"{len(buffer) - end_max} bytes after the last tensor")
  return tensors, metadata


# ---------------------------------------------------------------------------------------------
# Writing and reading exports.


def tbs_fields(model: UNet | LDMUNet) -> dict:
  """The model's TBS settings (TBS_KEYS), as an export records them."""
  return {k: getattr(model, k) for k in TBS_KEYS}


def describe(model: UNet | LDMUNet, image_shape, layers, fp_dtype: str) -> dict:
  """The description stored with the tensors: enough to rebuild `model` and check the file."""
  return dict(
      format=FORMAT,
      version=VERSION,
      model=builders.describe_unet(model),
      method=dataclasses.asdict(model.method),
      tbs=tbs_fields(model),
      image_shape=list(image_shape),
      fp_dtype=fp_dtype,
      layout=(
          "sign_bits: uint32 (Cout, ceil(K/32)), K = kh*kw*Cin flattened Cin "
          "fastest; bit j of word i = element 32i+j; 1 = +1 (W >= 0); tail bits 0"
      ),
      layers=layers,
  )


def model_from_description(desc: Mapping[str, Any], dtype=jnp.float32) -> UNet:
  """The U-Net an export describes."""
  return builders.unet_from_description(
      desc["model"],
      method=BinarizationMethod(**recorded_fields(desc["method"])),
      **desc["tbs"],
      dtype=dtype,
  )


def write_export(
    path,
    model: UNet,
    params,
    image_shape,
    *,
    fp_dtype: str = "float32",
    source: Mapping[str, Any] | None = None,
) -> dict:
  """Writes the packed export of `model` with simulated parameters `params` to `path`.

  image_shape: (H, W, C) of the model's images. Returns the file's path and bytes, and the
  size report (`size_report`). Raises ValueError for a method without a packed form and
  CheckpointError when `params` does not fit the model.
  """
  check_supported(model.method)
  if fp_dtype not in config_lib.EXPORT_FP_DTYPES:
    raise ValueError(f"fp_dtype must be one of {config_lib.EXPORT_FP_DTYPES}, got {fp_dtype!r}")
  layers, shapes = trace_binary_layers(model, image_shape)
  _check_params_fit(params, shapes, model.method, (source or {}).get("path", "params"))
  tree = jax.jit(lambda p: export_tree(p, layers, model.method, fp_dtype))(params)
  tensors = {k: np.asarray(v) for k, v in _flat_names(tree).items()}
  desc = dict(
      describe(model, image_shape, layers, fp_dtype),
      source=dict(source or {}),
      checksum={k: _crc(a) for k, a in tensors.items()},
  )
  data = safetensors_bytes(tensors, {"format": FORMAT, "description": json.dumps(desc)})
  files.write_bytes(path, data)
  report = size_report(tree, layers, _fp_param_count(model, image_shape))
  return dict(
      path=os.fspath(path),
      file_bytes=len(data),
      file_ratio=report["fp_f32_bytes"] / len(data),
      **report,
  )


def read_export(path) -> tuple[dict, dict]:
  """(packed parameter tree, description) of an export file, verified.

  Checks the format tag and version, every tensor's CRC-32, and that the tensors are exactly
  those (names, shapes, dtypes) of the model the description names. bfloat16 tensors are
  returned as float32. Any problem raises a one-line CheckpointError.
  """
  where = os.fspath(path)
  try:
    data = files.read_bytes(path)
  except (FileNotFoundError, IsADirectoryError):
    raise ckpt_lib.CheckpointError(f"no packed export at {where}") from None
  tensors, metadata = parse_safetensors(data, where)
  if metadata.get("format") != FORMAT:
    raise ckpt_lib.CheckpointError(
        f"{where} is not a {FORMAT} export (its metadata has no 'format': '{FORMAT}')"
    )
  try:
    desc = json.loads(metadata["description"])
    version, checksum = desc["version"], desc["checksum"]
  except (KeyError, TypeError, ValueError):
    raise ckpt_lib.CheckpointError(f"{where} has no readable description") from None
  if version != VERSION:
    raise ckpt_lib.CheckpointError(
        f"{where} is {FORMAT} version {version}; this reader reads version {VERSION}"
    )
  if set(checksum) != set(tensors):
    odd = sorted(set(checksum) ^ set(tensors))
    raise ckpt_lib.CheckpointError(
        f"{where} is damaged: its tensors are not those its "
        f"description lists ({len(odd)} differ, e.g. {odd[0]})"
    )
  damaged = sorted(k for k, a in tensors.items() if _crc(a) != checksum[k])
  if damaged:
    raise ckpt_lib.CheckpointError(
        f"{where} is damaged: {len(damaged)} tensor(s) do not match "
        f"their checksum, e.g. {damaged[0]}"
    )
  try:
    model = model_from_description(desc)
    layers, shapes = trace_binary_layers(model, desc["image_shape"])
    check_supported(model.method)
    expected = jax.eval_shape(
        lambda p: export_tree(p, layers, model.method, desc["fp_dtype"]), shapes
    )
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    why = " ".join(str(e).split())[:300]
    raise ckpt_lib.CheckpointError(
        f"{where} describes no model this version can build ({type(e).__name__}: {why})"
    ) from None
  expected = {
      k: f"{np.dtype(s.dtype).name}{list(s.shape)}" for k, s in _flat_names(expected).items()
  }
  found = {k: f"{a.dtype.name}{list(a.shape)}" for k, a in tensors.items()}
  odd = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
  if odd:
    raise ckpt_lib.CheckpointError(
        f"{where} does not hold the tensors of the model it describes ({len(odd)} differ, e.g. "
        f"{odd[0]}: found {found.get(odd[0], 'nothing')}, expected "
        f"{expected.get(odd[0], 'nothing')})"
    )
  tree = {
      tuple(k.split("/")): a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a
      for k, a in tensors.items()
  }
  return flax.traverse_util.unflatten_dict(tree), desc


def export_path(source) -> epath.Path:
  """The export file of `source`: the file itself, or EXPORT_FILE in a folder."""
  path = epath.Path(source)
  return path / EXPORT_FILE if path.is_dir() else path


def load_export(source, config) -> tuple[dict, dict]:
  """(packed params, meta) from an export file (or a folder holding EXPORT_FILE), checked
  against `config`: architecture, image shape, binarization method (every field) and TBS
  settings. meta holds 'model', 'method', 'kind' ('packed') and the source 'step'."""
  path = export_path(source)
  tree, desc = read_export(path)
  where = str(path)
  ckpt_lib.check_model_matches(desc["model"], builders.model_description(config), where)
  diffs = [
      f"binarization {k}: export {exported!r} vs config {configured!r}"
      for k, exported, configured in method_differences(
          desc["method"], config_lib.method_from_config(config)
      )
  ]
  # the config's model's TBS settings, as describe() records them; tbs_init only sets the
  # table's starting values, which the export's trained table has replaced
  expected = tbs_fields(builders.make_model(config))
  expected.pop("tbs_init")
  diffs += [
      f"{k}: export {desc['tbs'].get(k)!r} vs config {v!r}"
      for k, v in expected.items()
      if desc["tbs"].get(k) != v
  ]
  shape = list(builders.image_shape(config, 1)[1:])
  if desc["image_shape"] != shape:
    diffs.append(f"image shape: export {desc['image_shape']} vs config {shape}")
  if diffs:
    raise ckpt_lib.CheckpointError(f"{where} was exported for another setting ({'; '.join(diffs)})")
  return tree, dict(
      model=desc["model"],
      method=desc["method"],
      kind="packed",
      step=desc.get("source", {}).get("step"),
  )


def _check_trained_method(meta: Mapping[str, Any], method: BinarizationMethod, where) -> None:
  """A training run's method must be the config's (name and every field both record)."""
  found = meta.get("method")
  if not isinstance(found, dict):
    return
  diffs = [
      f"{k}: checkpoint {trained!r} vs config {configured!r}"
      for k, trained, configured in method_differences(found, method)
  ]
  if diffs:
    raise ckpt_lib.CheckpointError(
        f"{where} was trained with another method ({'; '.join(diffs)}); "
        "set the config's binarization fields to match"
    )


def export(config, workdir: str) -> dict:
  """--mode=export: the packed export of the trained model in config.sampling.checkpoint (else
  the workdir; its EMA parameters) to config.export.path (else <workdir>/packed.safetensors).

  Never overwrites a file. Returns the path, file bytes, the FP float32 checkpoint's bytes and
  the size by category (`size_report`).
  """
  method = config_lib.method_from_config(config)
  check_supported(method)
  source = config.sampling.checkpoint or workdir
  target = config.export.path or os.path.join(workdir, EXPORT_FILE)
  if files.exists(target):
    raise ckpt_lib.CheckpointError(
        f"{target} already exists; remove it or choose another --config.export.path"
    )
  params, meta = ckpt_lib.load_params(source, builders.model_description(config))
  _check_trained_method(meta, method, source)
  model = builders.make_model(config, method)
  return write_export(
      target,
      model,
      params,
      builders.image_shape(config, 1)[1:],
      fp_dtype=config.export.fp_dtype,
      source=dict(path=str(source), step=meta.get("step")),
  )
