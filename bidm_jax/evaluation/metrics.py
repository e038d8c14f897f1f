"""Sample-quality metrics on Inception features: FID, sFID, Inception Score, precision/recall.

They follow the guided-diffusion evaluator (``evaluations/evaluator.py``):

* FID / sFID: Frechet distance between Gaussians fitted to the 2048-d ``pool`` features / the
  2023-d ``spatial`` features (first 7 channels of ``mixed_6/conv``); statistics are float64.
* Inception Score: from the 1008-way logits of the Inception classifier (without its bias, as
  guided-diffusion and torch-fidelity), over ``splits`` equal parts.
* Improved precision and recall (Kynkaanniemi et al. 2019) with k=3 nearest-neighbour balls;
  squared distances are computed in float32 in JAX, block by block, so 50k x 50k fits a GPU.

Features come from `featurizer.Featurizer`; :func:`compute_metrics` gathers the metrics of
samples against a `ref_stats.Reference`.

Next to them, :func:`image_health` (and its streaming form :class:`ImageHealth`) describes the
uint8 images themselves: the fraction of pixel values at 0 or 255 and the mean per-image
standard deviation, which expose saturated or flat samples that FID alone only hints at.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bidm_jax.evaluation.inception import POOL_DIM

if TYPE_CHECKING:
  from bidm_jax.evaluation.ref_stats import Reference

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "knn_radii",
    "HEALTH_KEYS",
    "ImageHealth",
    "image_health",
    "compute_metrics",
]

PR_K = 3
IS_SPLITS = 10
HEALTH_KEYS = ("saturated_fraction", "mean_image_std")  # the values of ImageHealth.result()


def frechet_distance(mu1, sigma1, mu2, sigma2, *, features2=None) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64: FID and sFID.

  ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``. The covariances are
  symmetric positive semi-definite, so sigma1 sigma2 is similar to the symmetric
  S = sigma1^(1/2) sigma2 sigma1^(1/2), and the trace of its square root is the sum of the
  square roots of S's eigenvalues: two symmetric eigendecompositions, about 4x faster than
  TTUR's general ``scipy.linalg.sqrtm`` at D = 2048 and equal to it to rounding, with no
  singular case (eigenvalues below 0 by rounding count as 0). Given the features behind
  (mu2, sigma2) and fewer of them than D (smoke tests), the eigenvalues come instead from the
  (n, n) matrix X sigma1 X^T / (n - 1), X the centred features, at O(n D^2).

  Args:
    mu1, mu2: (D,) means.
    sigma1, sigma2: (D, D) covariances.
    features2: optional (n, D) features whose mean and covariance are mu2 and sigma2.
  Returns:
    the distance as a Python float.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"means have different shapes: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match means {mu1.shape}")
  diff = mu1 - mu2
  if features2 is not None and 2 <= len(features2) <= mu1.shape[0]:
    x = np.asarray(features2, np.float64)
    x = x - x.mean(axis=0)
    product = (x @ sigma1 @ x.T) / (len(x) - 1)
  else:
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    half = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    product = half @ sigma2 @ half
  eig = np.linalg.eigvalsh((product + product.T) / 2)
  trace_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


class FeatureStats:
  """Mean and covariance of features, accumulated batch by batch in float64.

  Sums are taken around a shift (the first batch's mean) to avoid cancellation. ``cov`` is the
  unbiased sample covariance (``np.cov(features, rowvar=False)``).

  Example::

      stats = FeatureStats(2048)
      for batch in batches:
          stats.update(features(batch)["pool"])
      stats.save("ref_pool.npz")
  """

  def __init__(self, dim: int):
    self.dim = int(dim)
    self.count = 0
    self._shift = np.zeros(self.dim)
    self._sum = np.zeros(self.dim)
    self._sum_outer = np.zeros((self.dim, self.dim))
    self._can_update = True

  @classmethod
  def from_features(cls, features) -> "FeatureStats":
    """Statistics of (N, D) features."""
    features = np.asarray(features)
    if features.ndim != 2:
      raise ValueError(f"expected features of shape (N, D), got {features.shape}")
    return cls(features.shape[1]).update(features)

  @classmethod
  def from_moments(cls, mean, cov, count: int | None = None) -> "FeatureStats":
    """Statistics with a given (D,) mean and (D, D) covariance.

    ``count`` is the number of samples behind them; without it, :meth:`update` is refused.
    """
    mean = np.asarray(mean, np.float64)
    cov = np.asarray(cov, np.float64)
    if mean.ndim != 1 or cov.shape != (mean.shape[0],) * 2:
      raise ValueError(f"mean {mean.shape} and covariance {cov.shape} do not match")
    stats = cls(mean.shape[0])
    stats.count = 2 if count is None else int(count)
    if stats.count < 2:
      raise ValueError(f"count must be at least 2, got {count}")
    stats._shift = mean.copy()
    stats._sum_outer = cov * (stats.count - 1)
    stats._can_update = count is not None
    return stats

  def update(self, features) -> "FeatureStats":
    """Add a (B, D) batch; returns self."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"expected features of shape (B, {self.dim}), got {x.shape}")
    if not self._can_update:
      raise ValueError("statistics loaded without a sample count cannot be updated")
    if x.shape[0] == 0:
      return self
    if self.count == 0:
      self._shift = x.mean(axis=0)
    x = x - self._shift
    self.count += x.shape[0]
    self._sum += x.sum(axis=0)
    self._sum_outer += x.T @ x
    return self

  @property
  def mean(self) -> np.ndarray:
    """(D,) float64 mean."""
    if self.count == 0:
      raise ValueError("FeatureStats is empty")
    return self._shift + self._sum / self.count

  @property
  def cov(self) -> np.ndarray:
    """(D, D) float64 unbiased covariance."""
    if self.count < 2:
      raise ValueError(f"covariance needs at least 2 samples, have {self.count}")
    centred = self._sum / self.count
    return (self._sum_outer - self.count * np.outer(centred, centred)) / (self.count - 1)

  def save(self, path: str | Path) -> None:
    """Write ``mu``, ``sigma`` (float64) and ``count`` to an .npz file."""
    np.savez(Path(path), mu=self.mean, sigma=self.cov, count=np.int64(self.count))

  @classmethod
  def load(cls, path: str | Path, suffix: str = "") -> "FeatureStats":
    """Read statistics saved by :meth:`save` or a guided-diffusion reference batch.

    Args:
      path: .npz with ``mu<suffix>`` and ``sigma<suffix>`` (and optionally ``count``), or
        an open binary file of one.
      suffix: '' for the pool statistics; '_s' for the sFID statistics of guided-diffusion
        reference batches (``mu_s``, ``sigma_s``).
    """
    with np.load(path if hasattr(path, "read") else Path(path)) as data:
      keys = (f"mu{suffix}", f"sigma{suffix}")
      if not all(k in data.files for k in keys):
        where = getattr(path, "name", "the file") if hasattr(path, "read") else path
        raise ValueError(f"{where}: needs arrays {keys}, has {data.files}")
      count = int(data["count"]) if "count" in data.files else None
      return cls.from_moments(data[keys[0]], data[keys[1]], count)


@jax.jit
def _log_softmax(logits):
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


@jax.jit
def _split_score(logp):
  """exp(E_x KL(p(y|x) || p(y))) of one split; logp (M, C)."""
  log_marginal = jax.nn.logsumexp(logp, axis=0) - jnp.log(logp.shape[0])
  kl = jnp.sum(jnp.exp(logp) * (logp - log_marginal), axis=1)
  return jnp.exp(jnp.mean(kl))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score from classifier logits.

  Args:
    logits: (N, 1008) logits (``features(...)['logits']``).
    splits: number of equal consecutive parts (as improved-GAN; for N = 50000 this is
      guided-diffusion's split size of 5000).
  Returns:
    (mean, std) of the per-split scores.
  """
  logits = np.asarray(logits)
  if logits.ndim != 2 or logits.shape[0] < splits:
    raise ValueError(f"need (N, C) logits with N >= splits={splits}, got {logits.shape}")
  n = logits.shape[0]
  logp = _log_softmax(logits)
  scores = [
      float(_split_score(logp[i * n // splits : (i + 1) * n // splits])) for i in range(splits)
  ]
  return float(np.mean(scores)), float(np.std(scores))


def _sq_distances(u, v):
  """(R, D), (C, D) -> (R, C) squared Euclidean distances, clamped at 0 (float32)."""
  u = u.astype(jnp.float32)
  v = v.astype(jnp.float32)
  uv = jnp.dot(u, v.T, precision=lax.Precision.HIGHEST)
  d = jnp.sum(u * u, axis=1)[:, None] - 2.0 * uv + jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _knn_step(best, rows, cols, cols_valid, k):
  """Merge a column block into the running k+1 smallest squared distances; best (R, k+1)."""
  d = jnp.where(cols_valid[None, :], _sq_distances(rows, cols), jnp.inf)
  merged = jnp.concatenate([best, d], axis=1)
  return -lax.top_k(-merged, k + 1)[0]


@jax.jit
def _coverage_step(real, real_radii, real_valid, fake, fake_radii, fake_valid):
  """For a (real block, fake block): which reals lie in a fake ball and vice versa."""
  d = _sq_distances(real, fake)
  valid = real_valid[:, None] & fake_valid[None, :]
  real_in = jnp.any((d <= fake_radii[None, :]) & valid, axis=1)
  fake_in = jnp.any((d <= real_radii[:, None]) & valid, axis=0)
  return real_in, fake_in


def _blocks(x: np.ndarray, size: int):
  """Yield (start, padded block (size, D), validity mask (size,)) over the rows of x."""
  for start in range(0, x.shape[0], size):
    block = x[start : start + size]
    valid = np.zeros(size, bool)
    valid[: block.shape[0]] = True
    if block.shape[0] < size:
      block = np.pad(block, [(0, size - block.shape[0]), (0, 0)])
    yield start, block, valid


def knn_radii(
    features, k: int = 3, row_batch_size: int = 10000, col_batch_size: int = 10000
) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour (itself excluded).

  Args:
    features: (N, D).
  Returns:
    (N,) float32 radii, the k-th smallest of each row of the (N, N) squared-distance matrix
    after the zero self-distance (as guided-diffusion's ``ManifoldEstimator``).
  """
  x = np.asarray(features, np.float32)
  n = x.shape[0]
  if n <= k:
    raise ValueError(f"need more than k={k} points, got {n}")
  rb, cb = min(row_batch_size, n), min(col_batch_size, n)
  radii = np.zeros(n, np.float32)
  col_blocks = [(jnp.asarray(b), jnp.asarray(v)) for _, b, v in _blocks(x, cb)]
  for start, rows, _ in _blocks(x, rb):
    rows = jnp.asarray(rows)
    best = jnp.full((rb, k + 1), jnp.inf, jnp.float32)
    for cols, valid in col_blocks:
      best = _knn_step(best, rows, cols, valid, k)
    count = min(rb, n - start)
    radii[start : start + count] = np.asarray(best[:count, k])
  return radii


def precision_recall(
    real_features,
    fake_features,
    k: int = 3,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019), as guided-diffusion.

  Precision: fraction of fake points inside some real point's k-NN ball; recall: fraction of
  real points inside some fake point's k-NN ball (balls closed, radii from :func:`knn_radii`).

  Args:
    real_features: (N1, D) reference features (``pool``).
    fake_features: (N2, D) sample features.
    k: neighbourhood size.
    row_batch_size, col_batch_size: block sizes of the distance matrices (memory knob).
  Returns:
    (precision, recall) as Python floats.
  """
  real = np.asarray(real_features, np.float32)
  fake = np.asarray(fake_features, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature shapes do not match: {real.shape} vs {fake.shape}")
  real_radii = knn_radii(real, k, row_batch_size, col_batch_size)
  fake_radii = knn_radii(fake, k, row_batch_size, col_batch_size)
  rb, cb = min(row_batch_size, real.shape[0]), min(col_batch_size, fake.shape[0])
  real_in = np.zeros(real.shape[0], bool)
  fake_in = np.zeros(fake.shape[0], bool)
  radii_r = np.pad(real_radii, (0, -real.shape[0] % rb))
  radii_f = np.pad(fake_radii, (0, -fake.shape[0] % cb))
  fake_blocks = list(_blocks(fake, cb))
  for rs, rblock, rvalid in _blocks(real, rb):
    r_count = int(rvalid.sum())
    for fs, fblock, fvalid in fake_blocks:
      f_count = int(fvalid.sum())
      r_in, f_in = _coverage_step(
          rblock, radii_r[rs : rs + rb], rvalid, fblock, radii_f[fs : fs + cb], fvalid
      )
      real_in[rs : rs + r_count] |= np.asarray(r_in[:r_count])
      fake_in[fs : fs + f_count] |= np.asarray(f_in[:f_count])
  return float(fake_in.mean()), float(real_in.mean())


class ImageHealth:
  """Saturation and contrast of uint8 images, accumulated batch by batch.

  ``saturated_fraction``: the fraction of all pixel values (every channel of every image)
  equal to 0 or 255; real CIFAR-10 images have about 2 %, a diffusion model whose samples
  are flat saturated colour fields far more. ``mean_image_std``: the standard deviation of
  each image's values (over H, W and C, ddof 0), in uint8 units, averaged over the images.
  Grayscale images give the same numbers as their RGB replication.

  Example::

      health = ImageHealth()
      for batch in batches:
          health.update(to_uint8(batch))
      health.result()  # {'saturated_fraction': ..., 'mean_image_std': ..., 'num_images': N}
  """

  def __init__(self):
    self.num_images = 0
    self._values = 0
    self._saturated = 0
    self._std_sum = 0.0

  def update(self, images) -> "ImageHealth":
    """Add a (B, H, W, C) uint8 batch; returns self."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
      raise ValueError(
          f"image_health needs uint8 images of shape (N, H, W, C) (after the uint8 "
          f"conversion), got {x.dtype} {x.shape}"
      )
    if x.shape[0] == 0:
      return self
    self.num_images += x.shape[0]
    self._values += x.size
    self._saturated += int(np.count_nonzero((x == 0) | (x == 255)))
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    self._std_sum += float(flat.std(axis=1).sum())
    return self

  def result(self) -> dict:
    """{'saturated_fraction', 'mean_image_std', 'num_images'}; the two values are None
    before any image was added."""
    if not self.num_images:
      return {"saturated_fraction": None, "mean_image_std": None, "num_images": 0}
    return {
        "saturated_fraction": self._saturated / self._values,
        "mean_image_std": self._std_sum / self.num_images,
        "num_images": self.num_images,
    }


def image_health(images_uint8) -> dict:
  """{'saturated_fraction', 'mean_image_std', 'num_images'} of (N, H, W, C) uint8 images
  (:class:`ImageHealth`); N >= 1."""
  out = ImageHealth().update(images_uint8).result()
  if not out["num_images"]:
    raise ValueError("image_health needs at least one image")
  return out


def compute_metrics(
    reference: Reference,
    pool: np.ndarray,
    spatial: FeatureStats,
    logits: np.ndarray | None,
    spatial_features: np.ndarray | None = None,
    weights_name: str = "",
) -> tuple[dict, list[str]]:
  """FID, sFID, Inception Score and precision/recall of sample features against a reference.

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
  ref = reference.pool
  out: dict[str, Any] = {
      "fid": frechet_distance(ref.mean, ref.cov, pool_stats.mean, pool_stats.cov, features2=pool)
  }
  if reference.spatial is not None:
    ref = reference.spatial
    out["sfid"] = frechet_distance(
        ref.mean, ref.cov, spatial.mean, spatial.cov, features2=spatial_features
    )
  else:
    out["sfid"] = None
    notes.append("sfid: the reference has no spatial statistics (mu_s, sigma_s)")
  if logits is not None:
    splits = min(IS_SPLITS, len(logits))
    out["inception_score"], out["inception_score_std"] = inception_score(logits, splits)
    if splits != IS_SPLITS:
      notes.append(f"inception_score: {splits} splits (fewer samples than {IS_SPLITS})")
  else:
    out["inception_score"] = out["inception_score_std"] = None
    which = f"the Inception weights {weights_name}" if weights_name else "the Inception weights"
    notes.append(
        f"inception_score: {which} have no classifier ('fc'); use pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth for IS"
    )
  pr = reference.pr_features
  if pr is None or len(pr) <= PR_K or len(pool) <= PR_K:
    out["precision"] = out["recall"] = None
    notes.append(
        f"precision/recall: need more than k={PR_K} reference features (pr_features) and samples"
    )
  else:
    out["precision"], out["recall"] = precision_recall(pr, pool, k=PR_K)
  if len(pool) < POOL_DIM:
    notes.append(
        f"{len(pool)} samples < {POOL_DIM} feature dimensions: the covariances are "
        "singular and FID/sFID are only smoke-test values"
    )
  return out, notes
