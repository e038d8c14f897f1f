"""Speed benchmarks: prints one JSON line per figure (docs/benchmarks.md explains the method).

  python benchmarks/bench.py                       # CIFAR-10 configuration, float32
  python benchmarks/bench.py --dtype=bfloat16      # bf16 compute, f32 master weights
  python benchmarks/bench.py --preset=tiny         # small figures on any backend (CPU)
  python benchmarks/bench.py --dtype=bfloat16 --only xnor bidm --profile=/tmp/prof
                                                   # + a trace of each step (profile_summary.py)
  python benchmarks/bench.py --config=configs/lsun_bedrooms_ldm4.py --train-batch 4 \
      --only xnor bidm                             # any config file's model (Table 9: LDM-4)
  python benchmarks/bench.py --dtype=bfloat16 --only packed --sample-batches 512 [--packed-impl cuda]
                                                   # FP against packed W1A1 DDIM (issue 15)
  python benchmarks/bench.py --dtype=bfloat16 --compilation-cache=/tmp/xla
                                                   # a second run loads its steps from the cache

Each timing is the median of --iters calls after --warmup calls, with the device synchronised
(`block_until_ready`) around every call. Every figure records XLA_FLAGS and the compilation
cache in use; with a cache, `compile_s` of a second run is the time to load the step. The floor
of a step is its arithmetic (the model's own op counter times the passes of the step) over the
measured dense matmul rate of the same dtype.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax import runtime
from bidm_jax import sampling
from bidm_jax.binarize.methods import FP
from bidm_jax.evaluation.efficiency import count_costs
from bidm_jax.export import packed as packed_export
from bidm_jax.training import train as train_lib


PROFILED_CALLS = 5
"""Train-step calls traced by --profile (benchmarks/profile_summary.py --steps 5 reads them)."""


def emit(args, name: str, value, unit: str, **extra) -> None:
  """Prints one figure as a JSON line, naming the benchmarked configuration and the machine
  (`args.machine`: `runtime.host_description()`, read once per process)."""
  print(
      json.dumps(
          dict(
              figure=name,
              value=value,
              unit=unit,
              backend=jax.default_backend(),
              config=args.config or args.preset,
              **args.machine,
              compilation_cache=args.compilation_cache or None,
              **extra,
          )
      ),
      flush=True,
  )


def time_calls(fn, warmup: int, iters: int) -> float:
  """Median wall seconds of fn() (which must block on its result)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_peak_gib(compiled) -> float | None:
  """The compiled program's peak device memory as XLA plans it (arguments, outputs and
  temporaries of this one program), in GiB; None on CPU, whose plan leaves temporaries out, and
  for a program loaded from the persistent compilation cache, whose analysis reads 0 (seen on
  the H200 with jax 0.11.2)."""
  if jax.default_backend() == "cpu":
    return None
  try:
    peak = compiled.memory_analysis().peak_memory_in_bytes
  except (NotImplementedError, RuntimeError, AttributeError):
    return None
  return peak / 2**30 if peak else None


FREE_OPS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast"})


def program_ops(compiled) -> dict:
  """The compiled program's device work as XLA planned it, from its optimized HLO: `launches`,
  the instructions of the entry computation that run as work of their own (each fusion, copy,
  convolution, custom call or collective; parameters, constants, tuples and bitcasts are free),
  their `by_kind` counts, and `reductions`, the reduce operations in the whole program. On a
  GPU a launch is about one kernel, so the counts compare two versions of a step on any
  backend; the CPU's fusion differs from the GPU's, so they are not GPU kernel counts."""
  text = compiled.as_text()
  entry = text[text.index("\nENTRY") :]
  kinds = re.findall(r"^\s*(?:ROOT )?%\S+ = .*? ([a-z][\w-]*)\(", entry, flags=re.M)
  work = collections.Counter(k for k in kinds if k not in FREE_OPS)
  return dict(
      launches=sum(work.values()),
      by_kind=dict(work.most_common(8)),
      reductions=len(re.findall(r" reduce\(", text)),
  )


def matmul_rate(dtype, n: int, warmup: int, iters: int) -> float:
  """Measured FLOP/s of an n x n x n matrix product in `dtype` on random data."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  sec = time_calls(lambda: f(a, b).block_until_ready(), warmup, iters)
  return 2.0 * n**3 / sec


def preset_config(preset: str, dtype: str, config_file: str = ""):
  """The preset's configuration, or that of a config file (`path[:variant]`), in `dtype`."""
  config = config_lib.load_config_file(config_file) if config_file else config_lib.default_config()
  config.model.compute_dtype = dtype
  if preset == "tiny" and not config_file:
    config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    config.data.image_size = 16
    config.sampling.steps = 10
  return config


def forward_flops(model, config) -> float:
  """Arithmetic of one image's forward as the accelerator runs it (binary convs simulated in
  floating point: 2 FLOPs per binary multiply-accumulate), from the model's own op counter.
  XLA's cost analysis is not used: it does not count cuDNN convolutions."""
  costs = count_costs(model, builders.image_shape(config, 1)[1:])
  return costs["flops"] + 2.0 * costs["bops"]


def train_step_setup(config, method_name: str, batch: int, replicas: int = 1):
  """The un-jitted train step of `method_name` on `config`'s model and its inputs on the
  devices: (config, model, method, step_fn, (state, images, key, teacher_params)); random
  parameters (the QAT model initialised from a random FP teacher) and random images. With
  `replicas` > 1 the step is vmapped over that many independent runs (state, images and key
  stacked on a leading axis, one teacher), as several seeds of one configuration in one
  program would train."""
  c = config.copy_and_resolve_references()
  c.binarization.method = method_name
  method = config_lib.method_from_config(c)
  model = builders.make_model(c, method)
  mesh = builders.make_mesh(c)
  repl = NamedSharding(mesh, P())
  tx = builders.make_optimizer(c)
  teacher = builders.make_model(c, FP) if method.binary else None
  key = jax.random.PRNGKey(0)
  params = builders.init_params(model, c, key)
  teacher_params = builders.init_params(teacher, c, key) if teacher else None
  if teacher_params is not None:
    params = train_lib.overlay_params(params, teacher_params)
    teacher_params = jax.device_put(teacher_params, repl)
  state = train_lib.create_state(params, tx)
  shape, batch_spec = builders.image_shape(c, batch), P("data")
  step_fn = train_lib.make_train_step(c, model, builders.make_schedule(c), tx, teacher)
  if replicas > 1:
    state = jax.tree_util.tree_map(lambda a: jnp.stack([a] * replicas), state)
    shape, batch_spec = (replicas, *shape), P(None, "data")
    key = jax.random.split(key, replicas)
    step_fn = jax.vmap(step_fn, in_axes=(0, 0, 0, None))
  state = jax.device_put(state, repl)
  images = jax.device_put(
      jax.random.uniform(jax.random.PRNGKey(0), shape, jnp.float32, -1, 1),
      NamedSharding(mesh, batch_spec),
  )
  return c, model, method, step_fn, (state, images, key, teacher_params)


def bench_train_step(config, method_name: str, batch: int, args, rate: float) -> float:
  """Times one QAT/FP train step (of --replicas runs at once); returns the median seconds."""
  c, model, method, step_fn, inputs = train_step_setup(config, method_name, batch, args.replicas)
  state, images, key, teacher_params = inputs
  step = jax.jit(step_fn, donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, images, key, teacher_params).compile()
  compile_s = time.perf_counter() - start
  # forward + backward (2x) of the trained pass; the TBS first pass and the teacher: forward only
  passes = (
      3
      + (1 if model.num_connections else 0)
      + (1 if builders.make_distillation(c, method) is not None else 0)
  )
  flops = passes * batch * args.replicas * forward_flops(model, c)
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], images, key, teacher_params)
    jax.block_until_ready(metrics["loss"])

  sec = time_calls(call, args.warmup, args.iters)
  name = {"fp": "fp_train_step", "xnor": "xnor_qat_step", "bidm": "bidm_qat_step"}[method_name]
  if args.profile:  # after the timing, so that tracing cannot change the figure
    with jax.profiler.trace(os.path.join(args.profile, name), create_perfetto_trace=True):
      for _ in range(PROFILED_CALLS):
        call()
  emit(
      args,
      name,
      sec * 1e3,
      "ms",
      batch=batch,
      replicas=args.replicas,
      ms_per_replica=sec * 1e3 / args.replicas,
      dtype=c.model.compute_dtype,
      compile_s=compile_s,
      flops=flops,
      passes=passes,
      floor_ms=flops / rate * 1e3,
      fraction_of_floor=(flops / rate) / sec,
      peak_memory_gib=compiled_peak_gib(compiled),
      program=program_ops(compiled),
  )
  if method_name == "bidm":
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      emit(args, "bidm_step_peak_memory", stats["peak_bytes_in_use"] / 2**30, "GiB", batch=batch)
  return sec


def bench_sampling(
    config, batch: int, args, rate: float, method_name: str = "", engine: str = "simulated"
) -> float:
  """DDIM (config.sampling.steps) images/s of the config's method (or `method_name`), with the
  TBS cache where the model has connections; engine 'packed' runs the binary layers on packed
  sign bits (`export.packed.export_tree` of the same random parameters) with
  `args.packed_impl`. Returns images/s."""
  c = config.copy_and_resolve_references()
  if method_name:
    c.binarization.method = method_name
  c.sampling.update(engine=engine, packed_impl=args.packed_impl)
  method = config_lib.method_from_config(c)
  model = builders.make_model(c, method)
  mesh = builders.make_mesh(c)
  params = builders.init_params(model, c, jax.random.PRNGKey(0))
  if engine == "packed":
    layers, _ = packed_export.trace_binary_layers(model, builders.image_shape(c, 1)[1:])
    params = packed_export.export_tree(params, layers, method, c.model.compute_dtype)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  sample = sampling.make_sampler(c, model, builders.make_schedule(c), mesh)
  key = jax.random.PRNGKey(1)
  start = time.perf_counter()
  compiled = sample.lower(params, key, batch).compile()
  compile_s = time.perf_counter() - start
  flops = c.sampling.steps * batch * forward_flops(model, c)
  sec = time_calls(lambda: compiled(params, key).block_until_ready(), 1, max(3, args.iters // 4))
  name = {"simulated": "ddim_sampling_throughput", "packed": "packed_ddim_sampling_throughput"}
  emit(
      args,
      name[engine],
      batch / sec,
      "images/s",
      method=method.name,
      batch=batch,
      steps=c.sampling.steps,
      tbs_connections=model.num_connections,
      dtype=c.model.compute_dtype,
      impl=args.packed_impl if engine == "packed" else None,
      compile_s=compile_s,
      flops=flops,
      fraction_of_floor=(flops / rate) / sec,
      peak_memory_gib=compiled_peak_gib(compiled),
  )
  return batch / sec


def bench_packed_sampling(config, batch: int, args, rate: float) -> None:
  """Issue 15's end-to-end figures: the FP model's DDIM and the config's binary model's DDIM on
  packed bits, at one batch, and their ratio."""
  fp = bench_sampling(config, batch, args, rate, method_name="fp")
  packed = bench_sampling(config, batch, args, rate, engine="packed")
  emit(args, "packed_over_fp_sampling", packed / fp, "ratio", batch=batch, impl=args.packed_impl)


def bench_inception(args) -> None:
  """Inception-v3 pool features of 32x32 images (resized to 299), images/s, random weights."""
  from bidm_jax.evaluation.inception import InceptionV3

  model = InceptionV3()
  batch = 16 if args.preset == "tiny" else 500
  images = jax.random.uniform(jax.random.PRNGKey(0), (batch, 32, 32, 3), jnp.float32, 0, 255)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
  f = jax.jit(lambda p, x: model.apply(p, x)["pool"])
  sec = time_calls(lambda: f(params, images).block_until_ready(), 1, max(3, args.iters // 4))
  emit(args, "inception_feature_throughput", batch / sec, "images/s", batch=batch, dtype="float32")


def main():
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
      "--preset",
      choices=("cifar10", "tiny"),
      default="cifar10",
      help="the model (unless --config) and the sizes of the matmul and Inception figures",
  )
  parser.add_argument(
      "--config", default="", help="a config file (path[:variant]) instead of the preset's model"
  )
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--train-batch", type=int, default=64)
  parser.add_argument(
      "--replicas",
      type=int,
      default=1,
      help="train steps of this many independent runs in one vmapped program (seeds of one "
      "configuration); a figure is the time of one such step",
  )
  parser.add_argument("--sample-batches", type=int, nargs="+", default=[128, 512])
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument(
      "--only",
      nargs="+",
      default=None,
      help="subset of: floor fp xnor bidm sampling packed inception (packed: FP and packed "
      "W1A1 DDIM at each sample batch; not in the default set)",
  )
  parser.add_argument(
      "--profile",
      default="",
      metavar="DIR",
      help="after timing each train step, trace 5 more calls into DIR/<figure> (jax.profiler)",
  )
  parser.add_argument(
      "--packed-impl", choices=config_lib.PACKED_IMPLS, default="int8", help="for --only packed"
  )
  parser.add_argument(
      "--compilation-cache",
      default="",
      metavar="DIR",
      help="JAX's persistent compilation cache folder (off by default: compile_s is then a "
      "cold compile)",
  )
  args = parser.parse_args()
  if args.replicas < 1:
    parser.error(f"--replicas={args.replicas}: give 1 or more")
  args.machine = runtime.host_description()
  if args.compilation_cache:
    args.compilation_cache = runtime.enable_compilation_cache(args.compilation_cache)
  only = set(args.only or ("floor", "fp", "xnor", "bidm", "sampling", "inception"))
  try:
    config = preset_config(args.preset, args.dtype, args.config)
  except (OSError, ValueError, AttributeError) as e:
    parser.error(f"--config={args.config}: {e}")
  n = 1024 if args.preset == "tiny" else 8192
  rate = matmul_rate(jnp.dtype(args.dtype), n, 2, 10)
  if "floor" in only:
    emit(args, "matmul_rate", rate / 1e12, "TFLOP/s", n=n, dtype=args.dtype)
  times = {}
  for name in ("fp", "xnor", "bidm"):
    if name in only:
      times[name] = bench_train_step(config, name, args.train_batch, args, rate)
  if "xnor" in times and "bidm" in times:
    emit(args, "bidm_over_xnor_step", times["bidm"] / times["xnor"], "ratio")
  if "sampling" in only:
    for batch in args.sample_batches:
      bench_sampling(config, batch, args, rate)
  if "packed" in only:
    for batch in args.sample_batches:
      bench_packed_sampling(config, batch, args, rate)
  if "inception" in only:
    bench_inception(args)


if __name__ == "__main__":
  main()
