"""The optional CUDA extension as XLA FFI custom calls: the binary conv on the 1-bit tensor
cores and the fused sign-and-pack of activations (bidm_jax/kernels/cuda/binary_conv.cu).

The library is built from source (`python bidm_jax/kernels/cuda/build.py`, docs/packed.md,
"CUDA kernel") and loaded with ctypes on first use. `available()` is True only when it is built,
loads, and the default backend is a CUDA GPU; otherwise it logs the reason once and
`layers.packed` computes impl='cuda' as impl='popcount', the same integers.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

LIBRARY = Path(__file__).resolve().parent / "cuda" / "build" / "libbidm_cuda.so"
CHUNK_WORDS = 8  # the kernel's K step, 256 bits: weight rows are zero-padded to a multiple
_SIGN_PACK = "bidm_sign_pack"
_BINARY_CONV = "bidm_binary_conv"


def library_path() -> Path:
  return Path(os.environ.get("BIDM_CUDA_LIBRARY", LIBRARY))


@functools.cache
def unavailable_reason() -> str | None:
  """Why the kernels cannot run here, or None once they are registered with XLA."""
  backend = jax.default_backend()
  if backend != "gpu":
    return f"the default backend is {backend}, not a CUDA GPU"
  try:
    jax.devices("cuda")
  except RuntimeError:
    return "the GPU backend is not CUDA"
  path = library_path()
  if not path.exists():
    return f"{path} is not built (python bidm_jax/kernels/cuda/build.py)"
  try:
    lib = ctypes.cdll.LoadLibrary(str(path))
  except OSError as e:
    return f"cannot load {path}: {e}"
  jax.ffi.register_ffi_target(_SIGN_PACK, jax.ffi.pycapsule(lib.BidmSignPack), platform="CUDA")
  jax.ffi.register_ffi_target(_BINARY_CONV, jax.ffi.pycapsule(lib.BidmBinaryConv), platform="CUDA")
  return None


@functools.cache
def available() -> bool:
  """True when impl='cuda' runs the kernels; logs the fallback once per process otherwise."""
  reason = unavailable_reason()
  if reason is not None:
    logging.warning("impl='cuda' runs as impl='popcount' (same integers): %s", reason)
  return reason is None


def sign_pack(x: jax.Array, threshold: jax.Array | None) -> jax.Array:
  """x + tau >= 0 (rounded in x's dtype) packed along C: (..., C) -> (..., ceil(C / 32)) uint32,
  the layout of layers.packed.pack_bits."""
  c = x.shape[-1]
  tau = jnp.zeros((c,), x.dtype) if threshold is None else threshold.astype(x.dtype)
  out = jax.ShapeDtypeStruct(x.shape[:-1] + (-(-c // 32),), jnp.uint32)
  return jax.ffi.ffi_call(_SIGN_PACK, out)(x, tau)


def binary_conv(
    xwords: jax.Array,
    weights: jax.Array,
    tap_pop: jax.Array,
    *,
    kernel_size,
    cin: int,
    strides: int,
    padding,
) -> jax.Array:
  """The +-1 convolution over the taps inside the image, int32 (B, H', W', Cout).

  xwords: (B, H, W, ceil(Cin / 32)) activation words; weights: (Cout, Kp) tap-aligned words
  (each tap's Cin bits start a word) zero-padded to Kp % 8 == 0; tap_pop: (Cout, kh * kw) int32
  set bits per tap; padding: ((top, bottom), (left, right)).
  """
  (top, bottom), (left, right) = padding
  kh, kw = kernel_size
  b, h, w, _ = xwords.shape
  ho = (h + top + bottom - kh) // strides + 1
  wo = (w + left + right - kw) // strides + 1
  out = jax.ShapeDtypeStruct((b, ho, wo, weights.shape[0]), jnp.int32)
  return jax.ffi.ffi_call(_BINARY_CONV, out)(
      xwords,
      weights,
      tap_pop,
      kh=np.int64(kh),
      kw=np.int64(kw),
      cin=np.int64(cin),
      stride=np.int64(strides),
      pad_top=np.int64(top),
      pad_left=np.int64(left),
  )
