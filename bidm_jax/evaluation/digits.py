"""Sample quality on the digits demo without downloaded weights: the Frechet distance in the
hidden-layer feature space of a small MLP digit classifier trained on the real 8x8 digits.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

from bidm_jax.evaluation.metrics import frechet_distance


class DigitsJudge:
  """An MLP (64 ReLU units) trained on the 1797 real digits; judges generated images.

  Images are (N, H, W, 1) in [-1, 1] with H = W a multiple of 8; they are area-downsampled to
  8x8 and mapped to the classifier's 0..16 input range.
  """

  def __init__(self, seed: int = 0):
    digits = load_digits()
    self.real = digits.images.astype(np.float64) / 16.0  # (1797, 8, 8) in [0, 1]
    self.clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed)
    self.clf.fit(self.real.reshape(len(self.real), -1), digits.target)
    self.real_features = self._hidden(self.real.reshape(len(self.real), -1))

  def _hidden(self, flat: np.ndarray) -> np.ndarray:
    return np.maximum(flat @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

  @staticmethod
  def to_unit_8x8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) in [-1, 1] -> (N, 64) in [0, 1]."""
    n, h, w, _ = images.shape
    f = h // 8
    small = images[..., 0].reshape(n, 8, f, 8, f).mean(axis=(2, 4))
    return np.clip((small + 1.0) / 2.0, 0.0, 1.0).reshape(n, 64)

  def evaluate(self, images: np.ndarray) -> dict:
    """frechet_distance to the real digits' features, and the classifier's mean confidence."""
    flat = self.to_unit_8x8(np.asarray(images, np.float64))
    feats = self._hidden(flat)
    fd = frechet_distance(
        feats.mean(0),
        np.cov(feats, rowvar=False),
        self.real_features.mean(0),
        np.cov(self.real_features, rowvar=False),
    )
    confidence = float(self.clf.predict_proba(flat).max(axis=1).mean())
    return dict(digits_fd=float(fd), classifier_confidence=confidence)

  def baselines(self, n: int, seed: int = 0) -> dict:
    """digits_fd of n real digits drawn without replacement and of n uniform-noise images, the
    two ends of the scale at the sample count the report uses."""
    rng = np.random.default_rng(seed)
    real = self.real[rng.choice(len(self.real), n, replace=False)] * 2.0 - 1.0
    noise = rng.uniform(-1.0, 1.0, (n, 8, 8))
    return {
        "real_digits": self.evaluate(real[..., None])["digits_fd"],
        "uniform_noise": self.evaluate(noise[..., None])["digits_fd"],
    }
