"""The `evaluate` mode: FID / sFID / IS / precision-recall of a trained model's samples (the
guided-diffusion evaluator's metrics).

:func:`evaluate` loads the trained model (`config.sampling.checkpoint`, else the workdir),
draws `config.eval.num_samples` samples batch by batch (sharded over all devices, the sampler
of `config.sampling`), quantises each batch to uint8 and featurises it at once, so host memory
holds features, not images. It writes `<workdir>/metrics.json`: FID, sFID, Inception Score
(only when the Inception weights carry the classifier), improved precision / recall (k = 3),
the image health of the samples and of the reference (`metrics.image_health`: the fraction of
pixel values at 0 or 255, the mean per-image standard deviation), the number of samples,
sampler, steps and x0 options, checkpoint and step, the reference and its description, and the
Inception weight file. The reference comes from `ref_stats.load_or_compute`, computed on the fly
when its file does not exist yet.

With config.eval.samples set, it evaluates that file's images instead of sampling a model: an
.npz of uint8 (N, H, W, C) images under the key 'images' (what `--mode=sample` and
`keep_samples` write) or 'arr_0' (the guided-diffusion evaluator's sample batches), e.g. samples
drawn on another machine, where the Inception weights cannot go.

Grayscale data (`config.data.channels == 1`, e.g. the digits demo) is replicated to three
channels before the Inception network. On several hosts every host featurises every sample on
its own devices (features are identical on all hosts); process 0 writes the files.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import time

import jax
import numpy as np

from bidm_jax import config as config_lib
from bidm_jax import sampling
from bidm_jax.data.preprocess import to_uint8
from bidm_jax.evaluation import ref_stats as ref_stats_lib
from bidm_jax.evaluation.featurizer import get_featurizer, inception_batch_size
from bidm_jax.evaluation.inception import SPATIAL_DIM
from bidm_jax.evaluation.inception_weights import inception_weights_file
from bidm_jax.evaluation.metrics import (
    HEALTH_KEYS,
    PR_K,
    FeatureStats,
    ImageHealth,
    compute_metrics,
)
from bidm_jax.io import files

__all__ = ["METRICS_FILE", "SAMPLES_FILE", "evaluate", "load_samples"]

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "eval_samples.npz"


def evaluate(config, workdir: str) -> dict:
  """FID, sFID, IS and precision/recall of config.eval.num_samples samples; writes
  <workdir>/metrics.json (and <workdir>/eval_samples.npz when config.eval.keep_samples).

  The model comes from config.sampling.checkpoint, else the workdir (`sampling.load_model`:
  an exported folder or a training workdir, whose EMA parameters are used; with
  config.sampling.engine 'packed', a --mode=export file or a folder holding it), checked
  against the config's model and binarization method. Samples are drawn with
  config.sampling's sampler, steps and eta in batches of config.eval.batch_size (rounded up to
  the device count), seeded by config.seed (`sampling.sample_batches`); each batch is
  quantised to uint8, as saved images would be, and featurised at once, in Inception calls
  of at most config.eval.inception_batch_size images. The reference is
  config.eval.reference (else <workdir>/reference_stats.npz), computed from config.data first
  when the file is missing; a reference written by ref_stats must describe config.data.
  With config.eval.samples, the first num_samples images of that file (`load_samples`) are
  evaluated instead, no model is loaded, and the fields that describe sampling are None.

  Returns the metrics dict written to metrics.json: fid, sfid, inception_score(_std) (None
  without the classifier), precision, recall, saturated_fraction, mean_image_std (of the uint8
  samples, `metrics.image_health`), pr_k, num_samples, sampler, steps, eta, clip_x0,
  dynamic_threshold, seed, method, checkpoint, checkpoint_step, use_ema, reference,
  reference_description, reference_count, reference_pr_features,
  reference_saturated_fraction, reference_mean_image_std (None, with a note, for a reference
  file without them), inception_weights, images_per_s, seconds (seconds_sampling: sampling
  and featurising; seconds_metrics: the statistics after it), samples_file, samples (the
  evaluated file, or None), notes.
  """
  config_lib.validate(config)
  start = time.perf_counter()
  e, s = config.eval, config.sampling
  weights = inception_weights_file(config)  # fail before loading or sampling anything

  num = e.num_samples
  if e.samples:
    images = load_samples(e.samples, num, config.data)
    source, method, step = None, None, None
    batches = ((images[i : i + e.batch_size], float("nan")) for i in range(0, num, e.batch_size))
  else:
    source = s.checkpoint or workdir
    model, params, meta = sampling.load_model(config, source)
    method, step = model.method.name, meta.get("step")  # step: None for an export
    batches = (
        (to_uint8(b.images), b.images_per_s)
        for b in sampling.sample_batches(
            config,
            model,
            params,
            num,
            seed=config.seed,
            batch_size=e.batch_size,
            desc="evaluate",
            progress_bar=e.progress_bar,
        )
    )

  reference, _ = ref_stats_lib.load_or_compute(config, workdir, weights, allow_external=True)
  featurizer = get_featurizer(weights, inception_batch_size(e))

  spatial = FeatureStats(SPATIAL_DIM)
  health = ImageHealth()
  pool_parts, logit_parts, spatial_parts, kept = [], [], [], []
  keep_spatial = num < SPATIAL_DIM
  rate = float("nan")
  for images, rate in batches:
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

  sampled = time.perf_counter()
  pool = np.concatenate(pool_parts)
  logits = np.concatenate(logit_parts) if logit_parts else None
  values, notes = compute_metrics(
      reference,
      pool,
      spatial,
      logits,
      np.concatenate(spatial_parts) if keep_spatial else None,
      weights.name,
  )
  metrics_done = time.perf_counter()
  if reference.description is None:
    notes.append(f"reference {reference.path} has no data description (external file)")
  values.update({k: health.result()[k] for k in HEALTH_KEYS})
  ref_health = reference.health or {}
  values.update({f"reference_{k}": ref_health.get(k) for k in HEALTH_KEYS})
  if reference.health is None:
    notes.append(
        f"reference {reference.path} has no image health ({', '.join(HEALTH_KEYS)}); "
        "recompute it with --mode=ref_stats into a new file to get them"
    )

  files.makedirs(workdir)
  samples_file = os.path.join(workdir, SAMPLES_FILE) if e.keep_samples else None
  result = dict(
      values,
      pr_k=PR_K,
      num_samples=int(len(pool)),
      **_sampling_fields(config, source, method, step),
      reference=reference.path,
      reference_description=reference.description,
      reference_count=reference.count,
      reference_pr_features=None if reference.pr_features is None else len(reference.pr_features),
      inception_weights=str(weights),
      images_per_s=rate if math.isfinite(rate) else None,
      seconds=time.perf_counter() - start,
      seconds_sampling=sampled - start,
      seconds_metrics=metrics_done - sampled,
      samples_file=samples_file,
      samples=e.samples or None,
      notes=notes,
  )
  if jax.process_index() == 0:
    if samples_file:
      files.write_npz(samples_file, images=np.concatenate(kept))
    files.write_json(os.path.join(workdir, METRICS_FILE), result)
  return result


def _sampling_fields(config, source, method, step) -> dict:
  """How the samples were drawn; all None for samples read from config.eval.samples."""
  s = config.sampling
  ddim = s.sampler == "ddim"
  fields = dict(
      sampler=s.sampler,
      steps=int(s.steps if ddim else config.diffusion.num_timesteps),
      eta=float(s.eta) if ddim else None,
      clip_x0=bool(s.clip_x0),
      dynamic_threshold=float(s.dynamic_threshold),
      seed=int(config.seed),
      method=method,
      checkpoint=None if source is None else str(source),
      checkpoint_step=step,
      use_ema=bool(s.use_ema),
  )
  return fields if source is not None else dict.fromkeys(fields)


def load_samples(path: str, num: int, data_config) -> np.ndarray:
  """The first `num` images (num, H, W, C) uint8 of an .npz of samples (key 'images', else
  'arr_0'), checked against data_config's image_size and channels; ValueError otherwise."""
  if not files.exists(path):
    raise ValueError(f"eval.samples: {path} does not exist")
  try:
    data = np.load(io.BytesIO(files.read_bytes(path)))
  except (OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
    raise ValueError(f"eval.samples: {path} is not a readable .npz ({err})") from err
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"eval.samples: {path} is a single .npy array, not an .npz")
  with data:
    key = next((k for k in ("images", "arr_0") if k in data.files), None)
    if key is None:
      raise ValueError(
          f"eval.samples: {path} has no 'images' or 'arr_0' array (it has {data.files})"
      )
    images = data[key]
  size, channels = data_config.image_size, data_config.channels
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, channels):
    raise ValueError(
        f"eval.samples: {path}[{key!r}] is {images.dtype} {images.shape}; expected uint8 "
        f"(N, {size}, {size}, {channels}) to match config.data"
    )
  if len(images) < num:
    raise ValueError(
        f"eval.samples: {path} holds {len(images)} images, eval.num_samples asks for {num}; "
        "lower eval.num_samples or draw more samples"
    )
  return images[:num]
