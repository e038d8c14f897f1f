"""Small steps of the reduced CIFAR-10 study that the command line has no mode for.

  python benchmarks/study_tools.py export WORKDIR FOLDER   a training workdir's EMA parameters
                                                           as an exported folder (a teacher)
  python benchmarks/study_tools.py grid NPZ PNG [N]        the first N (64) samples of an
                                                           evaluation's eval_samples.npz as a grid
  python benchmarks/study_tools.py compare REF_A REF_B     FID, sFID, precision and recall of one
                                                           ref_stats file against another (e.g.
                                                           the test split against the train split)
  python benchmarks/study_tools.py pack SRC PACKED [DTYPE] an .npz or an exported folder, small
  python benchmarks/study_tools.py unpack PACKED DST       enough to carry to a GPU machine (the
                                                           FID Inception: 43.7 MB -> 36.8 MB,
                                                           losslessly), and back
"""

from __future__ import annotations

import json
import lzma
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

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


def pack(source: str, packed: str, dtype: str = "") -> None:
  """An .npz, or an exported folder (a teacher), as xz of each array's bytes regrouped by byte
  position (all first bytes, then all second bytes, ...): the sign and exponent bytes of float
  weights then compress well, which xz of the raw file does not do. `dtype` (e.g. bfloat16)
  rounds float arrays first, which is lossy: a teacher that computes in bf16 anyway, 35.8 MB
  in float32, packs to 12.3 MB."""
  model = None
  if Path(source).is_dir():
    params, meta = ckpt_lib.load_params(source)
    arrays, model = traverse_util.flatten_dict(params, sep="/"), meta["model"]
  else:
    arrays = dict(np.load(source))
  stored = {
      k: a.astype(jnp.dtype(dtype)) if dtype and a.dtype.kind == "f" else a
      for k, a in arrays.items()
  }
  header = {
      "arrays": [(k, stored[k].dtype.name, a.shape, a.dtype.name) for k, a in arrays.items()],
      "model": model,
  }
  with lzma.open(packed, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
    f.write(json.dumps(header).encode() + b"\n")
    for a in stored.values():
      planes = np.ascontiguousarray(a).reshape(-1).view(np.uint8).reshape(-1, a.dtype.itemsize)
      f.write(np.ascontiguousarray(planes.T).tobytes())
  print(f"packed {len(arrays)} arrays of {source} into {packed}")


def unpack(packed: str, target: str) -> None:
  """The inverse of `pack`: the same arrays in their own dtypes (bit for bit unless `pack`
  rounded them), as an exported folder when `packed` came from one, else as an .npz."""
  arrays = {}
  with lzma.open(packed, "rb") as f:
    header = json.loads(f.readline())
    for name, dtype, shape, original in header["arrays"]:
      dtype = jnp.dtype(dtype)
      size = int(np.prod(shape)) * dtype.itemsize
      planes = np.frombuffer(f.read(size), np.uint8)
      if planes.size != size:
        sys.exit(f"{packed}: truncated at array {name}")
      a = planes.reshape(dtype.itemsize, -1).T.copy().view(dtype).reshape(shape)
      arrays[name] = a.astype(jnp.dtype(original))
  if header["model"] is not None:
    ckpt_lib.export_params(target, traverse_util.unflatten_dict(arrays, sep="/"), header["model"])
  else:
    with open(target + ".part", "wb") as f:
      np.savez(f, **arrays)
    Path(target + ".part").rename(target)
  print(f"unpacked {len(arrays)} arrays of {packed} into {target}")


if __name__ == "__main__":
  commands = {"export": export, "grid": grid, "compare": compare, "pack": pack, "unpack": unpack}
  if len(sys.argv) < 2 or sys.argv[1] not in commands:
    sys.exit(__doc__)
  commands[sys.argv[1]](*sys.argv[2:])
