"""Grain input pipelines for training (shuffled, repeated, checkpointable) and evaluation.

Training, per host (all MapDataset steps are pure functions of the index, so the data
order depends on `seed` only, not on `num_workers`, and resuming is exact):

  LoadedSource(source)                        decode, resize + center crop -> uint8
  HostShard(process_index::process_count)     this host's part of the examples
  decode_all (data.cache_in_memory)           once, into a uint8 array in host memory
  or encode_all (a first stage)               once, into latents (and the mirrors' latents)
                                              in host memory or data.latent_cache's files
  EpochBatches(seed)                          batch b -> its indices: a new permutation
                                              every epoch, endless; batches may span epochs
  .map(BatchLoader(flip_seed))                gather (one array index when decoded), flip
                                              (latents: the mirror's latent)
  .map(scale_batch)                           float32 in [-1, 1] (latents: float_batch)
  .to_iter_dataset().mp_prefetch(num_workers) (streaming only)
  -> TrainIterator                            sums the skip counts, holds the state

Evaluation reads the first `num_examples` examples once, in order, and batches them in the
main process so that a skipped file shortens no batch but the last.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

from absl import flags
import grain
import numpy as np

from bidm_jax.data import config as config_lib
from bidm_jax.data import latent_cache
from bidm_jax.data import preprocess
from bidm_jax.data import sources

ENCODE_BATCH = 32
"""Images per first-stage call when a training split is encoded into latents."""

log = logging.getLogger(__name__)


class TrainIterator(grain.DatasetIterator):
  """Endless training batches; a checkpointable grain DatasetIterator.

  Yields `{'image': float32 (B, H, W, C) in [-1, 1][, 'label': int32 (B,)]}`. `skipped`
  counts undecodable files passed over so far (data.on_bad_file='skip'; once per epoch
  they come round). State (`get_state`) is a JSON-serialisable dict: the grain pipeline's
  position plus `skipped`.
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self._batches = parent
    self.batch_size = batch_size
    self.skipped = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._batches))
    self.skipped += int(np.sum(batch.pop("skipped")))
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._batches.get_state(), "skipped": self.skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    self._batches.set_state(state["pipeline"])
    self.skipped = int(state["skipped"])

  def __str__(self) -> str:
    return f"TrainIterator(batch_size={self.batch_size})"


class EvalIterator(grain.DatasetIterator):
  """One pass of uint8 batches `{'image': (B, H, W, C)[, 'label': int32 (B,)]}`.

  Examples are stacked here, in the main process; undecodable files
  (data.on_bad_file='skip') are dropped, logged and counted in `skipped`. The final batch
  may be smaller than `batch_size`.
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self._examples = parent
    self.batch_size = batch_size
    self.skipped = 0

  def __next__(self) -> dict[str, np.ndarray]:
    images, labels = [], []
    while len(images) < self.batch_size:
      try:
        ex = next(self._examples)
      except StopIteration:
        break
      if "bad" in ex:
        self.skipped += 1
        log.warning(
            "skipping undecodable image %s (%s); %d skipped so far",
            ex["bad"],
            ex["error"],
            self.skipped,
        )
        continue
      images.append(ex["image"])
      if "label" in ex:
        labels.append(ex["label"])
    if not images:
      raise StopIteration
    batch = {"image": np.stack(images)}
    if len(labels) == len(images):
      batch["label"] = np.asarray(labels, dtype=np.int32)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._examples.get_state(), "skipped": self.skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    self._examples.set_state(state["pipeline"])
    self.skipped = int(state["skipped"])

  def __str__(self) -> str:
    return f"EvalIterator(batch_size={self.batch_size})"


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(process_index, process_count), defaulting to jax's."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index}, process_count={process_count} are invalid; "
        "valid values: process_count >= 1 and 0 <= process_index < process_count"
    )
  return process_index, process_count


def _seeds(seed: int) -> tuple[int, int]:
  """Independent uint32 seeds for the shuffle and the flips, derived from one seed."""
  a, b = np.random.SeedSequence(seed).generate_state(2)
  return int(a), int(b)


def _iterate(
    ds: grain.MapDataset, num_workers: int, *, batched: bool, decoded: bool = False
) -> grain.DatasetIterator:
  """The MapDataset as an iterator, computed by `num_workers` processes (0: threads in-process).

  Elements that are whole batches get a short read-ahead (grain's default of 500 would hold
  gigabytes of 256x256 batches). Batches of `decoded` (in-memory) images are assembled by one
  thread: the work is a few NumPy calls under the GIL, where more threads only contend.
  """
  read = grain.ReadOptions()
  if batched:
    threads = 1 if decoded else 8 if num_workers == 0 else 2
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
  it_ds = ds.to_iter_dataset(read)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker start-up reads an absl flag, which raises in a script that never
      # parsed flags (google/grain#1355, fixed upstream); absl.app.run parses them anyway.
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)


def dataset_size(data) -> int:
  """Number of examples (files/records, before any are skipped) in the configured split."""
  config_lib.validate(data)
  return len(sources.build_source(data))


def make_train_iterator(
    data,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    encode: Callable[[np.ndarray, int], np.ndarray] | None = None,
    first_stage: Mapping[str, Any] | None = None,
) -> TrainIterator:
  """Endless, shuffled training batches for this host.

  Host `process_index` reads examples `process_index::process_count` of the dataset (its
  shard, disjoint from the other hosts') in an order reshuffled every epoch, and gets
  `global_batch_size // process_count` examples per step: `{'image': float32 (B, H, W, C)
  in [-1, 1][, 'label': int32 (B,)]}`. Order and flips are a function of `seed` (not of
  `num_workers`). Checkpoint it with `orbax_save_args` / `orbax_restore_args` (or
  `iterator_state` / `restore_iterator_state`).

  With `encode` (`builders.latent_encoder`: (B, H, W, C) in [-1, 1] and a batch index ->
  (B, h, w, c) latents), the host's images are encoded once, ENCODE_BATCH at a time, and
  `'image'` holds latents stored as data.latent_dtype: in host memory, or with
  data.latent_cache memory-mapped from that directory (`latent_cache`; encoded by the first
  run, whose description `first_stage`, `builders.first_stage_description`, is part of). With
  data.random_flip the mirrored images are encoded too, and a flip picks the mirror's latent.
  """
  config_lib.validate(data)
  process_index, process_count = _host(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is invalid; valid values: a positive "
        f"multiple of process_count={process_count}"
    )
  if data.latent_cache and (encode is None or first_stage is None):
    raise ValueError(
        "data.latent_cache: only latents are cached; it needs encode and the first stage's "
        "description (a first stage: config.first_stage.source)"
    )
  source = sources.build_source(data)
  if len(source) < process_count:
    raise ValueError(f"{source!r} has fewer examples than process_count={process_count}")
  loaded = preprocess.LoadedSource(
      source,
      image_size=data.image_size,
      channels=data.channels,
      skip_bad=data.on_bad_file == "skip",
  )
  examples = preprocess.HostShard(loaded, process_index, process_count)
  cached = encode is not None or _cache_shard(data, len(examples))
  start = time.perf_counter()
  if encode is not None and data.latent_cache:
    description = latent_cache.describe(
        data,
        first_stage,
        count=len(examples),
        process_index=process_index,
        process_count=process_count,
    )
    examples, encoded = latent_cache.load_or_encode(
        data.latent_cache, description, examples, encode, ENCODE_BATCH
    )
    log.info(
        "%s %d examples of %r as latents %s in %s in %.1f s",
        "encoded" if encoded else "memory-mapped",
        len(examples),
        source,
        examples.images.shape[1:],
        data.latent_cache,
        time.perf_counter() - start,
    )
  elif encode is not None:
    examples = preprocess.encode_all(
        examples, encode, ENCODE_BATCH, mirror=data.random_flip, dtype=data.latent_dtype
    )
    log.info(
        "encoded %d examples of %r into latents %s in host memory in %.1f s",
        len(examples),
        source,
        examples.images.shape[1:],
        time.perf_counter() - start,
    )
  elif cached:
    examples = preprocess.decode_all(examples, threads=max(data.num_workers, os.cpu_count() or 1))
    log.info(
        "decoded %d examples of %r into host memory in %.1f s",
        len(examples),
        source,
        time.perf_counter() - start,
    )
  shuffle_seed, flip_seed = _seeds(seed)
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.source(preprocess.EpochBatches(len(examples), local_batch, shuffle_seed))
  ds = ds.map(preprocess.BatchLoader(examples, flip_seed if data.random_flip else None))
  ds = ds.map(preprocess.scale_batch if encode is None else preprocess.float_batch)
  # Decoded batches need no worker processes: threads in this process assemble them.
  return TrainIterator(
      _iterate(ds, 0 if cached else data.num_workers, batched=True, decoded=cached), local_batch
  )


def _cache_shard(data, num_examples: int) -> bool:
  """Whether this host's `num_examples` decoded images are kept in memory (data.cache_in_memory)."""
  if data.cache_in_memory != "auto":
    return data.cache_in_memory == "always"
  mib = num_examples * data.image_size**2 * data.channels / 2**20
  if mib > data.cache_budget_mb:
    log.info(
        "streaming the training data: its %d decoded images take %.0f MiB, over "
        "data.cache_budget_mb=%g",
        num_examples,
        mib,
        data.cache_budget_mb,
    )
    return False
  return True


def make_eval_iterator(
    data,
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_examples: int | None = None,
) -> EvalIterator:
  """One pass over this host's shard, in dataset order, for FID/reference statistics.

  Takes the first `num_examples` examples of the split (all when None), and host
  `process_index` reads examples `process_index::process_count` of them. Yields
  `{'image': uint8 (B, H, W, C) in [0, 255][, 'label': int32 (B,)]}`, never flipped. The
  final batch is kept even when it holds fewer than `batch_size` examples, so every
  example is seen exactly once (callers with fixed-shape compiled functions pad it).
  """
  config_lib.validate(data)
  process_index, process_count = _host(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} is invalid; valid values: an int > 0")
  source = sources.build_source(data)
  ds = grain.MapDataset.source(source)
  if num_examples is not None:
    if not 0 < num_examples <= len(source):
      raise ValueError(
          f"num_examples={num_examples} is invalid; valid values: 1..{len(source)} "
          f"(the size of {source!r}) or None"
      )
    ds = ds[:num_examples]
  ds = ds[process_index::process_count].map(
      functools.partial(
          preprocess.load,
          image_size=data.image_size,
          channels=data.channels,
          skip_bad=data.on_bad_file == "skip",
      )
  )
  return EvalIterator(_iterate(ds, data.num_workers, batched=False), batch_size)


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's position as a JSON-serialisable dict (e.g. for `ocp.args.JsonSave` on a
  single host); `restore_iterator_state` puts it back."""
  return json.loads(json.dumps(it.get_state()))


def restore_iterator_state(
    it: grain.DatasetIterator, state: dict[str, Any] | str | bytes
) -> grain.DatasetIterator:
  """Moves `it` (built with the same config, seed, hosts and num_workers) to a position from
  `iterator_state` (dict, or its JSON text/bytes); returns `it`."""
  if isinstance(state, (str, bytes)):
    state = json.loads(state)
  it.set_state(state)
  return it


def orbax_save_args(it: grain.DatasetIterator):
  """Orbax args saving `it`'s position as one JSON file per host
  (`process_<i>-of-<n>.json`), so multi-host runs keep every host's position."""
  return grain.checkpoint.CheckpointSave(it)


def orbax_restore_args(it: grain.DatasetIterator):
  """Orbax args restoring a position saved by `orbax_save_args` into `it` (in place)."""
  return grain.checkpoint.CheckpointRestore(it)
