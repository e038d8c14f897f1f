"""Model size and operation counts (paper Table 4 and appendix B), read from the real model.

Every binarizable layer records its work in the 'costs' collection during a forward: BOPs
(binary multiply-accumulates, 1-bit weights x 1-bit activations), FLOPs (real arithmetic) and
parameters stored at 1 bit or at 32 bits. OPs = BOPs / 64 + FLOPs.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np


KINDS = ("layer", "shortcut", "attention_products")
"""What a recorded cost belongs to (`layers.binary.record_cost`)."""


def count_costs(model, image_shape: tuple[int, int, int]) -> dict:
  """Costs of one forward of a single (H, W, C) image through `model` (any method).

  Returns params (total), binary_params, size_mb (binary at 1 bit, the rest at 32 bits, in
  MiB), bops, flops (2 per real multiply-accumulate), ops = bops / 64 + flops, and by_kind:
  {kind: {bops, flops, binary_params, real_params}} for the kinds of `KINDS`. Parameters that
  no layer records (norms, the TBS table) count as real. The forward itself is never
  executed: only the recorded constants leave the jit, so XLA drops the computation.
  """
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  @jax.jit
  def costs(params):
    _, state = model.apply({"params": params}, x, t, mutable=["costs"])
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["costs"]))
    return {
        kind: sum((v for k, v in flat.items() if k[-1] == kind), jnp.zeros(4, jnp.float32))
        for kind in KINDS
    }

  per_kind = {k: np.asarray(v, np.float64) for k, v in costs(params).items()}
  bops, flops, binary_params, _ = sum(per_kind.values())
  total = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
  size_bits = binary_params + 32 * (total - binary_params)
  return dict(
      params=total,
      binary_params=int(binary_params),
      size_mb=size_bits / 8 / 2**20,
      bops=float(bops),
      flops=float(flops),
      ops=float(bops / 64 + flops),
      by_kind={
          kind: dict(
              bops=float(v[0]), flops=float(v[1]), binary_params=int(v[2]), real_params=int(v[3])
          )
          for kind, v in per_kind.items()
      },
  )


def efficiency_report(fp_model, binary_model, image_shape: tuple[int, int, int]) -> dict:
  """FP and binary costs side by side with the storage and OPs ratios (FP / binary).

  Each side also has flops_as_table4: half its FLOPs without the attention products, i.e. one
  per multiply-accumulate and the products left out, the convention that gives the paper's
  Table 4 its FP 96.00 GFLOPs on LDM-4 (docs/ldm.md), and ops_as_table4 = bops / 64 + that.
  """
  sides = {
      "fp": count_costs(fp_model, image_shape),
      "binary": count_costs(binary_model, image_shape),
  }
  for side in sides.values():
    side["flops_as_table4"] = (side["flops"] - side["by_kind"]["attention_products"]["flops"]) / 2
    side["ops_as_table4"] = side["bops"] / 64 + side["flops_as_table4"]
  fp, binary = sides["fp"], sides["binary"]
  return dict(
      fp=fp,
      binary=binary,
      size_ratio=fp["size_mb"] / binary["size_mb"],
      ops_ratio=fp["ops"] / binary["ops"],
      ops_ratio_as_table4=fp["ops_as_table4"] / binary["ops_as_table4"],
  )
