"""Where a profiled step's time goes: a summary of a jax.profiler trace as one JSON object.

    python benchmarks/profile_summary.py WORKDIR/profile [--steps 5] [--top 25]

Reads the newest `perfetto_trace.json.gz` under the folder (written by `jax.profiler` with
`create_perfetto_trace=True`, e.g. by `--config.training.profile_start`). For each traced
process (the host, and each device with its streams) it reports the events per step, the time
they cover (overlaps merged) against the trace's span, their median duration, the time and
count by kernel kind, the events outside XLA's command buffers (CUDA graphs; launched one by
one), and what takes the most time per step: by XLA op name where the trace gives one
(`top_ops`) and by event name (`top_names`: on a GPU the kernels; on the host e.g. the
executable's thunk loop and XLA's CUDA-graph `command_buffer::update` / `::execute`). On a GPU,
`events_per_step` is the kernels per step and `busy_fraction` the share of the time the GPU ran
a kernel of this process.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys


def newest_trace(folder: str) -> str:
  found = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {folder}")
  return max(found, key=os.path.getmtime)


def covered(intervals: list[tuple[float, float]]) -> float:
  """Total length of the union of [start, end) intervals."""
  total, end = 0.0, float("-inf")
  for a, b in sorted(intervals):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


KERNEL_KINDS = (
    ("convolution", re.compile(r"conv|xmma|cudnn|implicit|wgrad|dgrad|fprop", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|cublas|matmul|dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
)


DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Framework Ops", "Framework Name Scope")
"""TensorBoard's summary lines: copies of the stream events, left out so nothing counts twice."""


def kind_of(name: str) -> str:
  """The kernel kind of an event name (KERNEL_KINDS, first match), else 'fusion/other'."""
  for kind, pattern in KERNEL_KINDS:
    if pattern.search(name):
      return kind
  return "fusion/other"


def top_rows(time_us: collections.Counter, count: collections.Counter, steps: int, top: int):
  """The `top` keys by time, each with its time (ms) and number per step."""
  return [
      {"name": k[:120], "ms_per_step": v / 1e3 / steps, "count_per_step": count[k] / steps}
      for k, v in time_us.most_common(top)
  ]


def summarize(events: list[dict], steps: int, top: int) -> dict:
  """The summary of one trace's events (Chrome trace format) covering `steps` steps."""
  process_names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
  thread_names = {
      (e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("name") == "thread_name"
  }
  by_pid = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      if thread_names.get((e["pid"], e.get("tid"))) not in DERIVED_LINES:
        by_pid[e["pid"]].append(e)
  processes = {}
  for pid, evs in by_pid.items():
    start = min(e["ts"] for e in evs)
    span = max(e["ts"] + e["dur"] for e in evs) - start
    busy = covered([(e["ts"], e["ts"] + e["dur"]) for e in evs])
    op_time, op_count = collections.Counter(), collections.Counter()
    name_time, name_count = collections.Counter(), collections.Counter()
    kinds, kind_counts = collections.Counter(), collections.Counter()
    ops_known = outside_graphs = 0
    for e in evs:
      hlo_op = e.get("args", {}).get("hlo_op")
      if hlo_op:
        ops_known += 1
        outside_graphs += not hlo_op.startswith("command_buffer")
      op = hlo_op or e["name"]
      op_time[op] += e["dur"]
      op_count[op] += 1
      name_time[e["name"]] += e["dur"]
      name_count[e["name"]] += 1
      kind = kind_of(e["name"])
      kinds[kind] += e["dur"]
      kind_counts[kind] += 1
    durations = sorted(e["dur"] for e in evs)
    total = sum(durations)
    processes[process_names.get(pid, str(pid))] = {
        "events": len(evs),
        "events_per_step": len(evs) / steps,
        "span_ms": span / 1e3,
        "busy_ms": busy / 1e3,
        "busy_fraction": busy / span if span else 0.0,
        "event_time_ms": total / 1e3,
        "mean_event_us": total / len(evs),
        "median_event_us": durations[len(durations) // 2],
        "events_under_5us": sum(d < 5 for d in durations) / len(durations),
        "time_by_kind_ms": {k: v / 1e3 for k, v in kinds.most_common()},
        "count_by_kind_per_step": {k: kind_counts[k] / steps for k, _ in kinds.most_common()},
        # events XLA attributes to an op that is not a command buffer (CUDA graph): launched
        # one by one; None where the trace names no ops (the host, a CPU backend)
        "events_outside_command_buffers_per_step": (outside_graphs / steps if ops_known else None),
        "top_ops": top_rows(op_time, op_count, steps, top),  # by XLA op where known
        "top_names": top_rows(name_time, name_count, steps, top),  # on a GPU: the kernels
    }
  return {"steps": steps, "processes": processes}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("folder")
  parser.add_argument("--steps", type=int, default=5, help="steps the trace covers")
  parser.add_argument(
      "--top", type=int, default=25, help="rows of top_ops and top_names per process"
  )
  args = parser.parse_args(argv)
  if args.steps < 1 or args.top < 1:
    parser.error("--steps and --top must be >= 1")
  try:
    path = newest_trace(args.folder)
    with gzip.open(path, "rt") as f:
      trace = json.load(f)
  except (OSError, ValueError) as e:
    print(f"profile_summary: {e}", file=sys.stderr)
    return 1
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  out = summarize(events, args.steps, args.top)
  out["trace"] = path
  print(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
