"""Space Patched Distillation (paper section 3.3, Eq. 13-15) against an independent NumPy version."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax.bidm import spd
from bidm_jax.binarize.methods import get_method

SHAPES = [(2, 8, 8, 16), (3, 16, 16, 4), (1, 4, 4, 8), (2, 8, 12, 6), (2, 32, 32, 3)]


def np_spd_feature(student, teacher, p=4):
  """Eq. 13-15 for one NHWC feature pair, in float64, via the paper's NCHW view.

  For each of the p x p spatial patches P (B, C, h, w): A = P @ P^T over the last two axes
  (B, C, h, h), A / ||A||_F over the whole map tensor, then ||A_s - A_t||_F; mean over patches.
  """
  s = np.asarray(student, np.float64).transpose(0, 3, 1, 2)
  t = np.asarray(teacher, np.float64).transpose(0, 3, 1, 2)
  _, _, H, W = s.shape
  h, w = H // p, W // p
  losses = []
  for i in range(p):
    for j in range(p):
      maps = []
      for f in (s, t):
        P = f[:, :, i * h : (i + 1) * h, j * w : (j + 1) * w]
        A = P @ np.swapaxes(P, -1, -2)
        assert A.shape == f.shape[:2] + (h, h)
        maps.append(A / np.sqrt(np.sum(A**2)))
      losses.append(np.sqrt(np.sum((maps[0] - maps[1]) ** 2)))
  return float(np.mean(losses))


def random_pair(shape, seed):
  rng = np.random.default_rng(seed)
  s = rng.standard_normal(shape).astype(np.float32)
  t = (s + 0.7 * rng.standard_normal(shape)).astype(np.float32)  # correlated, like a teacher
  return s, t


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_spd_feature_matches_numpy(shape):
  s, t = random_pair(shape, seed=sum(shape))
  got = float(spd.spd_feature_loss(jnp.asarray(s), jnp.asarray(t), 4))
  ref = np_spd_feature(s, t, 4)
  assert ref > 1e-3
  np.testing.assert_allclose(got, ref, rtol=1e-4)
  # and through the feature-list entry point
  np.testing.assert_allclose(
      float(spd.spd_loss([jnp.asarray(s)], [jnp.asarray(t)])), ref, rtol=1e-4
  )


def test_spd_loss_averages_over_features():
  pairs = [random_pair(shape, seed=i) for i, shape in enumerate(SHAPES)]
  got = float(
      jax.jit(spd.spd_loss)([jnp.asarray(s) for s, _ in pairs], [jnp.asarray(t) for _, t in pairs])
  )
  ref = np.mean([np_spd_feature(s, t) for s, t in pairs])
  np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_patch_attention_maps_layout():
  x = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
  maps = np.asarray(spd.patch_attention_maps(jnp.asarray(x), 4))
  assert maps.shape == (4, 4, 2, 3, 2, 2)
  i, j = 2, 1
  P = x.transpose(0, 3, 1, 2)[:, :, 2 * i : 2 * i + 2, 3 * j : 3 * j + 3]
  np.testing.assert_allclose(maps[i, j], P @ np.swapaxes(P, -1, -2), rtol=1e-5, atol=1e-5)


def test_spd_small_maps_fall_back_to_fewer_patches():
  """A 2x2 map cannot hold 4x4 patches: spd_loss uses the largest divisor <= 4 (here 2)."""
  s, t = random_pair((2, 2, 2, 8), seed=3)
  got = float(spd.spd_loss([jnp.asarray(s)], [jnp.asarray(t)]))
  np.testing.assert_allclose(got, np_spd_feature(s, t, 2), rtol=1e-4)
  s, t = random_pair((1, 6, 6, 4), seed=4)  # 6 = 3 patches of 2
  got = float(spd.spd_loss([jnp.asarray(s)], [jnp.asarray(t)]))
  np.testing.assert_allclose(got, np_spd_feature(s, t, 3), rtol=1e-4)
  with pytest.raises(ValueError):
    spd.patch_attention_maps(jnp.zeros((1, 6, 6, 2)), 4)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=[str(s) for s in SHAPES[:3]])
def test_spd_zero_for_identical_features(shape):
  s, _ = random_pair(shape, seed=5)
  assert abs(float(spd.spd_loss([jnp.asarray(s)], [jnp.asarray(s)]))) < 1e-6
  # the gradient at zero loss is finite
  g = jax.grad(lambda v: spd.spd_loss([v], [jnp.asarray(s)]))(jnp.asarray(s))
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("cs,ct", [(3.7, 1.0), (1.0, 0.05), (12.0, 0.3)])
def test_spd_invariant_to_positive_rescaling(cs, ct):
  s, t = random_pair((2, 8, 8, 16), seed=6)
  base = float(spd.spd_loss([jnp.asarray(s)], [jnp.asarray(t)]))
  scaled = float(spd.spd_loss([jnp.asarray(cs * s)], [jnp.asarray(ct * t)]))
  np.testing.assert_allclose(scaled, base, rtol=1e-5)


def test_spd_gradient_only_to_student():
  s, t = random_pair((2, 8, 8, 4), seed=7)
  gs, gt = jax.grad(lambda a, b: spd.spd_loss([a], [b]), argnums=(0, 1))(
      jnp.asarray(s), jnp.asarray(t)
  )
  np.testing.assert_array_equal(np.asarray(gt), 0.0)
  assert np.any(np.asarray(gs) != 0) and np.all(np.isfinite(np.asarray(gs)))
  # matches a finite difference of the NumPy reference along a random direction
  d = np.random.default_rng(8).standard_normal(s.shape)
  eps = 1e-3
  fd = (np_spd_feature(s + eps * d, t) - np_spd_feature(s - eps * d, t)) / (2 * eps)
  np.testing.assert_allclose(float(np.sum(np.asarray(gs, np.float64) * d)), fd, rtol=1e-2)


def test_l2_distillation_is_mean_mse():
  pairs = [random_pair(shape, seed=10 + i) for i, shape in enumerate(SHAPES[:3])]
  got = float(
      spd.l2_distillation_loss(
          [jnp.asarray(s) for s, _ in pairs], [jnp.asarray(t) for _, t in pairs]
      )
  )
  ref = np.mean([np.mean((s.astype(np.float64) - t) ** 2) for s, t in pairs])
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  s, t = pairs[0]
  gt = jax.grad(lambda b: spd.l2_distillation_loss([jnp.asarray(s)], [b]))(jnp.asarray(t))
  np.testing.assert_array_equal(np.asarray(gt), 0.0)


def test_mismatched_features_raise():
  a = jnp.zeros((1, 8, 8, 4))
  for fn in (spd.spd_loss, spd.l2_distillation_loss):
    with pytest.raises(ValueError):
      fn([a, a], [a])
    with pytest.raises(ValueError):
      fn([a], [jnp.zeros((1, 8, 8, 2))])


def test_distillation_table_names_the_methods_losses():
  """`DISTILLATION_LOSSES` holds spd and l2 by name; a `Distillation` computes the registered
  loss with its patch count, and `builders.make_distillation` picks it for a method."""
  rng = np.random.default_rng(7)
  s, t = ([jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)] for _ in range(2))
  assert set(spd.DISTILLATION_LOSSES) == {"spd", "l2"}
  np.testing.assert_allclose(
      float(spd.Distillation("spd", 0.5, 2).loss(s, t)), float(spd.spd_loss(s, t, 2)), rtol=1e-6
  )
  np.testing.assert_allclose(
      float(spd.Distillation("l2", 0.5, 2).loss(s, t)),
      float(spd.l2_distillation_loss(s, t)),
      rtol=1e-6,
  )
  with pytest.raises(ValueError, match="unknown distillation loss 'kl'"):
    spd.Distillation("kl", 1.0, 4).loss(s, t)
  with pytest.raises(ValueError, match="registered already"):
    spd.register_distillation("spd")(spd.spd_loss)
  config = config_lib.default_config()
  assert builders.make_distillation(config, get_method("fp")) is None
  assert builders.make_distillation(config, get_method("bidm", distillation="none")) is None
  assert builders.make_distillation(config, get_method("xnor", distillation="l2")) == (
      spd.Distillation("l2", config.distill.weight, config.distill.patches)
  )
