"""Small steps of the reduced CIFAR-10 study that the command line has no mode for.

  python benchmarks/study_tools.py export WORKDIR FOLDER   a training workdir's EMA parameters
                                                           as an exported folder (a teacher)
  python benchmarks/study_tools.py grid NPZ PNG [N]        the first N (64) samples of an
                                                           evaluation's eval_samples.npz as a grid
  python benchmarks/study_tools.py compare REF_A REF_B     FID, sFID, precision and recall of one
                                                           ref_stats file against another (e.g.
                                                           the test split against the train split)
"""

from __future__ import annotations

import json
import sys

import numpy as np

from bidm_jax.evaluation import metrics
from bidm_jax.evaluation.ref_stats import Reference
from bidm_jax.training import checkpoint as ckpt_lib
from bidm_jax.training.logging import save_grid


def export(workdir: str, folder: str) -> None:
  params, meta = ckpt_lib.load_params(workdir)
  ckpt_lib.export_params(folder, params, meta["model"])
  print(f"exported the EMA parameters of {workdir} to {folder}")


def grid(npz: str, png: str, n: str = "64") -> None:
  images = np.load(npz)["images"][: int(n)]
  save_grid(images.astype(np.float32) / 127.5 - 1.0, png)
  print(f"wrote {len(images)} samples of {npz} to {png}")


def compare(path_a: str, path_b: str) -> None:
  a, b = Reference.load(path_a), Reference.load(path_b)
  result = {
      "a": a.description,
      "b": b.description,
      "fid": metrics.frechet_distance(a.pool.mean, a.pool.cov, b.pool.mean, b.pool.cov),
      "sfid": metrics.frechet_distance(
          a.spatial.mean, a.spatial.cov, b.spatial.mean, b.spatial.cov
      ),
  }
  result["precision"], result["recall"] = metrics.precision_recall(b.pr_features, a.pr_features)
  print(json.dumps(result))


if __name__ == "__main__":
  commands = {"export": export, "grid": grid, "compare": compare}
  if len(sys.argv) < 2 or sys.argv[1] not in commands:
    sys.exit(__doc__)
  commands[sys.argv[1]](*sys.argv[2:])
