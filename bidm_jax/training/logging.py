"""Metric logging: TensorBoard event files written without TensorFlow, and image grids.

The event writer emits the TFRecord-framed `Event` protos that TensorBoard reads (scalar
summaries only), encoded by hand: no tensorflow or tensorboard import at run time.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

from bidm_jax.data.preprocess import to_uint8
from bidm_jax.io import files


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    bits, n = n & 0x7F, n >> 7
    out.append(bits | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, summary: bytes = b"", file_version: str = "") -> bytes:
  msg = b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step)
  if file_version:
    msg += _field_bytes(3, file_version.encode())
  if summary:
    msg += _field_bytes(5, summary)
  return msg


def _scalar_summary(tag: str, value: float) -> bytes:
  return _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", value))


class MetricWriter:
  """Appends scalars to `logdir/events.out.tfevents.*` (TensorBoard) and to `metrics.jsonl`.

  A local logdir's files are opened for appending. A URI logdir (gs://...; object stores cannot
  append) keeps each file's contents in memory, starting from what the file already holds, and
  rewrites the whole file on every flush. With `resume_step` (the step a run starts from), the
  `metrics.jsonl` rows of later steps, which the run logs again, are dropped first, so each
  step has one row. Non-finite values are written as null (strict JSON).
  """

  def __init__(self, logdir: str, *, resume_step: int | None = None):
    files.makedirs(logdir)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    paths = (os.path.join(logdir, name), os.path.join(logdir, "metrics.jsonl"))
    if resume_step is not None:
      _drop_rows_after(paths[1], resume_step)
    self._remote = {}
    if files.is_remote(logdir):
      self._remote = {p: bytearray(files.read_bytes(p) if files.exists(p) else b"") for p in paths}
      self._events, self._jsonl = (_Buffer(self._remote[p]) for p in paths)
    else:
      self._events = open(paths[0], "ab")
      self._jsonl = open(paths[1], "a")
    self._write(_event(0, file_version="brain.Event:2"))

  def _write(self, record: bytes) -> None:
    header = struct.pack("<Q", len(record))
    self._events.write(header + _masked_crc(header) + record + _masked_crc(record))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    summary = b"".join(_scalar_summary(k, float(v)) for k, v in scalars.items())
    self._write(_event(step, summary=summary))
    row = files.json_safe({"step": step, **{k: float(v) for k, v in scalars.items()}})
    self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
    self.flush()

  def flush(self) -> None:
    for path, data in self._remote.items():
      files.write_bytes(path, bytes(data))
    if not self._remote:
      self._events.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._remote:
      self.flush()
    else:
      self._events.close()
      self._jsonl.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Removes the rows of metrics.jsonl at `path` logged after `step`, and a last row cut short
  by a killed run."""
  if not files.exists(path):
    return
  text = files.read_bytes(path).decode("utf-8", errors="replace")
  kept = []
  for line in text.splitlines(keepends=True):
    if not line.endswith("\n"):
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if not (isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step):
      kept.append(line)
  if "".join(kept) != text:
    files.write_bytes(path, "".join(kept).encode())


class _Buffer:
  """A file-like `write` (bytes or str, as UTF-8) appending to a bytearray."""

  def __init__(self, data: bytearray):
    self._data = data

  def write(self, chunk: bytes | str) -> None:
    self._data += chunk.encode() if isinstance(chunk, str) else chunk


def image_grid(images: np.ndarray, ncols: int, pad: int = 2) -> np.ndarray:
  """uint8 (N, H, W, C) -> one uint8 (rows*(H+pad)+pad, ncols*(W+pad)+pad, 3) grid."""
  n, h, w, c = images.shape
  if c == 1:
    images = np.repeat(images, 3, axis=-1)
  rows = -(-n // ncols)
  grid = np.full((rows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[
        pad + r * (h + pad) : pad + r * (h + pad) + h,
        pad + col * (w + pad) : pad + col * (w + pad) + w,
    ] = img
  return grid


def save_grid(images: np.ndarray, path: str, ncols: int = 8, scale: int = 1) -> None:
  """Writes [-1, 1] images (N, H, W, C) as a PNG grid, optionally upscaled (nearest)."""
  img = Image.fromarray(image_grid(to_uint8(images), ncols))
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  _save_image(img, path)


def save_labelled_rows(
    rows: Mapping[str, np.ndarray], path: str, ncols: int = 8, scale: int = 3
) -> None:
  """One labelled block of [-1, 1] images per entry of `rows`, stacked vertically, as a PNG."""
  label_w = 70
  blocks = []
  for label, images in rows.items():
    grid = Image.fromarray(image_grid(to_uint8(images), ncols))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    block = Image.new("RGB", (grid.width + label_w, grid.height), "white")
    block.paste(grid, (label_w, 0))
    ImageDraw.Draw(block).text((6, grid.height // 2 - 6), label, fill="black")
    blocks.append(block)
  out = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white")
  y = 0
  for b in blocks:
    out.paste(b, (0, y))
    y += b.height
  _save_image(out, path)


def _save_image(img: Image.Image, path: str) -> None:
  """img.save(path), through files.write_bytes (the format from the extension, else PNG)."""
  fmt = Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower(), "PNG")
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  files.write_bytes(path, buf.getvalue())
