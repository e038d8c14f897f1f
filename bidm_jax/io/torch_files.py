"""Read PyTorch-style weight files into numpy arrays, without PyTorch.

One public function, :func:`load_torch_state_dict`, reads

* ``torch.save`` zip checkpoints (the default format since torch 1.6),
* TorchScript archives (``torch.jit.save``): parameters and buffers of the scripted module,
* safetensors files,
* legacy ``torch.save`` pickles (``_use_new_zipfile_serialization=False``, torch < 1.6),

and returns ``{dotted_name: np.ndarray}``. Nested containers (``{'state_dict': ...}``, Lightning
checkpoints, optimizer states, whole pickled ``nn.Module`` objects) are flattened into dotted
names; non-array leaves (numbers, strings, hyper-parameters) are dropped.

Unpickling is restricted: only tensor-rebuild functions, storage types, a few container types and
numpy array reconstruction are resolved; every other class becomes an inert placeholder that only
records its arguments and state, so no code from the file is ever run.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["load_torch_state_dict"]

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

_TORCH_DTYPES = {
    "float64": np.float64,
    "double": np.float64,
    "float32": np.float32,
    "float": np.float32,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


class _FormatError(Exception):
  """Internal: the file content is not what its format promises."""


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """Read every tensor of a PyTorch / TorchScript / safetensors file as numpy arrays.

  Args:
    path: file written by ``torch.save`` (zip or legacy format), ``torch.jit.save`` or
      safetensors.
  Returns:
    ``{dotted_name: array}`` in file order; arrays are C-contiguous copies that keep the stored
    dtype (bfloat16 and float8 as ``ml_dtypes`` types). A ``{'state_dict': {...}}`` wrapper gives
    names like ``state_dict.layer.weight``; a TorchScript module gives its attribute paths
    (``net.layers.conv.weight``).
  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file is truncated, corrupt, of another format, or uses an unsupported
      feature (legacy tar format, sparse or quantized tensors); the message names the path.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such file: {path}")
  with open(path, "rb") as f:
    head = f.read(16)
  try:
    if head.startswith(_ZIP_MAGIC):
      obj = _read_zip_archive(path)
    elif _looks_like_safetensors(path, head):
      return _read_safetensors(path)
    elif head[:1] == b"\x80":
      obj = _read_legacy_pickle(path)
    elif _is_tar(path):
      raise _FormatError(
          "this is the tar checkpoint format of torch < 0.4, which is not supported; "
          "re-save it with a recent torch: torch.save(torch.load(old_path), new_path)"
      )
    else:
      raise _FormatError(
          "not a torch.save zip/pickle, TorchScript or safetensors file "
          f"(first bytes {head[:8]!r})"
      )
    return _flatten(obj)
  except _FormatError as e:
    raise ValueError(f"{path}: {e}") from None
  except (
      zipfile.BadZipFile,
      pickle.UnpicklingError,
      EOFError,
      struct.error,
      UnicodeDecodeError,
      KeyError,
      IndexError,
      TypeError,
      AttributeError,
      OverflowError,
      MemoryError,
  ) as e:
    raise ValueError(f"{path}: truncated or corrupt file ({type(e).__name__}: {e})") from None
  except ValueError as e:
    raise ValueError(f"{path}: truncated or corrupt file ({e})") from None


# ---------------------------------------------------------------------------------------------
# Objects produced while unpickling.


class _Storage:
  """A typed flat buffer; ``data`` is filled right away (zip) or after the pickle (legacy)."""

  def __init__(self, dtype: np.dtype, numel: int, data: np.ndarray | None = None):
    self.dtype = np.dtype(dtype)
    self.numel = int(numel)
    self.data = data

  def view(self, offset: int, numel: int) -> "_StorageView":
    return _StorageView(self, int(offset), int(numel))

  def array(self) -> np.ndarray:
    if self.data is None:
      raise _FormatError("a tensor refers to a storage whose data is missing")
    return self.data


class _StorageView:
  """A slice of a storage (legacy format ``view_metadata``)."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, offset, numel
    self.dtype = root.dtype

  def array(self) -> np.ndarray:
    return self.root.array()[self.offset : self.offset + self.numel]


class _TensorRef:
  """A tensor to be materialised once all storages hold their data."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    if not isinstance(storage, (_Storage, _StorageView)):
      raise _FormatError(f"tensor storage has unexpected type {type(storage).__name__}")
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)
    self.dtype = None if dtype is None else np.dtype(dtype)

  def materialize(self) -> np.ndarray:
    flat = self.storage.array()
    if self.dtype is not None and self.dtype != flat.dtype:
      flat = flat.view(self.dtype)
    if len(self.size) != len(self.stride):
      raise _FormatError(f"tensor size {self.size} and stride {self.stride} disagree")
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
      raise _FormatError(
          f"tensor of size {self.size} at offset {self.offset} does not fit its storage "
          f"of {flat.size} elements"
      )
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset :],
        shape=self.size,
        strides=tuple(s * flat.itemsize for s in self.stride),
        writeable=False,
    )
    return np.array(view, order="C", copy=True)


class _Opaque:
  """Inert stand-in for any class the restricted unpickler does not resolve.

  Records constructor arguments and the ``__setstate__`` state (for TorchScript objects: the
  dict of attributes, parameters and buffers), and accepts list/dict style appends.
  """

  def __new__(cls, *args, **kwargs):
    self = object.__new__(cls)
    self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
    return self

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items.append((key, value))

  def append(self, value):
    self.items.append((len(self.items), value))

  def extend(self, values):
    for v in values:
      self.append(v)


def _opaque_class(module: str, name: str) -> type:
  return type(name, (_Opaque,), {"__module__": f"_opaque.{module}"})


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
  return _TensorRef(storage, storage_offset, size, stride, dtype=dtype)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  return func(*args)


def _unsupported_tensor(kind: str):
  def fail(*args, **kwargs):
    raise _FormatError(f"{kind} tensors are not supported; convert them to dense first")

  return fail


def _identity(value, *args):
  return value


def _numpy_dtype_of(torch_name: str):
  if torch_name not in _TORCH_DTYPES:
    raise _FormatError(f"unsupported torch dtype torch.{torch_name}")
  return np.dtype(_TORCH_DTYPES[torch_name])


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._utils", "_rebuild_sparse_tensor"): _unsupported_tensor("sparse"),
    ("torch._utils", "_rebuild_sparse_csr_tensor"): _unsupported_tensor("sparse"),
    ("torch._utils", "_rebuild_qtensor"): _unsupported_tensor("quantized"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _unsupported_tensor("meta"),
    ("torch._utils", "_rebuild_wrapper_subclass"): _unsupported_tensor("wrapper-subclass"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _unsupported_tensor("device"),
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_complexlist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): lambda *args: dict(),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): lambda text, encoding="utf-8", *a: str(text).encode(encoding),
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__new__,
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__new__,
    ("numpy.core.multiarray", "scalar"): lambda dtype, data=b"": np.frombuffer(data, dtype)[0],
    ("numpy._core.multiarray", "scalar"): lambda dtype, data=b"": np.frombuffer(data, dtype)[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _StorageType:
  """What ``find_class('torch', 'FloatStorage')`` returns: carries the numpy dtype."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the names in ``_ALLOWED`` and torch storage types; see module docstring."""

  def __init__(self, file, storage_loader):
    super().__init__(file, encoding="utf-8")
    self._storage_loader = storage_loader
    self._opaque: dict[tuple[str, str], type] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module in ("torch", "torch.storage", "torch.cuda") and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
      return _numpy_dtype_of(name)
    key = (module, name)
    if key not in self._opaque:
      self._opaque[key] = _opaque_class(module, name)
    return self._opaque[key]

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise _FormatError(f"unexpected persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind == "module":
      return pid[1]
    if kind != "storage":
      raise _FormatError(f"unknown persistent id kind {kind!r}")
    storage_type = pid[1]
    if isinstance(storage_type, np.dtype):
      storage_type = _StorageType(storage_type)
    if not isinstance(storage_type, _StorageType):
      raise _FormatError(f"unsupported storage type {storage_type!r}")
    return self._storage_loader(storage_type.dtype, *pid[2:])


# ---------------------------------------------------------------------------------------------
# Containers.


def _read_zip_archive(path: Path) -> Any:
  """``torch.save`` zip or ``torch.jit.save`` archive: unpickle ``<prefix>/data.pkl``."""
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkls:
      pkls = [n for n in names if n == "data.pkl"]
    if len(pkls) != 1:
      raise _FormatError(
          "zip file without exactly one top-level data.pkl: not a torch checkpoint"
          f" (entries: {names[:5]}{'...' if len(names) > 5 else ''})"
      )
    prefix = pkls[0][: -len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
      big_endian = zf.read(prefix + "byteorder").strip() == b"big"
    storages: dict[str, _Storage] = {}

    def load_storage(dtype, key, location, numel, *rest):
      key = key.decode("ascii") if isinstance(key, bytes) else str(key)
      if key not in storages:
        record = f"{prefix}data/{key}"
        if record not in names:
          raise _FormatError(f"missing storage record {record}")
        raw = zf.read(record)
        if len(raw) % dtype.itemsize:
          raise _FormatError(
              f"storage {record} has {len(raw)} bytes, not a multiple of {dtype.itemsize}"
          )
        arr = np.frombuffer(raw, dtype.newbyteorder(">") if big_endian else dtype)
        storages[key] = _Storage(dtype, arr.size, arr.astype(dtype, copy=False))
      storage = storages[key]
      if storage.dtype != dtype:
        return _Storage(dtype, 0, storage.array().view(dtype))
      return storage

    unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), load_storage)
    return unpickler.load()


def _read_legacy_pickle(path: Path) -> Any:
  """``torch.save(..., _use_new_zipfile_serialization=False)``: pickles then raw storages."""
  storages: dict[str, _Storage] = {}

  def load_storage(dtype, key, location, numel, view_metadata=None):
    key = str(key)
    if key not in storages:
      storages[key] = _Storage(dtype, numel)
    root = storages[key]
    if view_metadata is not None:
      _, offset, size = view_metadata
      return root.view(offset, size)
    return root

  with open(path, "rb") as f:

    def next_pickle():
      return _RestrictedUnpickler(f, load_storage).load()

    if next_pickle() != _LEGACY_MAGIC_NUMBER:
      raise _FormatError("pickle file without the torch.save magic number: not a torch file")
    if next_pickle() != _LEGACY_PROTOCOL_VERSION:
      raise _FormatError("unsupported legacy torch.save protocol version")
    next_pickle()
    obj = next_pickle()
    keys = next_pickle()
    for key in keys:
      storage = storages.get(str(key))
      if storage is None:
        raise _FormatError(f"storage key {key!r} listed but never used")
      (numel,) = struct.unpack("<q", _read_exact(f, 8))
      nbytes = numel * storage.dtype.itemsize
      storage.data = np.frombuffer(_read_exact(f, nbytes), storage.dtype)
      storage.numel = numel
  return obj


def _read_exact(f, n: int) -> bytes:
  data = f.read(n)
  if len(data) != n:
    raise _FormatError(f"file ends early: wanted {n} bytes, got {len(data)}")
  return data


def _is_tar(path: Path) -> bool:
  with open(path, "rb") as f:
    f.seek(257)
    return f.read(5) == b"ustar"


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
  if len(head) < 9:
    return False
  (n,) = struct.unpack("<Q", head[:8])
  return head[8:9] == b"{" and 0 < n <= path.stat().st_size


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """safetensors: u64 little-endian header length, JSON header, raw little-endian buffer."""
  data = path.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  if 8 + n > len(data):
    raise _FormatError(f"safetensors header of {n} bytes runs past the end of the file")
  try:
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _FormatError(f"safetensors header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise _FormatError("safetensors header is not a JSON object")
  buffer = memoryview(data)[8 + n :]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise _FormatError(f"bad safetensors header entry {name!r}: {info!r} ({e})") from None
    count = int(np.prod(shape, dtype=np.int64))
    if not 0 <= begin <= end <= len(buffer) or end - begin != count * dtype.itemsize:
      raise _FormatError(
          f"safetensors tensor {name!r} (bytes {begin}..{end}) does not fit the "
          f"{len(buffer)}-byte buffer or its shape {shape}"
      )
    arr = np.frombuffer(buffer[begin:end], dtype).reshape(shape)
    out[name] = arr.astype(dtype.newbyteorder("="), copy=True)
  return out


# ---------------------------------------------------------------------------------------------
# Flattening.


_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")


def _children(obj) -> list[tuple[str, Any]] | None:
  """The named children of a container, or None for a leaf."""
  if isinstance(obj, dict):
    return [(str(k), v) for k, v in obj.items()]
  if isinstance(obj, (list, tuple)):
    return [(str(i), v) for i, v in enumerate(obj)]
  if isinstance(obj, _Opaque):
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
      state = {**(state[0] or {}), **state[1]}
    if isinstance(state, dict) and any(s in state for s in _MODULE_SLOTS):
      merged = []
      for slot in _MODULE_SLOTS:
        merged += [(str(k), v) for k, v in (state.get(slot) or {}).items()]
      return merged
    out = [(str(k), v) for k, v in obj.items]
    if state is not None:
      out += _children(state) or []
    return out
  return None


def _flatten(obj: Any) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  seen: set[int] = set()
  stack = [("", obj)]
  while stack:
    prefix, node = stack.pop()
    if isinstance(node, _TensorRef):
      out[prefix] = node.materialize()
      continue
    if isinstance(node, np.ndarray) and node.dtype != object:
      out[prefix] = np.array(node)
      continue
    if id(node) in seen:
      continue
    kids = _children(node)
    if kids is None:
      continue
    seen.add(id(node))
    for name, child in reversed(kids):
      stack.append((f"{prefix}.{name}" if prefix else name, child))
  return out
