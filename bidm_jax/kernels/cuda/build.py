"""Builds the optional CUDA extension (the 1-bit tensor-core conv and the sign-and-pack kernel).

  python bidm_jax/kernels/cuda/build.py                 # sm_80 and sm_90 -> build/libbidm_cuda.so
  python bidm_jax/kernels/cuda/build.py --arch 90 --ptxas-info

Needs nvcc (on PATH, or under $CUDA_HOME/bin) and the XLA FFI headers of the jaxlib that will
load the library (`jax.ffi.include_dir()` of this Python): build with the Python that runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "binary_conv.cu"
LIBRARY = HERE / "build" / "libbidm_cuda.so"


def find_nvcc() -> str:
  nvcc = shutil.which("nvcc")
  if nvcc is None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "nvcc"
    if not candidate.exists():
      sys.exit(f"nvcc not found on PATH nor at {candidate}: set CUDA_HOME")
    nvcc = str(candidate)
  return nvcc


def command(arches, ptxas_info: bool, output: Path) -> list[str]:
  import jax.ffi  # pylint: disable=import-outside-toplevel  (only the build needs jax here)

  cmd = [
      find_nvcc(),
      "-O3",
      "-std=c++17",
      "--shared",
      "-Xcompiler=-fPIC",
      "-lineinfo",
      "-isystem",
      jax.ffi.include_dir(),
      str(SOURCE),
      "-o",
      str(output),
  ]
  cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
  if ptxas_info:
    cmd.append("-Xptxas=-v")
  return cmd


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--arch",
      nargs="+",
      default=["80", "90"],
      help="compute capabilities to build machine code for (default 80 90)",
  )
  parser.add_argument(
      "--ptxas-info",
      action="store_true",
      help="print registers, shared memory and spills per kernel",
  )
  parser.add_argument("--output", type=Path, default=LIBRARY)
  args = parser.parse_args(argv)
  args.output.parent.mkdir(parents=True, exist_ok=True)
  cmd = command(args.arch, args.ptxas_info, args.output)
  print(" ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)
  print(f"built {args.output}")


if __name__ == "__main__":
  main()
