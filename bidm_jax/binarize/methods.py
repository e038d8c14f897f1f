"""Binarization methods: one small frozen object decides how every binary layer behaves.

A method bundles the layer-level choices (weight and activation binarizer, gradient estimator,
activation scaling, shortcut) and the model/training-level ones that define the paper's
methods (cross-timestep connections, distillation). Models take a method and never look at
its name, so adding a method means adding an entry to `METHODS`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

ACTIVATION_SCALES = ("none", "xnor")
DISTILLATIONS = ("none", "spd", "l2")


class QuantContext(NamedTuple):
  """Per-call values a binarizer may depend on, passed explicitly through the model.

  t: (B,) int timesteps of the batch (timestep-aware quantizers).
  progress: () float in [0, 1], fraction of training done (estimator schedules); 1 at inference.
  """
  t: jax.Array
  progress: jax.Array

  @classmethod
  def create(cls, t: jax.Array, progress: float | jax.Array = 1.0) -> "QuantContext":
    return cls(jnp.asarray(t, jnp.int32), jnp.asarray(progress, jnp.float32))


@dataclasses.dataclass(frozen=True)
class BinarizationMethod:
  """How layers binarize, and which BiDM parts a model and the QAT loss use.

  Attributes:
    name: the method's name in `METHODS`.
    binary: False for the full-precision model (every other field is then ignored).
    weight_estimator: gradient estimator of the weight sign ('ste' = clipped identity).
    activation_estimator: gradient estimator of the activation sign ('approx' = ApproxSign).
    learnable_threshold: activations are binarized as sign(x + tau) with a learnable tau per
      input channel (ReActNet's RSign), else sign(x).
    activation_scale: 'xnor' multiplies the binary conv by K = conv(mean_c |x|, k) (Eq. 9),
      'none' leaves it unscaled.
    learnable_k: the k filter of the XNOR scale is trained (BiDM's TBS, Eq. 10), else fixed to
      1/(kh*kw).
    shortcut: add s * shortcut(x), a real-valued ReActNet-style shortcut with learnable s.
    shortcut_scale_init: initial s.
    cross_timestep: blend the last decoder block outputs with the previous step's (TBS, Eq. 12).
    distillation: 'spd' (Eq. 13-15), 'l2' (plain feature MSE) or 'none'.
  """
  name: str = "fp"
  binary: bool = False
  weight_estimator: str = "ste"
  activation_estimator: str = "approx"
  learnable_threshold: bool = True
  activation_scale: str = "xnor"
  learnable_k: bool = False
  shortcut: bool = True
  shortcut_scale_init: float = 0.0
  cross_timestep: bool = False
  distillation: str = "none"

  def __post_init__(self):
    if self.activation_scale not in ACTIVATION_SCALES:
      raise ValueError(f"activation_scale must be one of {ACTIVATION_SCALES}, "
                       f"got {self.activation_scale!r}")
    if self.distillation not in DISTILLATIONS:
      raise ValueError(f"distillation must be one of {DISTILLATIONS}, got {self.distillation!r}")


FP = BinarizationMethod()
XNOR = BinarizationMethod(name="xnor", binary=True)
BIDM = BinarizationMethod(name="bidm", binary=True, learnable_k=True, cross_timestep=True,
                          distillation="spd")

METHODS: dict[str, BinarizationMethod] = {m.name: m for m in (FP, XNOR, BIDM)}


def get_method(name: str, **overrides) -> BinarizationMethod:
  """The named method, with fields replaced by the non-None `overrides` (ablations).

  >>> get_method('xnor', learnable_k=True).learnable_k
  True
  """
  if name not in METHODS:
    raise ValueError(f"unknown binarization method {name!r}; valid: {', '.join(METHODS)}")
  fields = {f.name for f in dataclasses.fields(BinarizationMethod)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown method fields {sorted(unknown)}; valid: {sorted(fields)}")
  return dataclasses.replace(METHODS[name], **{k: v for k, v in overrides.items()
                                               if v is not None})
