"""Space Patched Distillation (paper section 3.3, Eq. 13-16) and plain L2 distillation.

`DISTILLATION_LOSSES` registers each distillation loss by the name a method's `distillation`
field gives ('spd', 'l2'); a `Distillation` is one of them with its weight lambda and patch
count, as the train step adds it: L = L_DM + lambda * L_distill.

SPD splits each block output into p x p spatial patches; for a patch P, viewed as (B, C, h, w)
like the paper's NCHW tensors, the attention map is A = P @ P^T over the last two axes,
(B, C, h, h). Student and teacher maps are each divided by their Frobenius norm (over the
whole map tensor) and the loss is the Frobenius norm of the difference, averaged over the p^2
patches and over the features.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def patch_attention_maps(feature: Array, patches: int) -> Array:
  """Per-patch attention maps of an NHWC feature.

  feature: (B, H, W, C), H and W divisible by `patches` -> (p, p, B, C, h, h), h = H // p,
  A[i, j, b, c] = P[b, c] @ P[b, c]^T for the patch P at row block i, column block j.
  """
  b, hgt, wid, c = feature.shape
  if hgt % patches or wid % patches:
    raise ValueError(
        f"feature of spatial size {hgt}x{wid} cannot be split into {patches}x{patches} patches"
    )
  h, w = hgt // patches, wid // patches
  x = feature.astype(jnp.float32).reshape(b, patches, h, patches, w, c)
  return jnp.einsum("bihjwc,bigjwc->ijbchg", x, x)


def _normalise(maps: Array) -> Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(maps), axis=(2, 3, 4, 5), keepdims=True))
  return maps / jnp.maximum(norm, 1e-12)


def spd_feature_loss(student: Array, teacher: Array, patches: int = 4) -> Array:
  """Eq. 15 for one feature: mean over patches of ||A_s/|A_s| - A_t/|A_t|||_F. (B,H,W,C)x2 -> ()."""
  diff = _normalise(patch_attention_maps(student, patches)) - _normalise(
      patch_attention_maps(jax.lax.stop_gradient(teacher), patches)
  )
  return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(diff), axis=(2, 3, 4, 5)) + 1e-20))


def spd_loss(
    student_features: Sequence[Array], teacher_features: Sequence[Array], patches: int = 4
) -> Array:
  """L_SPD: Eq. 15 averaged over all feature pairs (Eq. 16 without lambda). -> ()."""
  _check_pairs(student_features, teacher_features)
  return jnp.mean(
      jnp.stack(
          [
              spd_feature_loss(s, t, _fit_patches(s, patches))
              for s, t in zip(student_features, teacher_features)
          ]
      )
  )


def l2_distillation_loss(
    student_features: Sequence[Array], teacher_features: Sequence[Array]
) -> Array:
  """Plain feature distillation (Table 7 ablation): mean over features of MSE(student, teacher)."""
  _check_pairs(student_features, teacher_features)
  return jnp.mean(
      jnp.stack(
          [
              jnp.mean(
                  jnp.square(s.astype(jnp.float32) - jax.lax.stop_gradient(t).astype(jnp.float32))
              )
              for s, t in zip(student_features, teacher_features)
          ]
      )
  )


DistillationLoss = Callable[[Sequence[Array], Sequence[Array], int], Array]
"""loss(student_features, teacher_features, patches) -> (); features pair up by position."""

DISTILLATION_LOSSES: dict[str, DistillationLoss] = {}


def register_distillation(name: str):
  """Registers a `DistillationLoss` under `name` (a method's `distillation` value)."""

  def register(loss: DistillationLoss) -> DistillationLoss:
    if name in DISTILLATION_LOSSES:
      raise ValueError(f"distillation loss {name!r} is registered already")
    DISTILLATION_LOSSES[name] = loss
    return loss

  return register


register_distillation("spd")(spd_loss)


@register_distillation("l2")
def _l2_loss(
    student_features: Sequence[Array], teacher_features: Sequence[Array], patches: int
) -> Array:
  """`l2_distillation_loss` in the registry's signature (L2 compares whole features)."""
  del patches
  return l2_distillation_loss(student_features, teacher_features)


class Distillation(NamedTuple):
  """The registered loss `name` with its weight lambda (L = L_DM + weight * loss) and the
  patch count p that SPD splits features into (unused by L2)."""

  name: str
  weight: float
  patches: int

  def loss(self, student_features: Sequence[Array], teacher_features: Sequence[Array]) -> Array:
    """The unweighted distillation loss of paired (B, H, W, C) features -> ()."""
    if self.name not in DISTILLATION_LOSSES:
      raise ValueError(
          f"unknown distillation loss {self.name!r}; registered: "
          f"{', '.join(DISTILLATION_LOSSES)}"
      )
    return DISTILLATION_LOSSES[self.name](student_features, teacher_features, self.patches)


def _fit_patches(feature: Array, patches: int) -> int:
  """The largest patch count <= `patches` that divides the feature (4x4 maps at 2x2 -> 2)."""
  size = min(feature.shape[1], feature.shape[2])
  p = min(patches, size)
  while feature.shape[1] % p or feature.shape[2] % p:
    p -= 1
  return p


def _check_pairs(student_features, teacher_features) -> None:
  if len(student_features) != len(teacher_features):
    raise ValueError(
        f"{len(student_features)} student features vs {len(teacher_features)} teacher features"
    )
  for i, (s, t) in enumerate(zip(student_features, teacher_features)):
    if s.shape != t.shape:
      raise ValueError(f"feature {i}: student {s.shape} vs teacher {t.shape}")
