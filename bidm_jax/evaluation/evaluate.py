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

Grayscale data (`config.data.channels == 1`, e.g. the digits demo) is replicated to three
channels before the Inception network. On several hosts every host featurises every sample on
its own devices (features are identical on all hosts); process 0 writes the files.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from bidm_jax import config as config_lib
from bidm_jax import sampling
from bidm_jax.data.preprocess import to_uint8
from bidm_jax.evaluation import ref_stats as ref_stats_lib
from bidm_jax.evaluation.featurizer import get_featurizer
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

__all__ = ["METRICS_FILE", "SAMPLES_FILE", "evaluate"]

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
  quantised to uint8, as saved images would be, and featurised at once. The reference is
  config.eval.reference (else <workdir>/reference_stats.npz), computed from config.data first
  when the file is missing; a reference written by ref_stats must describe config.data.

  Returns the metrics dict written to metrics.json: fid, sfid, inception_score(_std) (None
  without the classifier), precision, recall, saturated_fraction, mean_image_std (of the uint8
  samples, `metrics.image_health`), pr_k, num_samples, sampler, steps, eta, clip_x0,
  dynamic_threshold, seed, method, checkpoint, checkpoint_step, use_ema, reference,
  reference_description, reference_count, reference_pr_features,
  reference_saturated_fraction, reference_mean_image_std (None, with a note, for a reference
  file without them), inception_weights, images_per_s, seconds (seconds_sampling: sampling
  and featurising; seconds_metrics: the statistics after it), samples_file, notes.
  """
  config_lib.validate(config)
  start = time.perf_counter()
  e, s = config.eval, config.sampling
  weights = inception_weights_file(config)  # fail before loading or sampling anything

  source = s.checkpoint or workdir
  model, params, meta = sampling.load_model(config, source)
  step = meta.get("step")  # the verified step load_params read; None for an export

  reference, _ = ref_stats_lib.load_or_compute(config, workdir, weights, allow_external=True)
  featurizer = get_featurizer(weights, e.batch_size)

  num = e.num_samples
  spatial = FeatureStats(SPATIAL_DIM)
  health = ImageHealth()
  pool_parts, logit_parts, spatial_parts, kept = [], [], [], []
  keep_spatial = num < SPATIAL_DIM
  rate = float("nan")
  for batch in sampling.sample_batches(
      config,
      model,
      params,
      num,
      seed=config.seed,
      batch_size=e.batch_size,
      desc="evaluate",
      progress_bar=e.progress_bar,
  ):
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
      sampler=s.sampler,
      steps=int(s.steps if s.sampler == "ddim" else config.diffusion.num_timesteps),
      eta=float(s.eta) if s.sampler == "ddim" else None,
      clip_x0=bool(s.clip_x0),
      dynamic_threshold=float(s.dynamic_threshold),
      seed=int(config.seed),
      method=model.method.name,
      checkpoint=str(source),
      checkpoint_step=step,
      use_ema=bool(s.use_ema),
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
      notes=notes,
  )
  if jax.process_index() == 0:
    if samples_file:
      files.write_npz(samples_file, images=np.concatenate(kept))
    files.write_json(os.path.join(workdir, METRICS_FILE), result)
  return result
