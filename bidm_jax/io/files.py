"""Whole-file reads and writes for local paths and for URIs such as gs://bucket/run.

A URI (anything with '://') goes through etils.epath, as the Orbax checkpoints do; a local path
through the os module, written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import numpy as np
from etils import epath


def is_remote(path) -> bool:
  """True for a URI (gs://..., s3://...), False for a local path."""
  return "://" in os.fspath(path)


def makedirs(path) -> None:
  """os.makedirs(path, exist_ok=True); nothing for a URI (object stores have no folders)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def exists(path) -> bool:
  return epath.Path(path).exists()


def read_bytes(path) -> bytes:
  return epath.Path(path).read_bytes()


def write_bytes(path, data: bytes) -> None:
  """Writes `data` as the whole file at `path`, creating a local path's folder."""
  if is_remote(path):
    epath.Path(path).write_bytes(data)  # an object store replaces the object as a whole
    return
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def json_safe(obj: Any) -> Any:
  """`obj` for strict JSON: non-finite floats become None, NumPy scalars and arrays Python
  numbers and lists, tuples lists (dict keys and other values are left as they are)."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json(path, obj: Any, indent: int = 2) -> None:
  """`obj` as strict JSON (`json_safe`: NaN and infinities become null) to `path` with
  write_bytes."""
  write_bytes(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False).encode())


def write_npz(path, **arrays) -> None:
  """np.savez(path, **arrays) with write_bytes (`path` is used as given, no '.npz' added)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())
