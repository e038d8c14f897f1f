"""Model size and operation counts (paper Table 4 and appendix B), read from the real model.

Every binarizable layer records its work in the 'costs' collection during a forward: BOPs
(binary multiply-accumulates, 1-bit weights x 1-bit activations), FLOPs (real arithmetic) and
parameters stored at 1 bit or at 32 bits. OPs = BOPs / 64 + FLOPs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def count_costs(model, image_shape: tuple[int, int, int]) -> dict:
  """Costs of one forward of a single (H, W, C) image through `model` (any method).

  Returns params (total), binary_params, size_mb (binary at 1 bit, the rest at 32 bits),
  bops, flops, ops. Parameters that no layer records (norms, the TBS table) count as real.
  The forward itself is never executed: only the recorded constants leave the jit, so XLA
  drops the computation.
  """
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  @jax.jit
  def costs(params):
    _, state = model.apply({"params": params}, x, t, mutable=["costs"])
    return sum(jax.tree_util.tree_leaves(state["costs"]))

  bops, flops, binary_params, _ = (float(v) for v in np.asarray(costs(params)))
  total = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
  size_bits = binary_params + 32 * (total - binary_params)
  return dict(
      params=total,
      binary_params=int(binary_params),
      size_mb=size_bits / 8 / 2**20,
      bops=bops,
      flops=flops,
      ops=bops / 64 + flops,
  )


def efficiency_report(fp_model, binary_model, image_shape: tuple[int, int, int]) -> dict:
  """FP and binary costs side by side with the storage and OPs ratios (FP / binary)."""
  fp, binary = count_costs(fp_model, image_shape), count_costs(binary_model, image_shape)
  return dict(
      fp=fp,
      binary=binary,
      size_ratio=fp["size_mb"] / binary["size_mb"],
      ops_ratio=fp["ops"] / binary["ops"],
  )
