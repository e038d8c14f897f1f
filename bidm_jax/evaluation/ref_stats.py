"""Reference statistics of a dataset for FID, sFID and precision/recall (the `ref_stats` mode).

:func:`ref_stats` reads the dataset of `config.data` once (the first `config.eval.num_reference`
examples, or all), runs the FID Inception-v3 on it and writes one `.npz` (`config.eval.reference`,
else `<workdir>/reference_stats.npz`) holding

  mu, sigma         float64 mean / covariance of the 2048-d pool features (FID)
  mu_s, sigma_s     the same of the 2023-d spatial features (sFID)
  count             number of images behind them
  pr_features       (K, 2048) float32 pool features of a uniformly random subset of K <=
                    `config.eval.pr_reference` images (precision / recall)
  description       JSON: source, name, split, data_dir, image_size, channels, count
  inception_weights the weight file's name
  saturated_fraction, mean_image_std
                    `metrics.image_health` of the images (absent from files written before
                    it existed: those still load, without reference health)

`Reference.load(path)` reads it (or any npz with mu/sigma). An existing file is reused when its
description equals the config's, and never overwritten otherwise. Grayscale data is replicated
to three channels before the network. On several hosts every host reads the whole dataset
(the features are the same on all) and process 0 writes the file.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from bidm_jax import config as config_lib
from bidm_jax import data as data_lib
from bidm_jax.evaluation.featurizer import Featurizer, get_featurizer, inception_batch_size
from bidm_jax.evaluation.inception import POOL_DIM, SPATIAL_DIM
from bidm_jax.evaluation.inception_weights import inception_weights_file
from bidm_jax.evaluation.metrics import HEALTH_KEYS, FeatureStats, ImageHealth
from bidm_jax.io import files

__all__ = [
    "REFERENCE_FILE",
    "Reference",
    "data_description",
    "load_or_compute",
    "ref_stats",
    "reference_path",
]

REFERENCE_FILE = "reference_stats.npz"


class _Reservoir:
  """A uniformly random subset of at most `size` rows of a stream (Vitter's algorithm R)."""

  def __init__(self, size: int, seed: int):
    self.size = size
    self.seen = 0
    self.rows: np.ndarray | None = None
    self._rng = np.random.default_rng(seed)

  def add(self, x: np.ndarray) -> None:
    if self.rows is None:
      self.rows = np.zeros((self.size,) + x.shape[1:], x.dtype)
    fill = max(0, min(self.size - self.seen, len(x)))
    self.rows[self.seen : self.seen + fill] = x[:fill]
    rest = x[fill:]
    if len(rest):
      seen = self.seen + fill + np.arange(len(rest))
      slots = self._rng.integers(0, seen + 1)
      for row, slot in zip(rest, slots):
        if slot < self.size:
          self.rows[slot] = row
    self.seen += len(x)

  def result(self) -> np.ndarray:
    if self.rows is None:
      return np.zeros((0, POOL_DIM), np.float32)
    return self.rows[: min(self.seen, self.size)]


class Reference(NamedTuple):
  """Reference statistics: FeatureStats of the pool features and the number of images behind
  them (None when a foreign file does not say), FeatureStats of the spatial features (or None),
  pool features for precision/recall (or None), the data description (None for a file not
  written by ref_stats), the Inception weight file it was computed with (or None) and the
  images' health {'saturated_fraction', 'mean_image_std'} (None for files without it)."""

  path: str
  pool: FeatureStats
  count: int | None
  spatial: FeatureStats | None
  pr_features: np.ndarray | None
  description: dict | None
  inception_weights: str | None
  health: dict | None = None

  @classmethod
  def load(cls, path: str | Path) -> "Reference":
    """Reads a ref_stats file, or any npz with mu/sigma (e.g. a guided-diffusion batch)."""
    path = epath.Path(path) if files.is_remote(path) else Path(path)
    try:
      blob = files.read_bytes(path)  # read once; np.load parses it from memory below
      pool = FeatureStats.load(io.BytesIO(blob))
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(f"reference {path}: not reference statistics ({e})") from e
    with np.load(io.BytesIO(blob)) as data:
      names = set(data.files)
      spatial = FeatureStats.load(io.BytesIO(blob), "_s") if {"mu_s", "sigma_s"} <= names else None
      pr = np.asarray(data["pr_features"], np.float32) if "pr_features" in names else None
      desc = json.loads(str(data["description"])) if "description" in names else None
      weights = str(data["inception_weights"]) if "inception_weights" in names else None
      count = int(data["count"]) if "count" in names else None
      health = {k: float(data[k]) for k in HEALTH_KEYS} if set(HEALTH_KEYS) <= names else None
    return cls(str(path), pool, count, spatial, pr, desc, weights, health)

  def summary(self) -> dict:
    return {
        "reference": self.path,
        "description": self.description,
        "count": self.count,
        "pr_features": None if self.pr_features is None else len(self.pr_features),
        "inception_weights": self.inception_weights,
        "health": self.health,
    }


def reference_path(config, workdir: str) -> Path:
  """config.eval.reference, else <workdir>/reference_stats.npz (an epath.Path for a URI)."""
  path = config.eval.reference or os.path.join(workdir, REFERENCE_FILE)
  return epath.Path(path) if files.is_remote(path) else Path(path).expanduser()


def _num_reference(config) -> int:
  """Examples the reference reads: config.eval.num_reference (0 = all), at most the split."""
  size = data_lib.dataset_size(config.data)
  n = config.eval.num_reference
  return size if n <= 0 else min(n, size)


def data_description(config, count: int) -> dict:
  """What a reference file describes: source, name, split, data_dir, image_size, channels and
  the number of examples read. Fields that do not apply to the source are ''."""
  d = config.data
  name, split, data_dir = "", "", ""
  if d.source == "tfds":
    name, split, data_dir = d.name, d.split, d.data_dir
  elif d.source == "folder":
    split, data_dir = d.split, os.path.abspath(os.path.expanduser(d.data_dir))
  else:
    name = d.source
  return {
      "source": d.source,
      "name": name,
      "split": split,
      "data_dir": data_dir,
      "image_size": int(d.image_size),
      "channels": int(d.channels),
      "count": int(count),
  }


def _check_description(
    found: Mapping[str, Any] | None, expected: Mapping[str, Any], path: Path
) -> None:
  if found is None:
    raise ValueError(
        f"reference {path} exists but holds no data description (not written by "
        "ref_stats); refusing to overwrite it: delete it or set "
        "config.eval.reference to another path"
    )
  diffs = [
      f"{k}: file {found.get(k)!r} vs config {expected.get(k)!r}"
      for k in sorted(set(found) | set(expected))
      if found.get(k) != expected.get(k)
  ]
  if diffs:
    raise ValueError(
        f"reference {path} describes other data ({'; '.join(diffs)}); set config.data / "
        "config.eval.num_reference to the data it describes, or config.eval.reference to "
        "another path (an existing reference is never overwritten)"
    )


def _compute_reference(
    config, featurizer: Featurizer, weights_name: str, path: Path, description: dict
) -> tuple[Reference, int]:
  """One pass over the reference data; returns (Reference, skipped undecodable files)."""
  count = description["count"]
  # Every host reads the whole reference: the features (and so the file) are the same on all.
  it = data_lib.make_eval_iterator(
      config.data,
      batch_size=featurizer.batch_size,
      num_examples=count,
      process_index=0,
      process_count=1,
  )
  pool, spatial = FeatureStats(POOL_DIM), FeatureStats(SPATIAL_DIM)
  reservoir = _Reservoir(min(config.eval.pr_reference, count), seed=config.seed)
  health = ImageHealth()
  with tqdm(
      total=count,
      desc="reference",
      unit="img",
      disable=not config.eval.progress_bar or jax.process_index() != 0,
  ) as bar:
    for batch in it:
      health.update(batch["image"])
      feats = featurizer(batch["image"])
      pool.update(feats["pool"])
      spatial.update(feats["spatial"])
      reservoir.add(feats["pool"])
      bar.update(len(batch["image"]))
  if pool.count < 2:
    raise ValueError(f"reference: {pool.count} usable images in {description}; need at least 2")
  ref = Reference(
      str(path),
      pool,
      pool.count,
      spatial,
      reservoir.result(),
      dict(description),
      weights_name,
      {k: health.result()[k] for k in HEALTH_KEYS},
  )
  return ref, it.skipped


def _write_reference(ref: Reference, path: Path, skipped: int) -> None:
  """Writes the reference npz atomically (files.write_bytes)."""
  files.write_npz(
      path,
      mu=ref.pool.mean,
      sigma=ref.pool.cov,
      count=np.int64(ref.pool.count),
      mu_s=ref.spatial.mean,
      sigma_s=ref.spatial.cov,
      pr_features=ref.pr_features.astype(np.float32),
      description=np.array(json.dumps(ref.description, sort_keys=True)),
      inception_weights=np.array(ref.inception_weights or ""),
      skipped=np.int64(skipped),
      **{k: np.float64(v) for k, v in (ref.health or {}).items()},
  )


def _expected_description(config, *, need_count: bool) -> dict:
  """data_description of the config; without the dataset at hand (need_count False), the
  description without 'count'."""
  try:
    return data_description(config, _num_reference(config))
  except FileNotFoundError as e:  # DatasetNotPreparedError too
    if need_count:
      raise
    logging.warning(
        "reference data not readable (%s); checking the reference's description "
        "without its count",
        e,
    )
    desc = data_description(config, 0)
    del desc["count"]
    return desc


def load_or_compute(
    config, workdir: str, weights: Path, *, allow_external: bool
) -> tuple[Reference, bool]:
  """The reference of config.eval.reference (else <workdir>/reference_stats.npz): (Reference,
  reused).

  An existing file is reused when its description matches config.data (else ValueError); one
  without a description (not written by ref_stats, e.g. a guided-diffusion reference batch) is
  used as is when `allow_external`, else refused. A missing file is computed and written.
  """
  path = reference_path(config, workdir)
  if path.exists():
    ref = Reference.load(path)
    if ref.description is None and not allow_external:
      _check_description(None, {}, path)  # raises: never overwrite a foreign file
    if ref.description is not None:
      expected = _expected_description(config, need_count=False)
      found = dict(ref.description)
      if "count" not in expected:
        found.pop("count", None)
      _check_description(found, expected, path)
    if ref.inception_weights and ref.inception_weights != weights.name:
      logging.warning(
          "reference %s was computed with %s; samples are featurised with %s",
          path,
          ref.inception_weights,
          weights.name,
      )
    return ref, True
  description = _expected_description(config, need_count=True)
  featurizer = get_featurizer(weights, inception_batch_size(config.eval))
  ref, skipped = _compute_reference(config, featurizer, weights.name, path, description)
  if jax.process_index() == 0:
    _write_reference(ref, path, skipped)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("bidm_jax.evaluation.ref_stats")
  return ref, False


def ref_stats(config, workdir: str) -> dict:
  """Reference statistics of config.data for FID, sFID and precision/recall, written once.

  Reads the first config.eval.num_reference examples (0: all) of the split, runs the Inception
  network of config.eval.inception_weights over them and writes config.eval.reference (else
  <workdir>/reference_stats.npz); the module docstring lists its arrays. An existing file is
  reused, not recomputed, when its description (source, name, split, data_dir, image_size,
  channels, count) equals the config's; one that describes other data, or has no description,
  raises ValueError and is left alone.

  Returns {'reference': path, 'description', 'count' (images behind the statistics),
  'pr_features' (images kept for precision/recall), 'inception_weights', 'health'
  ({'saturated_fraction', 'mean_image_std'} of the images, None for an older file), 'reused',
  'seconds'}.
  Raises FileNotFoundError naming the expected weight files when they are missing.
  """
  config_lib.validate(config)
  start = time.perf_counter()
  weights = inception_weights_file(config)
  ref, reused = load_or_compute(config, workdir, weights, allow_external=False)
  return dict(ref.summary(), reused=reused, seconds=time.perf_counter() - start)
