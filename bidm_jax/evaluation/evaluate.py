"""Sample-quality evaluation: reference statistics of a dataset, and FID / sFID / IS /
precision-recall of a trained model's samples (the guided-diffusion evaluator's metrics).

Two entry points, the command-line modes `ref_stats` and `evaluate`:

* :func:`ref_stats` reads the dataset of `config.data` once (the first `config.eval.num_reference`
  examples, or all), runs the FID Inception-v3 on it and writes one `.npz`
  (`config.eval.reference`, else `<workdir>/reference_stats.npz`) holding

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

  `FeatureStats.load(path)` / `FeatureStats.load(path, '_s')` read the statistics. An existing
  file is reused when its description equals the config's, and never overwritten otherwise.

* :func:`evaluate` loads the trained model (`config.sampling.checkpoint`, else the workdir),
  draws `config.eval.num_samples` samples batch by batch (sharded over all devices, the sampler
  of `config.sampling`), quantises each batch to uint8 and featurises it at once, so host
  memory holds features, not images. It writes `<workdir>/metrics.json`: FID, sFID, Inception
  Score (only when the Inception weights carry the classifier), improved precision / recall
  (k = 3), the image health of the samples and of the reference (`metrics.image_health`: the
  fraction of pixel values at 0 or 255, the mean per-image standard deviation), the number of
  samples, sampler, steps and x0 options, checkpoint and step, the reference and its
  description, and the Inception weight file. The reference is computed on the fly (as
  `ref_stats`) when its file does not exist yet.

Grayscale data (`config.data.channels == 1`, e.g. the digits demo) is replicated to three
channels before the Inception network, for the reference and the samples alike.

On several hosts every host reads the whole reference dataset and featurises every sample on
its own devices (features are identical on all hosts); process 0 writes the files.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from bidm_jax import config as config_lib
from bidm_jax import data as data_lib
from bidm_jax import sampling
from bidm_jax.data.preprocess import to_uint8
from bidm_jax.evaluation import inception as inception_lib
from bidm_jax.evaluation import metrics as metrics_lib
from bidm_jax.evaluation.metrics import FeatureStats, ImageHealth
from bidm_jax.io import files

__all__ = [
    "METRICS_FILE",
    "REFERENCE_FILE",
    "SAMPLES_FILE",
    "PR_K",
    "Featurizer",
    "Reference",
    "compute_metrics",
    "data_description",
    "evaluate",
    "inception_weights_file",
    "ref_stats",
    "reference_path",
    "to_rgb",
]

REFERENCE_FILE = "reference_stats.npz"
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "eval_samples.npz"
PR_K = 3
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * inception_lib.SPATIAL_CHANNELS
IS_SPLITS = 10
HEALTH_KEYS = ("saturated_fraction", "mean_image_std")


# ---------------------------------------------------------------------------------------------
# Inception weights and features.


def inception_weights_file(config) -> Path:
  """The FID Inception weight file named by config.eval.inception_weights (a file or a folder).

  Raises FileNotFoundError naming the expected files when the field is empty or nothing is
  there; checked before any model is loaded or sample drawn.
  """
  value = config.eval.inception_weights
  if not value:
    raise _weights_error("config.eval.inception_weights is empty: set it to the FID Inception "
                         "weight file or a folder holding one")
  path = Path(value).expanduser()
  if path.is_dir():
    found = [path / name for name in inception_lib.WEIGHT_FILES if (path / name).is_file()]
    if not found:
      raise _weights_error(f"config.eval.inception_weights: no FID Inception weights in folder "
                           f"{path}")
    return found[0]
  if not path.is_file():
    raise _weights_error(f"config.eval.inception_weights: {path} does not exist")
  return path


def _weights_error(problem: str) -> FileNotFoundError:
  help_text = inception_lib._WEIGHT_HELP  # pylint: disable=protected-access
  if not all(name in help_text for name in inception_lib.WEIGHT_FILES):
    help_text = f"expected one of {', '.join(inception_lib.WEIGHT_FILES)}; {help_text}"
  return FileNotFoundError(f"{problem}; {help_text}")


def to_rgb(images: np.ndarray) -> np.ndarray:
  """(N, H, W, 1 or 3) -> (N, H, W, 3): grayscale is replicated to three channels."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected images of shape (N, H, W, 1 or 3), got {images.shape}")
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


class Featurizer:
  """FID Inception features of uint8 images, in fixed batches sharded over this host's devices.

  `featurizer(images)`: images (N, H, W, 1 or 3) uint8 in [0, 255] -> numpy float32
  {'pool': (N, 2048), 'spatial': (N, 2023)[, 'logits': (N, 1008)]}; logits only when the
  weights have the classifier (`with_logits`). The last batch is padded, so there is one
  compilation per image size.
  """

  def __init__(self, weights: str | Path, batch_size: int, devices=None):
    params = inception_lib.load_inception_params(weights)
    self.weights = Path(weights)
    self.with_logits = "fc" in params
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("data",))
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    self._data = NamedSharding(mesh, P("data"))
    self._params = jax.device_put(params, NamedSharding(mesh, P()))
    model = inception_lib.InceptionV3(with_logits=self.with_logits)
    self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x), out_shardings=self._data)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    images = to_rgb(np.asarray(images))
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, images.shape[0], self.batch_size):
      batch = images[start:start + self.batch_size]
      count = batch.shape[0]
      if count < self.batch_size:
        batch = np.pad(batch, [(0, self.batch_size - count)] + [(0, 0)] * 3)
      out = self._apply(self._params, jax.device_put(batch, self._data))
      for k, v in out.items():
        chunks.setdefault(k, []).append(np.asarray(v)[:count])
    if not chunks:
      dims = {"pool": POOL_DIM, "spatial": SPATIAL_DIM}
      if self.with_logits:
        dims["logits"] = inception_lib.NUM_CLASSES
      return {k: np.zeros((0, d), np.float32) for k, d in dims.items()}
    return {k: np.concatenate(v) for k, v in chunks.items()}


_FEATURIZERS: dict[tuple, Featurizer] = {}


def get_featurizer(weights: Path, batch_size: int) -> Featurizer:
  """A Featurizer, cached per (weight file, batch size, devices): one compile per process."""
  key = (str(weights.resolve()), weights.stat().st_mtime_ns, batch_size,
         tuple(d.id for d in jax.local_devices()))
  if key not in _FEATURIZERS:
    _FEATURIZERS.clear()  # hold one set of Inception parameters on the devices at most
    _FEATURIZERS[key] = Featurizer(weights, batch_size)
  return _FEATURIZERS[key]


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
    self.rows[self.seen:self.seen + fill] = x[:fill]
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
    return self.rows[:min(self.seen, self.size)]


# ---------------------------------------------------------------------------------------------
# Reference statistics.


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
      spatial = (FeatureStats.load(io.BytesIO(blob), "_s") if {"mu_s", "sigma_s"} <= names
                 else None)
      pr = np.asarray(data["pr_features"], np.float32) if "pr_features" in names else None
      desc = json.loads(str(data["description"])) if "description" in names else None
      weights = str(data["inception_weights"]) if "inception_weights" in names else None
      count = int(data["count"]) if "count" in names else None
      health = ({k: float(data[k]) for k in HEALTH_KEYS} if set(HEALTH_KEYS) <= names
                else None)
    return cls(str(path), pool, count, spatial, pr, desc, weights, health)

  def summary(self) -> dict:
    return {"reference": self.path, "description": self.description, "count": self.count,
            "pr_features": None if self.pr_features is None else len(self.pr_features),
            "inception_weights": self.inception_weights, "health": self.health}


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
  return {"source": d.source, "name": name, "split": split, "data_dir": data_dir,
          "image_size": int(d.image_size), "channels": int(d.channels), "count": int(count)}


def _check_description(found: Mapping[str, Any] | None, expected: Mapping[str, Any],
                       path: Path) -> None:
  if found is None:
    raise ValueError(f"reference {path} exists but holds no data description (not written by "
                     "ref_stats); refusing to overwrite it: delete it or set "
                     "config.eval.reference to another path")
  diffs = [f"{k}: file {found.get(k)!r} vs config {expected.get(k)!r}"
           for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
  if diffs:
    raise ValueError(
        f"reference {path} describes other data ({'; '.join(diffs)}); set config.data / "
        "config.eval.num_reference to the data it describes, or config.eval.reference to "
        "another path (an existing reference is never overwritten)")


def _compute_reference(config, featurizer: Featurizer, path: Path, description: dict,
                       progress_bar: bool) -> tuple[Reference, int]:
  """One pass over the reference data; returns (Reference, skipped undecodable files)."""
  count = description["count"]
  # Every host reads the whole reference: the features (and so the file) are the same on all.
  it = data_lib.make_eval_iterator(config.data, batch_size=featurizer.batch_size,
                                   num_examples=count, process_index=0, process_count=1)
  pool, spatial = FeatureStats(POOL_DIM), FeatureStats(SPATIAL_DIM)
  reservoir = _Reservoir(min(config.eval.pr_reference, count), seed=config.seed)
  health = ImageHealth()
  with tqdm(total=count, desc="reference", unit="img",
            disable=not progress_bar or jax.process_index() != 0) as bar:
    for batch in it:
      health.update(batch["image"])
      feats = featurizer(batch["image"])
      pool.update(feats["pool"])
      spatial.update(feats["spatial"])
      reservoir.add(feats["pool"])
      bar.update(len(batch["image"]))
  if pool.count < 2:
    raise ValueError(f"reference: {pool.count} usable images in {description}; need at least 2")
  ref = Reference(str(path), pool, pool.count, spatial, reservoir.result(), dict(description),
                  featurizer.weights.name, {k: health.result()[k] for k in HEALTH_KEYS})
  return ref, it.skipped


def _write_reference(ref: Reference, path: Path, skipped: int) -> None:
  """Writes the reference npz atomically (files.write_bytes)."""
  files.write_npz(path, mu=ref.pool.mean, sigma=ref.pool.cov, count=np.int64(ref.pool.count),
                  mu_s=ref.spatial.mean, sigma_s=ref.spatial.cov,
                  pr_features=ref.pr_features.astype(np.float32),
                  description=np.array(json.dumps(ref.description, sort_keys=True)),
                  inception_weights=np.array(ref.inception_weights or ""),
                  skipped=np.int64(skipped),
                  **{k: np.float64(v) for k, v in (ref.health or {}).items()})


def _expected_description(config, *, need_count: bool) -> dict:
  """data_description of the config; without the dataset at hand (need_count False), the
  description without 'count'."""
  try:
    return data_description(config, _num_reference(config))
  except FileNotFoundError as e:  # DatasetNotPreparedError too
    if need_count:
      raise
    logging.warning("reference data not readable (%s); checking the reference's description "
                    "without its count", e)
    desc = data_description(config, 0)
    del desc["count"]
    return desc


def _reference(config, workdir: str, weights: Path, *,
               allow_external: bool) -> tuple[Reference, bool]:
  """(Reference, reused).

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
      logging.warning("reference %s was computed with %s; samples are featurised with %s",
                      path, ref.inception_weights, weights.name)
    return ref, True
  description = _expected_description(config, need_count=True)
  featurizer = get_featurizer(weights, config.eval.batch_size)
  ref, skipped = _compute_reference(config, featurizer, path, description,
                                    config.eval.progress_bar)
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
  ref, reused = _reference(config, workdir, weights, allow_external=False)
  return dict(ref.summary(), reused=reused, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Metrics.


def frechet_distance(reference: FeatureStats, samples: FeatureStats,
                     sample_features: np.ndarray | None = None) -> float:
  """Frechet distance between reference and sample statistics.

  With fewer samples than feature dimensions (smoke tests) and their features given, the trace
  term tr((S_r S_s)^(1/2)) is computed exactly from the small (n, n) matrix
  X S_r X^T / (n - 1) (X the centred sample features), whose non-zero eigenvalues are those of
  S_r S_s; this equals the (D, D) matrix square root of `metrics.frechet_distance` up to
  rounding, at O(n D^2) instead of O(D^3). Otherwise it is `metrics.frechet_distance`.
  """
  n = samples.count
  if sample_features is None or n > reference.dim or n < 2:
    return reference.frechet_distance(samples)
  x = np.asarray(sample_features, np.float64)
  x = x - x.mean(axis=0)
  sigma_r = reference.cov
  small = (x @ sigma_r @ x.T) / (n - 1)
  eig = np.linalg.eigvalsh((small + small.T) / 2)
  trace_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
  diff = reference.mean - samples.mean
  return float(diff @ diff + np.trace(sigma_r) + np.trace(samples.cov) - 2.0 * trace_sqrt)


def compute_metrics(reference: Reference, pool: np.ndarray, spatial: FeatureStats,
                    logits: np.ndarray | None, spatial_features: np.ndarray | None = None,
                    weights_name: str = "") -> tuple[dict, list[str]]:
  """Metrics of sample features against a reference.

  Args:
    reference: the reference statistics.
    pool: (N, 2048) sample pool features (FID, precision/recall).
    spatial: FeatureStats of the sample spatial features (sFID).
    logits: (N, 1008) classifier logits, or None when the Inception weights have no classifier.
    spatial_features: the (N, 2023) spatial features when N < 2023 (exact small-N sFID path).
    weights_name: the weight file, for the notes.
  Returns:
    ({'fid', 'sfid', 'inception_score', 'inception_score_std', 'precision', 'recall'} with None
    for what cannot be computed, a list of notes saying why).
  """
  notes = []
  pool_stats = FeatureStats.from_features(pool)
  out: dict[str, Any] = {"fid": frechet_distance(reference.pool, pool_stats, pool)}
  if reference.spatial is not None:
    out["sfid"] = frechet_distance(reference.spatial, spatial, spatial_features)
  else:
    out["sfid"] = None
    notes.append("sfid: the reference has no spatial statistics (mu_s, sigma_s)")
  if logits is not None:
    splits = min(IS_SPLITS, len(logits))
    out["inception_score"], out["inception_score_std"] = metrics_lib.inception_score(logits,
                                                                                     splits)
    if splits != IS_SPLITS:
      notes.append(f"inception_score: {splits} splits (fewer samples than {IS_SPLITS})")
  else:
    out["inception_score"] = out["inception_score_std"] = None
    which = f"the Inception weights {weights_name}" if weights_name else "the Inception weights"
    notes.append(f"inception_score: {which} have no classifier ('fc'); use pytorch-fid's "
                 "pt_inception-2015-12-05-6726825d.pth for IS")
  pr = reference.pr_features
  if pr is None or len(pr) <= PR_K or len(pool) <= PR_K:
    out["precision"] = out["recall"] = None
    notes.append(f"precision/recall: need more than k={PR_K} reference features (pr_features) "
                 "and samples")
  else:
    out["precision"], out["recall"] = metrics_lib.precision_recall(pr, pool, k=PR_K)
  if len(pool) < POOL_DIM:
    notes.append(f"{len(pool)} samples < {POOL_DIM} feature dimensions: the covariances are "
                 "singular and FID/sFID are only smoke-test values")
  return out, notes


# ---------------------------------------------------------------------------------------------
# Evaluation of a trained model.


def evaluate(config, workdir: str) -> dict:
  """FID, sFID, IS and precision/recall of config.eval.num_samples samples; writes
  <workdir>/metrics.json (and <workdir>/eval_samples.npz when config.eval.keep_samples).

  The model comes from config.sampling.checkpoint, else the workdir (`sampling.load_model`:
  an exported folder or a training workdir, whose EMA parameters are used; with
  config.sampling.engine 'packed', a --mode=export file or a folder holding it), checked
  against the config's model and binarization method. Samples are drawn with
  config.sampling's sampler, steps and eta in batches of config.eval.batch_size (rounded up to
  the device count), seeded by config.seed (`sampling.sample_batches`); each batch is
  quantised to uint8, as saved images would be, and featurised at once. The reference is
  config.eval.reference (else <workdir>/reference_stats.npz), computed from config.data first
  when the file is missing; a reference written by ref_stats must describe config.data.

  Returns the metrics dict written to metrics.json: fid, sfid, inception_score(_std) (None
  without the classifier), precision, recall, saturated_fraction, mean_image_std (of the uint8
  samples, `metrics.image_health`), pr_k, num_samples, sampler, steps, eta, clip_x0,
  dynamic_threshold, seed, method, checkpoint, checkpoint_step, reference,
  reference_description, reference_count, reference_pr_features,
  reference_saturated_fraction, reference_mean_image_std (None, with a note, for a reference
  file without them), inception_weights, images_per_s, seconds, samples_file, notes.
  """
  config_lib.validate(config)
  start = time.perf_counter()
  e, s = config.eval, config.sampling
  weights = inception_weights_file(config)  # fail before loading or sampling anything

  source = s.checkpoint or workdir
  model, params, meta = sampling.load_model(config, source)
  step = meta.get("step")  # the verified step load_params read; None for an export

  reference, _ = _reference(config, workdir, weights, allow_external=True)
  featurizer = get_featurizer(weights, e.batch_size)

  num = e.num_samples
  spatial = FeatureStats(SPATIAL_DIM)
  health = ImageHealth()
  pool_parts, logit_parts, spatial_parts, kept = [], [], [], []
  keep_spatial = num < SPATIAL_DIM
  rate = float("nan")
  for batch in sampling.sample_batches(config, model, params, num, seed=config.seed,
                                       batch_size=e.batch_size, desc="evaluate",
                                       progress_bar=e.progress_bar):
    rate = batch.images_per_s
    images = to_uint8(batch.images)
    health.update(images)
    feats = featurizer(images)
    pool_parts.append(feats["pool"])
    spatial.update(feats["spatial"])
    if keep_spatial:
      spatial_parts.append(feats["spatial"])
    if "logits" in feats:
      logit_parts.append(feats["logits"])
    if e.keep_samples:
      kept.append(images)

  pool = np.concatenate(pool_parts)
  logits = np.concatenate(logit_parts) if logit_parts else None
  values, notes = compute_metrics(reference, pool, spatial, logits,
                                  np.concatenate(spatial_parts) if keep_spatial else None,
                                  weights.name)
  if reference.description is None:
    notes.append(f"reference {reference.path} has no data description (external file)")
  values.update({k: health.result()[k] for k in HEALTH_KEYS})
  ref_health = reference.health or {}
  values.update({f"reference_{k}": ref_health.get(k) for k in HEALTH_KEYS})
  if reference.health is None:
    notes.append(f"reference {reference.path} has no image health ({', '.join(HEALTH_KEYS)}); "
                 "recompute it with --mode=ref_stats into a new file to get them")

  files.makedirs(workdir)
  samples_file = os.path.join(workdir, SAMPLES_FILE) if e.keep_samples else None
  result = dict(
      values, pr_k=PR_K, num_samples=int(len(pool)), sampler=s.sampler,
      steps=int(s.steps if s.sampler == "ddim" else config.diffusion.num_timesteps),
      eta=float(s.eta) if s.sampler == "ddim" else None, clip_x0=bool(s.clip_x0),
      dynamic_threshold=float(s.dynamic_threshold), seed=int(config.seed),
      method=model.method.name, checkpoint=str(source), checkpoint_step=step,
      reference=reference.path, reference_description=reference.description,
      reference_count=reference.count,
      reference_pr_features=None if reference.pr_features is None else len(reference.pr_features),
      inception_weights=str(weights),
      images_per_s=rate if math.isfinite(rate) else None,
      seconds=time.perf_counter() - start, samples_file=samples_file, notes=notes)
  if jax.process_index() == 0:
    if samples_file:
      files.write_npz(samples_file, images=np.concatenate(kept))
    files.write_json(os.path.join(workdir, METRICS_FILE), result)
  return result

