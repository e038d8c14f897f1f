"""Conversion of public checkpoints and the packed W1A1 export; `param_shapes` serves the
converters."""

from __future__ import annotations

import jax


def param_shapes(model, *inputs) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{parameter path: shape} of `model.init(key, *inputs)` (inputs may be ShapeDtypeStructs);
  jax.eval_shape, so nothing is computed."""
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
  return {
      tuple(p.key for p in path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
