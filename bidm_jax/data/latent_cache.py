"""data.latent_cache: a host's encoded training latents on disk, encoded once, memory-mapped.

The first run encodes this host's shard of the split into the directory as
`shard-<i>-of-<n>`: `.latents.npy` (N, h, w, c), with data.random_flip `.mirrors.npy` (the
latents of the mirrored images), `.skipped.npy` and, when the data have labels,
`.labels.npy`. Each is written under a temporary name and renamed when complete; `.json`, the
description of what was encoded, comes last and marks the shard complete. Later runs (resumes,
other runs of the same data and first stage) memory-map the files when the description equals
theirs, and so give the same batches as latents encoded in host memory. A different
description, or a missing or short file, is a one-line ValueError; a cache is never
overwritten.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from bidm_jax.data import preprocess
from bidm_jax.io import files

FORMAT = 1
"""The layout version, recorded in and compared with each description."""

SOURCE_FIELDS = {
    "digits": (),
    "tfds": ("name", "split", "data_dir", "image_key"),
    "folder": ("data_dir", "split"),
}
"""The `data` fields that choose the images of each source (with image_size and channels)."""

_ABSENT = object()

log = logging.getLogger(__name__)


def describe(
    data,
    first_stage: Mapping[str, Any],
    *,
    count: int,
    process_index: int,
    process_count: int,
) -> dict:
  """What a shard's latents are: the images (`SOURCE_FIELDS`, a local data_dir made absolute,
  the shard, `count` examples), the first stage that encoded them
  (`builders.first_stage_description`, which holds the `latent_shape`), the storage dtype and
  whether the mirrored images' latents are included (data.random_flip); JSON values."""
  description = dict(
      format=FORMAT,
      data=dict(
          source=data.source,
          **{k: data[k] for k in SOURCE_FIELDS[data.source]},
          image_size=data.image_size,
          channels=data.channels,
      ),
      shard=dict(process_index=process_index, process_count=process_count),
      count=count,
      first_stage=dict(first_stage),
      dtype=data.latent_dtype,
      mirrored=bool(data.random_flip),
  )
  data_dir = description["data"].get("data_dir")
  if data_dir and not files.is_remote(data_dir):
    description["data"]["data_dir"] = os.path.abspath(data_dir)
  return files.json_safe(description)


def _npy_layout(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, file size it needs) from the header of the .npy file at `path`."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read_header(f)
    return shape, dtype, f.tell() + int(np.prod(shape)) * dtype.itemsize


class _Shard:
  """The file names of one host's shard in a cache directory."""

  def __init__(self, directory: str, process_index: int, process_count: int):
    self.prefix = os.path.join(directory, f"shard-{process_index:05d}-of-{process_count:05d}")
    self.json = self.prefix + ".json"

  def path(self, name: str) -> str:
    return f"{self.prefix}.{name}.npy"

  def fail(self, what: str) -> ValueError:
    return ValueError(
        f"data.latent_cache: {what}; delete {self.prefix}.* to encode it again, or give "
        "another directory"
    )


def load_or_encode(
    directory: str,
    description: Mapping[str, Any],
    examples,
    encode: Callable[[np.ndarray, int], np.ndarray],
    batch_size: int,
) -> tuple[preprocess.DecodedArraySource, bool]:
  """This host's latents of `examples` (its shard), memory-mapped from `directory`: read when
  the shard's files are there and match `description` (`describe`), else encoded first with
  `preprocess.encode_all`. Returns (source, whether it was encoded now)."""
  shard = _Shard(
      directory, description["shard"]["process_index"], description["shard"]["process_count"]
  )
  if os.path.exists(shard.json):
    return _read(shard, description), False
  _encode(
      shard, description, functools.partial(preprocess.encode_all, examples, encode, batch_size)
  )
  return _read(shard, description), True


def _read(shard: _Shard, description: Mapping[str, Any]) -> preprocess.DecodedArraySource:
  """The shard's arrays, after checking its description and its files' shapes and sizes."""
  try:
    with open(shard.json, encoding="utf-8") as f:
      found = json.load(f)
  except (OSError, ValueError) as e:
    raise shard.fail(f"cannot read {shard.json} ({type(e).__name__}: {e})") from None
  expected = traverse_util.flatten_dict(dict(description), sep=".")
  got = traverse_util.flatten_dict(found, sep=".") if isinstance(found, dict) else {}
  for key in (*expected, *sorted(set(got) - set(expected) - {"labels"})):
    if expected.get(key, _ABSENT) != got.get(key, _ABSENT):
      there, here = (repr(d[key]) if key in d else "absent" for d in (got, expected))
      raise ValueError(
          f"data.latent_cache: {shard.json} describes other latents: {key} is {there} there, "
          f"{here} in this run; give another directory (a cache is never overwritten)"
      )
  count, latent = description["count"], tuple(description["first_stage"]["latent_shape"])
  arrays = {
      "latents": ((count, *latent), np.dtype(description["dtype"])),
      "skipped": ((count,), np.int32),
  }
  if description["mirrored"]:
    arrays["mirrors"] = arrays["latents"]
  if got.get("labels"):
    arrays["labels"] = ((count,), np.int32)
  out = {}
  for name, (shape, dtype) in arrays.items():
    path = shard.path(name)
    if not os.path.exists(path):
      raise shard.fail(f"{path} is missing")
    try:
      found_shape, found_dtype, size = _npy_layout(path)
    except (OSError, ValueError) as e:
      raise shard.fail(f"{path} is not a readable .npy file ({e})") from None
    if (found_shape, found_dtype) != (shape, np.dtype(dtype)):
      raise shard.fail(f"{path} holds {found_dtype} {found_shape}, not {np.dtype(dtype)} {shape}")
    if os.path.getsize(path) != size:
      raise shard.fail(f"{path} has {os.path.getsize(path)} bytes, not {size}")
    out[name] = np.load(path, mmap_mode="r" if name in ("latents", "mirrors") else None)
  return preprocess.DecodedArraySource(
      out["latents"], out.get("labels"), out["skipped"], out.get("mirrors")
  )


def _encode(shard: _Shard, description: Mapping[str, Any], encode_all: Callable[..., Any]) -> None:
  """Encodes the shard into its files with `encode_all` (`preprocess.encode_all` of its examples):
  temporary names, renamed when complete, the description last."""
  directory = os.path.dirname(shard.prefix)
  os.makedirs(directory, exist_ok=True)
  dtype = np.dtype(description["dtype"])
  latent = tuple(description["first_stage"]["latent_shape"])
  copies = 2 if description["mirrored"] else 1
  need = copies * description["count"] * int(np.prod(latent)) * dtype.itemsize
  free = shutil.disk_usage(directory).free
  if free < need:
    raise ValueError(
        f"data.latent_cache: {directory} has {free / 1e9:.1f} GB free; this host's latents "
        f"need {need / 1e9:.1f} GB"
    )
  temporary = {}

  def allocate(name: str, shape: tuple[int, ...], stored) -> np.ndarray:
    if shape[1:] != latent:
      raise ValueError(
          f"data.latent_cache: the first stage encodes to {shape[1:]}, its description says "
          f"{latent}"
      )
    temporary[name] = f"{shard.path(name)}.{os.getpid()}.tmp"
    return np.lib.format.open_memmap(temporary[name], mode="w+", dtype=stored, shape=shape)

  log.info("encoding %d examples into %s", description["count"], shard.prefix)
  try:
    source = encode_all(
        mirror=bool(description["mirrored"]),
        dtype=dtype,
        allocate=allocate,
    )
    source.images.flush()
    if source.mirrors is not None:
      source.mirrors.flush()
    index = {"skipped": source.skipped, "labels": source.labels}
    for name, array in index.items():
      if array is not None:
        temporary[name] = f"{shard.path(name)}.{os.getpid()}.tmp"
        with open(temporary[name], "wb") as f:
          np.save(f, array)
    for name, path in temporary.items():
      os.replace(path, shard.path(name))
    # 'labels' is recorded, not compared: whether the data have labels follows from the rest.
    files.write_json(shard.json, {**description, "labels": index["labels"] is not None})
  finally:
    for path in temporary.values():
      if os.path.exists(path):
        os.remove(path)
