"""Per-layer time of the CUDA binary conv against a bf16 cuDNN conv of the same shape.

  PYTHONPATH=. python benchmarks/binary_conv.py                   # CIFAR-10, batch 512
  PYTHONPATH=. python benchmarks/binary_conv.py --config=configs/digits.py --batch=64

One row per distinct binary conv of the config (kernel, stride, padding, input size; `layers`
counts the convs of that shape). Columns, in ms per call:
  bf16     lax.conv_general_dilated on bf16 activations and weights (cuDNN), the FP model's conv
  cuda     sign-and-pack kernel on the same bf16 activations (thresholds applied) + binary conv
           kernel, int32 out
  conv     the binary conv kernel alone, on packed activation words
  int8     path 2's impl='int8' from the same bf16 activations (XLA int8 conv)
  speedup  bf16 / cuda
`exact` says whether the CUDA integers equal impl='int8' at this batch. A time is the median over
--reps of --calls back-to-back calls (dispatch overlapped, one synchronisation at the end), each
call on the next of 3 input sets so that the L2 cache does not hold the input.
Needs a CUDA GPU and the built extension (python bidm_jax/kernels/cuda/build.py).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax.export import packed as ex
from bidm_jax.kernels import binary_cuda
from bidm_jax.layers import packed as pk

DIMS = ("NHWC", "HWIO", "NHWC")
SETS = 3


def conv_shapes(config_path: str) -> collections.Counter:
  """(kernel HWIO, stride, padding, input (H, W)) -> number of binary convs of that shape."""
  config = config_lib.load_config_file(config_path)
  model = builders.make_model(config, config_lib.method_from_config(config))
  image = (config.data.image_size, config.data.image_size, config.data.channels)
  layers, _ = ex.trace_binary_layers(model, image)
  return collections.Counter(
      (tuple(v["kernel"]), v["strides"], tuple(map(tuple, v["padding"])), tuple(v["input"]))
      for v in layers.values()
      if v["kind"] == "conv"
  )


def time_ms(fn, inputs, calls: int, reps: int) -> float:
  """Median ms per call of fn over rotating input sets; one warm-up round first."""

  def round_trip():
    out = None
    for i in range(calls):
      out = fn(*inputs[i % len(inputs)])
    jax.block_until_ready(out)

  round_trip()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    round_trip()
    times.append((time.perf_counter() - start) / calls)
  return 1e3 * statistics.median(times)


def bench_shape(shape, batch: int, calls: int, reps: int) -> dict:
  (kh, kw, cin, cout), strides, pads, (h, w) = shape
  keys = jax.random.split(jax.random.key(0), 2 * SETS + 2)
  xs = [jax.random.normal(k, (batch, h, w, cin), jnp.bfloat16) for k in keys[:SETS]]
  taus = [0.1 * jax.random.normal(k, (cin,), jnp.float32) for k in keys[SETS : 2 * SETS]]
  kernel = jax.random.normal(keys[-2], (kh, kw, cin, cout), jnp.float32)
  sign_bits = pk.pack_kernel(kernel)
  weights, tap_pop = pk.cuda_weights(sign_bits, (kh, kw, cin, cout))
  w16 = kernel.astype(jnp.bfloat16)
  conv_args = dict(kernel_size=(kh, kw), cin=cin, strides=strides, padding=pads)

  bf16 = jax.jit(
      lambda x, tau: jax.lax.conv_general_dilated(
          x, w16, (strides, strides), pads, dimension_numbers=DIMS
      )
  )
  cuda = jax.jit(
      lambda x, tau: binary_cuda.binary_conv(
          binary_cuda.sign_pack(x, tau), weights, tap_pop, **conv_args
      )
  )
  conv = jax.jit(lambda words: binary_cuda.binary_conv(words, weights, tap_pop, **conv_args))
  int8 = jax.jit(
      lambda x, tau: pk.sign_conv(
          pk.activation_bits(x, tau), sign_bits, (kh, kw, cin, cout), strides, pads, "int8"
      )
  )
  inputs = list(zip(xs, taus))
  words = [(binary_cuda.sign_pack(x, tau),) for x, tau in inputs]
  exact = bool(jnp.array_equal(cuda(*inputs[0]), int8(*inputs[0])))
  row = dict(
      bf16=time_ms(bf16, inputs, calls, reps),
      cuda=time_ms(cuda, inputs, calls, reps),
      conv=time_ms(conv, words, calls, reps),
      int8=time_ms(int8, inputs, calls, reps),
  )
  return dict(row, speedup=row["bf16"] / row["cuda"], exact=exact)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--calls", type=int, default=20, help="back-to-back calls per timing")
  parser.add_argument("--reps", type=int, default=5, help="timings per figure (median)")
  args = parser.parse_args(argv)
  reason = binary_cuda.unavailable_reason()
  if reason is not None:
    sys.exit(f"binary_conv benchmark needs the CUDA kernel: {reason}")
  device = jax.devices()[0].device_kind
  print(
      f"{datetime.date.today()} {device}, jax {jax.__version__}, {args.config}, "
      f"batch {args.batch}, median of {args.reps} x {args.calls} calls, ms per call"
  )
  header = (
      "layer (HxW Cin->Cout k s pad)",
      "layers",
      "bf16",
      "cuda",
      "conv",
      "int8",
      "speedup",
      "exact",
  )
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for shape, count in sorted(conv_shapes(args.config).items(), key=str):
    (kh, kw, cin, cout), strides, pads, (h, w) = shape
    r = bench_shape(shape, args.batch, args.calls, args.reps)
    name = f"{h}x{w} {cin}->{cout} {kh}x{kw} s{strides} {pads[0]}{pads[1]}"
    print(
        f"| {name} | {count} | {r['bf16']:.3f} | {r['cuda']:.3f} | {r['conv']:.3f} | "
        f"{r['int8']:.3f} | {r['speedup']:.2f}x | {r['exact']} |",
        flush=True,
    )


if __name__ == "__main__":
  main()
