"""What a second start of a train step costs, and what keeping its lowered program would save
(issue 14). JAX's persistent compilation cache skips XLA's compile at a second start, but the
start still traces the Python model and lowers it; keeping the step as a serialized
`jax.export` beside the cache skips both.

  python benchmarks/second_start.py --compilation-cache DIR [--preset tiny] [--config FILE[:variant]]
      [--method xnor] [--dtype bfloat16] [--train-batch 64]

Four fresh processes, one after another, share the cache folder DIR (emptied before each cold
run):
  jit cold        trace, lower, compile (fills the cache)
  jit second      trace, lower, load the executable from the cache
  export cold     trace and lower into a jax.export, serialize it to DIR/step.export,
                  lower and compile `Exported.call`
  export second   read and deserialize DIR/step.export, lower `Exported.call`, load from the cache
Each prints one JSON line (figure `second_start`, with path, run, the seconds of each part,
`start_s` their sum, and the loss of one call on the same inputs); a last line compares the
losses (`same_loss` and their `relative_spread`; above 1e-6 the script fails). The step is
exported on flat lists of arrays, since an export serializes only registered pytree types
(optax's states are not). Serializing needs `flatbuffers`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import jax

import bench

EXPORT_FILE = "step.export"
TREES_FILE = "step.trees"
RUNS = (("jit", "cold"), ("jit", "second"), ("export", "cold"), ("export", "second"))
LOSS_TOLERANCE = 1e-6
"""Relative spread of the four losses above which the script fails. On the H200 the exported
step compiles to another program than the jitted one and its loss differs in the last bits
(docs/benchmarks.md)."""


def timed(fn, *args):
  start = time.perf_counter()
  result = fn(*args)
  return result, time.perf_counter() - start


def first_loss(outputs) -> float:
  _, metrics = outputs
  return float(jax.device_get(metrics["loss"]))


def run_jit(step_fn, inputs) -> dict:
  step = jax.jit(step_fn, donate_argnums=0)
  traced, trace_s = timed(step.trace, *inputs)
  lowered, lower_s = timed(traced.lower)
  compiled, compile_s = timed(lowered.compile)
  return dict(
      trace_s=trace_s, lower_s=lower_s, compile_s=compile_s, loss=first_loss(compiled(*inputs))
  )


def run_export(step_fn, inputs, cache: str) -> dict:
  leaves, in_tree = jax.tree.flatten(inputs)
  donated = tuple(range(len(jax.tree.leaves(inputs[0]))))  # the train state's arrays
  path, trees_path = os.path.join(cache, EXPORT_FILE), os.path.join(cache, TREES_FILE)
  parts = {}
  if os.path.exists(path):
    start = time.perf_counter()
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    with open(trees_path, "rb") as f:
      out_tree = pickle.load(f)
    parts["load_s"] = time.perf_counter() - start
  else:
    trees = {}

    def flat(*args):
      out = step_fn(*jax.tree.unflatten(in_tree, args))
      flat_out, trees["out"] = jax.tree.flatten(out)
      return flat_out

    exported, parts["export_s"] = timed(jax.export.export(jax.jit(flat)), *leaves)
    start = time.perf_counter()
    with open(path, "wb") as f:
      f.write(exported.serialize())
    with open(trees_path, "wb") as f:
      pickle.dump(trees["out"], f)
    out_tree = trees["out"]
    parts["serialize_s"] = time.perf_counter() - start
  call = jax.jit(exported.call, donate_argnums=donated)
  lowered, parts["lower_s"] = timed(call.lower, *leaves)
  compiled, parts["compile_s"] = timed(lowered.compile)
  outputs = jax.tree.unflatten(out_tree, compiled(*leaves))
  return dict(parts, loss=first_loss(outputs))


def child(args) -> None:
  bench.runtime.enable_compilation_cache(args.compilation_cache)
  config = bench.preset_config(args.preset, args.dtype, args.config)
  start = time.perf_counter()
  _, _, _, step_fn, inputs = bench.train_step_setup(config, args.method, args.train_batch)
  setup_s = time.perf_counter() - start
  if args.child == "jit":
    result = run_jit(step_fn, inputs)
  else:
    result = run_export(step_fn, inputs, args.compilation_cache)
  start_s = sum(v for k, v in result.items() if k.endswith("_s"))
  print(json.dumps(dict(path=args.child, setup_s=setup_s, start_s=start_s, **result)))


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
      "--compilation-cache", required=True, metavar="DIR", help="the cache folder (emptied)"
  )
  parser.add_argument("--preset", choices=("cifar10", "tiny"), default="cifar10")
  parser.add_argument("--config", default="", help="a config file (path[:variant])")
  parser.add_argument("--method", choices=("fp", "xnor", "bidm"), default="xnor")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
  parser.add_argument("--train-batch", type=int, default=64)
  parser.add_argument("--child", choices=("jit", "export"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  rows = []  # printed at the end: this process must not take the device before its children
  for path, run in RUNS:
    if run == "cold":
      shutil.rmtree(args.compilation_cache, ignore_errors=True)
      os.makedirs(args.compilation_cache)
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", path]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows.append(dict(json.loads(out.strip().splitlines()[-1]), run=run))
  args.machine = bench.runtime.host_description()
  for row in rows:
    bench.emit(args, "second_start", row.pop("start_s"), "s", **row)
  losses = {f"{row['path']} {row['run']}": row["loss"] for row in rows}
  spread = (max(losses.values()) - min(losses.values())) / abs(losses["jit cold"])
  same = spread == 0
  bench.emit(args, "second_start_same_loss", same, "bool", losses=losses, relative_spread=spread)
  if spread > LOSS_TOLERANCE:
    sys.exit(f"the four runs' losses differ by more than float rounding: {losses}")


if __name__ == "__main__":
  main()
