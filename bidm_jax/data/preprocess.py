"""Per-example work done by grain (in worker processes when num_workers > 0): decode, resize
and center-crop, random flip, scaling of training batches."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class BadImageError(OSError):
  """An image file or record could not be decoded (data.on_bad_file='fail')."""


def _to_pil(image: np.ndarray) -> Image.Image:
  """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> PIL image."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8 image, got {image.dtype} {image.shape}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
  """Resizes the shorter side to `size` (bilinear, antialiased when shrinking), then center-crops
  to size x size."""
  w, h = img.size
  if (w, h) == (size, size):
    return img
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  if (nw, nh) != (w, h):
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
  left, top = (nw - size) // 2, (nh - size) // 2
  return img.crop((left, top, left + size, top + size))


def load(record: dict, *, image_size: int, channels: int, skip_bad: bool) -> dict:
  """Source record -> `{'image': uint8 (image_size, image_size, channels)[, 'label': int]}`.

  A file that PIL cannot decode raises BadImageError naming it, or (skip_bad) becomes the
  marker `{'bad': path, 'error': message}` that the batcher drops and counts.
  """
  if "bad" in record:
    return record
  try:
    if "path" in record:
      with Image.open(record["path"]) as f:
        f.load()
        img = f.copy()
    else:
      img = _to_pil(record["image"])
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
    name = record.get("path", "<array>")
    if skip_bad:
      return {"bad": name, "error": f"{type(e).__name__}: {e}"}
    raise BadImageError(f"cannot decode image file {name}: {type(e).__name__}: {e}") from e
  img = img.convert("L" if channels == 1 else "RGB")
  img = resize_center_crop(img, image_size)
  image = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
  out = {"image": image}
  if "label" in record:
    out["label"] = record["label"]
  return out


class LoadedSource:
  """Random access to loaded examples (see `load`) of `source`, for training.

  With skip_bad, an undecodable file is replaced by the next decodable one in the source
  (logged), so batches keep their size and stay a pure function of the index; each example
  carries `'skipped'`: how many files were passed over to produce it.
  """

  def __init__(self, source, *, image_size: int, channels: int, skip_bad: bool):
    self.source, self.skip_bad = source, skip_bad
    self.image_size, self.channels = image_size, channels

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    n = len(self.source)
    for k in range(n):
      ex = load(
          self.source[(i + k) % n],
          image_size=self.image_size,
          channels=self.channels,
          skip_bad=self.skip_bad,
      )
      if "bad" not in ex:
        ex["skipped"] = k
        return ex
      log.warning("skipping undecodable image %s (%s)", ex["bad"], ex["error"])
    raise BadImageError(f"no image of {self.source!r} can be decoded")

  def __repr__(self) -> str:
    return f"LoadedSource({self.source!r})"


def scale_batch(batch: dict) -> dict:
  """uint8 images (B, H, W, C) -> float32 in [-1, 1]; labels -> int32."""
  image = batch["image"].astype(np.float32)
  image /= np.float32(127.5)  # in place: the values of x / 127.5 - 1, without temporaries
  image -= np.float32(1)
  out = {**batch, "image": image}
  if "label" in batch:
    out["label"] = np.asarray(batch["label"], dtype=np.int32)
  return out


def float_batch(batch: dict) -> dict:
  """Latents as stored (float32 or float16) -> float32."""
  return {**batch, "image": np.asarray(batch["image"], np.float32)}


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats (N, H, W, C) -> uint8 [0, 255], C = 1 or 3 (the inverse of scale_batch,
  rounded): samples as saved images hold them."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class DecodedArraySource:
  """Examples decoded once into host memory: uint8 images (N, H, W, C) (or latents,
  `encode_all`), labels and skip counts, and with `mirrors` the latents of the mirrored images.

  Indexing returns the same records as the `LoadedSource` (or its shard) it was decoded from,
  so a pipeline over it yields the same batches as the streaming one, without decoding again.
  The arrays may be memory-mapped files (`latent_cache`).
  """

  def __init__(
      self,
      images: np.ndarray,
      labels: np.ndarray | None,
      skipped: np.ndarray,
      mirrors: np.ndarray | None = None,
  ):
    self.images, self.labels, self.skipped, self.mirrors = images, labels, skipped, mirrors

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict:
    out = {"image": self.images[i], "skipped": int(self.skipped[i])}
    if self.labels is not None:
      out["label"] = int(self.labels[i])
    return out

  def gather(self, indices: np.ndarray, mirrored: np.ndarray | None = None) -> dict:
    """The examples at `indices` (B,) as one batch, by array indexing; where `mirrored` (B,)
    is True, the image is taken from `mirrors`."""
    images = self.images[indices]
    if mirrored is not None and mirrored.any():
      images[mirrored] = self.mirrors[indices[mirrored]]
    out = {"image": images, "skipped": self.skipped[indices]}
    if self.labels is not None:
      out["label"] = self.labels[indices]
    return out

  def __repr__(self) -> str:
    mirrors = ", mirrored" if self.mirrors is not None else ""
    return f"DecodedArraySource(n={len(self)}, shape={self.images.shape[1:]}{mirrors})"


def decode_all(examples, *, threads: int) -> DecodedArraySource:
  """Loads every example of `examples` (len() and [i] -> `LoadedSource` records) with `threads`
  threads (PIL decodes without the GIL) into one DecodedArraySource."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel

  n = len(examples)
  first = examples[0]
  images = np.empty((n, *first["image"].shape), np.uint8)
  labels = np.empty((n,), np.int32) if "label" in first else None
  skipped = np.empty((n,), np.int32)

  def fill(start: int) -> None:
    for i in range(start, min(start + 256, n)):
      ex = examples[i]
      images[i], skipped[i] = ex["image"], ex["skipped"]
      if labels is not None:
        labels[i] = ex["label"]

  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    list(pool.map(fill, range(0, n, 256)))
  return DecodedArraySource(images, labels, skipped)


def _empty(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
  del name
  return np.empty(shape, dtype)


def encode_all(
    examples,
    encode,
    batch_size: int,
    *,
    mirror: bool = False,
    dtype=np.float32,
    allocate: Callable[[str, tuple[int, ...], Any], np.ndarray] = _empty,
) -> DecodedArraySource:
  """Every example of `examples` (len() and [i] -> `LoadedSource` records) loaded and encoded
  once, `batch_size` at a time (the last batch padded): `encode(images (B, H, W, C) float32 in
  [-1, 1], batch index) -> (B, h, w, c)` latents, stored as `dtype` (ValueError when one is not
  finite there).

  With `mirror`, each image's left-right mirror is encoded too (batch index num_batches + b),
  into `mirrors`: the latent of a mirrored image is not the mirror of its latent. The latent
  arrays come from `allocate(name, shape, dtype)` ('latents', 'mirrors'): host memory, or the
  memory-mapped files of `latent_cache`.
  """
  n = len(examples)
  num_batches = -(-n // batch_size)
  latents, mirrors, labels, skipped = None, None, None, np.empty((n,), np.int32)
  last_log = time.perf_counter()
  for b, start in enumerate(range(0, n, batch_size)):
    rows = [examples[i] for i in range(start, min(start + batch_size, n))]
    images = np.stack([r["image"] for r in rows] + [rows[-1]["image"]] * (batch_size - len(rows)))
    x = scale_batch({"image": images})["image"]
    z = np.asarray(encode(x, b))[: len(rows)]
    if latents is None:
      latents = allocate("latents", (n, *z.shape[1:]), dtype)
      mirrors = allocate("mirrors", latents.shape, dtype) if mirror else None
      labels = np.empty((n,), np.int32) if "label" in rows[0] else None
    latents[start : start + len(rows)] = z
    if mirror:
      z = np.asarray(encode(x[:, :, ::-1], num_batches + b))
      mirrors[start : start + len(rows)] = z[: len(rows)]
    for stored in (latents, mirrors) if mirror else (latents,):
      if not np.isfinite(stored[start : start + len(rows)]).all():
        raise ValueError(
            f"data.latent_dtype: the first stage gave latents that are not finite as "
            f"{np.dtype(dtype)} "
            f"in examples {start}..{start + len(rows) - 1}"
        )
    skipped[start : start + len(rows)] = [r["skipped"] for r in rows]
    if labels is not None:
      labels[start : start + len(rows)] = [r["label"] for r in rows]
    if time.perf_counter() - last_log > 60:
      last_log = time.perf_counter()
      log.info("encoded %d of %d examples", start + len(rows), n)
  return DecodedArraySource(latents, labels, skipped, mirrors)


class HostShard:
  """Examples `process_index::process_count` of `examples` (len() and [i]): one host's part."""

  def __init__(self, examples, process_index: int, process_count: int):
    self.examples, self.start, self.step = examples, process_index, process_count

  def __len__(self) -> int:
    return len(range(self.start, len(self.examples), self.step))

  def __getitem__(self, i: int) -> dict:
    return self.examples[self.start + i * self.step]

  def __repr__(self) -> str:
    return f"HostShard({self.examples!r}, {self.start}::{self.step})"


class EpochBatches:
  """Batch indices of an endless sequence of epochs over `n` examples.

  Position p = b * batch_size + j of the stream is example perm_e[p % n], e = p // n, where
  perm_e is a permutation drawn from (seed, e): every epoch sees every example once in a new
  order, and a batch may span two epochs. `[b]` -> (b, (batch_size,) int64 indices), a pure
  function of (seed, b), so the order does not depend on workers and resuming is exact.
  """

  def __init__(self, n: int, batch_size: int, seed: int):
    self.n, self.batch_size, self.seed = n, batch_size, seed
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return 2**62 // self.batch_size  # endless in practice

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    return self._perms[epoch]

  def __getitem__(self, b: int) -> tuple[int, np.ndarray]:
    pos = b * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    epochs = pos // self.n
    indices = np.empty_like(pos)
    for e in range(int(epochs[0]), int(epochs[-1]) + 1):
      at = epochs == e
      indices[at] = self._perm(e)[pos[at] % self.n]
    return b, indices


class BatchLoader:
  """(b, indices) -> `{'image': (B, H, W, C), 'skipped': (B,)[, 'label': (B,)]}`.

  Reads the examples (a DecodedArraySource by one array gather, anything else example by
  example) and, with `flip_seed`, mirrors each image left-right with probability 1/2, drawn
  from (flip_seed, b): a source with `mirrors` (latents) gives the mirrored image's latent.
  """

  def __init__(self, examples, flip_seed: int | None):
    self.examples, self.flip_seed = examples, flip_seed

  def __call__(self, item: tuple[int, np.ndarray]) -> dict:
    b, indices = item
    flip = None
    if self.flip_seed is not None:
      flip = np.random.default_rng([self.flip_seed, b]).random(len(indices)) < 0.5
    if isinstance(self.examples, DecodedArraySource):
      if self.examples.mirrors is not None:
        return self.examples.gather(indices, flip)
      batch = self.examples.gather(indices)
    else:
      rows = [self.examples[int(i)] for i in indices]
      batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if flip is not None and flip.any():  # in place: the batch is a fresh array (a gather or stack)
      rows = np.flatnonzero(flip)
      batch["image"][rows] = batch["image"][rows, :, ::-1]
    return batch
