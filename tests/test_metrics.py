"""FID/sFID, Inception Score and precision/recall against closed forms and numpy references."""

import numpy as np
import pytest
from scipy import linalg

from bidm_jax.evaluation import metrics
from bidm_jax.evaluation.metrics import (
    FeatureStats,
    compute_metrics,
    frechet_distance,
    inception_score,
    knn_radii,
    precision_recall,
)
from bidm_jax.evaluation.ref_stats import Reference


def _reference_fd(x, y):
  """TTUR / guided-diffusion FID of two (N, D) feature sets in float64 numpy."""
  mu1, mu2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def _fd(stats, y):
  """frechet_distance of FeatureStats and (N, D) features."""
  other = FeatureStats.from_features(y)
  return frechet_distance(stats.mean, stats.cov, other.mean, other.cov)


def test_frechet_closed_form_diagonal():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
  got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(expected, rel=1e-10)
  assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-10)


def test_frechet_singular_covariances_need_no_offset(recwarn):
  """Rank-deficient covariances (fewer samples than dimensions) give the exact distance with
  no diagonal offset and no warning: here tr(s1 + s2 - 2 (s1 s2)^(1/2)) = 0 and |dmu|^2 = 3."""
  sigma = np.diag([1.0, 0.0, 0.0])
  assert frechet_distance(np.zeros(3), sigma, np.ones(3), sigma) == pytest.approx(3.0, abs=1e-12)
  assert not recwarn.list


def test_frechet_matches_sqrtm_at_inception_size():
  """At D = 2048, covariances of 3,000 and of 1,500 correlated features (the second
  rank-deficient): the eigen form equals TTUR's scipy.linalg.sqrtm to 1e-7 relative (they
  differ by 3e-8, the rounding of a square root of a singular product)."""
  rng = np.random.default_rng(3)
  d = 2048
  mix = rng.standard_normal((d, d)) * 0.05
  x = rng.standard_normal((3000, d)) @ mix
  y = x[:1500] * 1.1 + rng.standard_normal((1500, d)) * 0.3
  assert frechet_distance(
      x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
  ) == pytest.approx(_reference_fd(x, y), rel=1e-7)


def test_fid_matches_numpy_reference_and_streaming():
  rng = np.random.default_rng(1)
  mix = rng.standard_normal((16, 16))
  x = rng.standard_normal((500, 16)) @ mix + 5.0
  y = rng.standard_normal((400, 16)) @ (mix * 1.1) + 5.3
  expected = _reference_fd(x, y)
  assert _fd(FeatureStats.from_features(x), y) == pytest.approx(expected, rel=1e-9)

  streamed = FeatureStats(16)
  for start in range(0, 500, 64):
    streamed.update(x[start : start + 64].astype(np.float32))
  np.testing.assert_allclose(
      streamed.mean, x.astype(np.float32).mean(0, dtype=np.float64), rtol=1e-12
  )
  np.testing.assert_allclose(
      streamed.cov,
      np.cov(x.astype(np.float32).astype(np.float64), rowvar=False),
      rtol=1e-10,
      atol=1e-10,
  )
  assert streamed.count == 500
  x32 = x.astype(np.float32).astype(np.float64)
  assert _fd(streamed, y) == pytest.approx(_reference_fd(x32, y), rel=1e-9)


def test_feature_stats_save_load(tmp_path):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((50, 5))
  stats = FeatureStats.from_features(x[:30])
  stats.save(tmp_path / "s.npz")
  loaded = FeatureStats.load(tmp_path / "s.npz")
  np.testing.assert_allclose(loaded.mean, stats.mean, rtol=1e-12)
  np.testing.assert_allclose(loaded.cov, stats.cov, rtol=1e-12)
  loaded.update(x[30:])
  np.testing.assert_allclose(loaded.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)

  np.savez(
      tmp_path / "ref.npz", mu=np.zeros(5), sigma=np.eye(5), mu_s=np.ones(3), sigma_s=2 * np.eye(3)
  )
  spatial = FeatureStats.load(tmp_path / "ref.npz", suffix="_s")
  np.testing.assert_array_equal(spatial.mean, np.ones(3))
  np.testing.assert_array_equal(spatial.cov, 2 * np.eye(3))
  with pytest.raises(ValueError, match="cannot be updated"):
    spatial.update(np.ones((2, 3)))


def _reference_is(logits, splits):
  """improved-GAN / guided-diffusion formula on softmax probabilities, float64."""
  z = logits - logits.max(1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  scores = []
  n = len(p)
  for i in range(splits):
    part = p[i * n // splits : (i + 1) * n // splits]
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  return np.mean(scores), np.std(scores)


def test_inception_score():
  assert inception_score(np.zeros((20, 1008)), splits=2)[0] == pytest.approx(1.0, abs=1e-5)
  confident = 50.0 * np.eye(1008)[np.arange(20) % 10]
  mean, std = inception_score(confident, splits=2)
  assert mean == pytest.approx(10.0, rel=1e-4) and std == pytest.approx(0.0, abs=1e-3)
  logits = np.random.default_rng(3).standard_normal((103, 1008)) * 3
  np.testing.assert_allclose(
      inception_score(logits, splits=4), _reference_is(logits, 4), rtol=1e-4, atol=1e-5
  )


def _reference_pr(real, fake, k=3):
  """guided-diffusion ManifoldEstimator on full distance matrices, float64."""

  def sq(a, b):
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0)

  r_real = np.partition(sq(real, real), k, axis=1)[:, k]
  r_fake = np.partition(sq(fake, fake), k, axis=1)[:, k]
  d = sq(real, fake)
  precision = np.mean(np.any(d <= r_real[:, None], axis=0))
  recall = np.mean(np.any(d <= r_fake[None, :], axis=1))
  return precision, recall


def test_precision_recall_known_answer():
  real = np.stack([np.arange(10.0), np.zeros(10)], 1)
  fake = np.stack([np.r_[np.arange(5.0), 100 + np.arange(5.0)], np.zeros(10)], 1)
  np.testing.assert_allclose(knn_radii(real, 3, 4, 3)[:3], [9.0, 4.0, 4.0])
  for rows, cols in [(10000, 10000), (3, 4), (4, 3)]:
    p, r = precision_recall(real, fake, k=3, row_batch_size=rows, col_batch_size=cols)
    assert (p, r) == (0.5, 0.8)
  assert precision_recall(real, real) == (1.0, 1.0)


def test_precision_recall_matches_reference():
  rng = np.random.default_rng(4)
  real = rng.standard_normal((37, 8)).astype(np.float32)
  fake = (rng.standard_normal((29, 8)) * 1.3 + 0.4).astype(np.float32)
  got = precision_recall(real, fake, row_batch_size=7, col_batch_size=5)
  expected = _reference_pr(real.astype(np.float64), fake.astype(np.float64))
  np.testing.assert_allclose(got, expected, atol=1e-12)
  assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_input_validation():
  with pytest.raises(ValueError):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError):
    FeatureStats(4).update(np.zeros((2, 3)))
  with pytest.raises(ValueError):
    precision_recall(np.zeros((5, 3)), np.zeros((5, 4)))
  with pytest.raises(ValueError):
    metrics.knn_radii(np.zeros((3, 2)), k=3)


def test_image_health_exact():
  # image 0: values 0, 255, 100, 155 (2 of 4 saturated), std = sqrt(mean((v - 127.5)^2))
  # image 1: constant 7 (none saturated), std 0
  images = np.array([[0, 255, 100, 155], [7, 7, 7, 7]], np.uint8).reshape(2, 2, 2, 1)
  out = metrics.image_health(images)
  assert out["num_images"] == 2
  assert out["saturated_fraction"] == pytest.approx(2 / 8)
  std0 = np.sqrt(np.mean(np.square([-127.5, 127.5, -27.5, 27.5])))
  assert out["mean_image_std"] == pytest.approx(std0 / 2)
  # RGB replication of gray changes nothing; streaming equals one call
  rgb = np.repeat(images, 3, axis=-1)
  assert metrics.image_health(rgb) == pytest.approx(out)
  health = metrics.ImageHealth()
  health.update(images[:1]).update(images[1:]).update(images[:0])
  assert health.result() == pytest.approx(out)
  assert metrics.ImageHealth().result()["saturated_fraction"] is None
  with pytest.raises(ValueError, match="uint8"):
    metrics.image_health(images.astype(np.float32))
  with pytest.raises(ValueError, match="at least one"):
    metrics.image_health(images[:0])


def test_small_sample_frechet_distance_matches_the_full_form(monkeypatch):
  rng = np.random.default_rng(0)
  ref = FeatureStats.from_features(np.abs(rng.standard_normal((200, 64))))
  feats = np.abs(rng.standard_normal((20, 64))) * 1.5
  samples = FeatureStats.from_features(feats)
  exact = frechet_distance(ref.mean, ref.cov, samples.mean, samples.cov)

  def no_eigh(a):
    raise AssertionError("the small-sample path needs no (D, D) eigendecomposition")

  monkeypatch.setattr(metrics.np.linalg, "eigh", no_eigh)
  fast = frechet_distance(ref.mean, ref.cov, samples.mean, samples.cov, features2=feats)
  assert fast == pytest.approx(exact, rel=1e-6)


def test_compute_metrics_with_and_without_classifier():
  rng = np.random.default_rng(1)
  ref_pool = np.abs(rng.standard_normal((40, 2048))).astype(np.float32)
  ref_spatial = np.abs(rng.standard_normal((40, 2023)))
  reference = Reference(
      "ref.npz",
      FeatureStats.from_features(ref_pool),
      40,
      FeatureStats.from_features(ref_spatial),
      ref_pool[:30],
      None,
      None,
  )
  pool = np.abs(rng.standard_normal((20, 2048))).astype(np.float32)
  spatial_feats = np.abs(rng.standard_normal((20, 2023)))
  spatial = FeatureStats.from_features(spatial_feats)
  logits = rng.standard_normal((20, 1008)).astype(np.float32)
  values, notes = compute_metrics(reference, pool, spatial, logits, spatial_feats)
  assert values["inception_score"] > 1.0 and values["inception_score_std"] >= 0.0
  assert 0 <= values["precision"] <= 1 and 0 <= values["recall"] <= 1
  values2, notes2 = compute_metrics(reference, pool, spatial, None, spatial_feats, "w.npz")
  assert values2["inception_score"] is None
  assert any("w.npz" in n and "fc" in n for n in notes2)
  assert values2["fid"] == pytest.approx(values["fid"])
  no_pr = reference._replace(pr_features=None, spatial=None)
  values3, notes3 = compute_metrics(no_pr, pool, spatial, None)
  assert values3["precision"] is None and values3["sfid"] is None
  assert any("precision/recall" in n for n in notes3) and any("sfid" in n for n in notes3)
