"""The reduced-scale CIFAR-10 study: the paper's Table 1 and Table 3 orderings on one GPU.

One protocol for every run (docs/results.md states it with the figures):
  1. the FP teacher: `--teacher=PATH` (an FP workdir or exported folder), else trained here
     with `configs/cifar10.py:small_fp` for `--fp_steps`;
  2. W1A1 QAT of each run of `--runs`, once per seed of `--seeds`, from that teacher with
     `configs/cifar10.py:small` for `--qat_steps` (the same recipe for all; `--set` overrides
     any config field of every stage, e.g. `--set training.learning_rate=1e-4`, applied after
     the script's own settings);
  3. FID, sFID, precision, recall and the image-health figures of `--eval_samples` DDIM
     samples of each model against the training images, with x0 clipping off, on, or both
     (`--clip`), from its EMA parameters, its raw ones, or both (`--params`), at its last step
     and at the earlier checkpoint steps of `--eval_steps` (multiples of `--checkpoint_every`).

  python benchmarks/cifar_reduced.py --data_dir=CIFAR_JPEG --workdir=/tmp/cr \
      --inception_weights=fid-inception-2015-12-05-fp16.npz --teacher=TEACHER \
      --runs xnor bidm xnor+tbs xnor+spd --seeds 0 1 --clip both --parallel 4

`--data_dir` is an image folder with `train/<class>/*.jpg` (or PNG). Every stage goes through
`bidm_jax.main.run`, the command line's entry point, in a child process (`--parallel` of them
share the accelerator, which one small model leaves mostly idle; their step rates are
therefore not speed figures: benchmarks/bench.py measures those; on an NVIDIA GPU start CUDA MPS
first, `benchmarks/gpu_jobs.sh mps`, which let six QAT jobs run 67 steps/s together on an H200
against 36 for one alone). A stage whose record exists
is skipped, so a rerun continues where an interrupted one stopped (training resumes from its
checkpoint). Writes one record per evaluated model, <workdir>/<run>-s<seed>/<eval>.json,
<workdir>/results.json and <workdir>/samples.png (one labelled row per evaluation).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from bidm_jax import config as config_lib
from bidm_jax import main as cli
from bidm_jax.training.logging import save_labelled_rows

# run name -> binarization overrides (Table 1: methods; Table 3: BiDM's parts on XNOR).
RUNS = {
    "xnor": dict(method="xnor"),
    "xnorpp": dict(method="xnorpp"),
    "dorefa": dict(method="dorefa"),
    "reactnet": dict(method="reactnet"),
    "reste": dict(method="reste"),
    "bbcu": dict(method="bbcu"),
    "efficientdm": dict(method="efficientdm"),
    "bidm": dict(method="bidm"),
    "xnor+tbs": dict(method="xnor", learnable_k=True, cross_timestep=True),
    "xnor+spd": dict(method="xnor", distillation="spd"),
}
CLIP = {"off": [False], "on": [True], "both": [False, True]}
GRID_IMAGES = 10
CONFIG_FILE = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "cifar10.py")


def parse_value(text: str):
  """A --set value: a Python literal (number, bool, tuple) where it parses, else the string."""
  import ast  # pylint: disable=import-outside-toplevel

  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_sets(config, items: list[str]):
  """`config` with each --set FIELD=VALUE applied (a dotted field, a `parse_value` value)."""
  for item in items:
    key, _, value = item.partition("=")
    *groups, field = key.split(".")
    node = config
    for g in groups:
      node = node[g]
    node[field] = parse_value(value)
  return config


def base_config(args, variant: str):
  """configs/cifar10.py:<variant> with the folder data and the evaluation fields."""
  c = config_lib.load_config_file(f"{CONFIG_FILE}:{variant}")
  c.data.update(source="folder", data_dir=args.data_dir, split="train")
  c.training.update(checkpoint_every=args.checkpoint_every, keep_checkpoints=1)
  c.sampling.update(steps=args.ddim_steps, batch_size=args.eval_batch)
  c.eval.update(
      num_samples=args.eval_samples,
      batch_size=args.eval_batch,
      inception_weights=args.inception_weights,
      keep_samples=True,
      reference=os.path.join(args.workdir, "reference_stats.npz"),
      num_reference=args.num_reference,
      pr_reference=args.eval_samples,
      progress_bar=False,
  )
  return apply_sets(c, args.set)


def teacher_path(args) -> str:
  return args.teacher or os.path.join(args.workdir, "fp")


def fp_config(args):
  config = base_config(args, "small_fp")
  config.training.steps = args.fp_steps
  return config


def qat_config(args, run: str, seed: int):
  config = base_config(args, "small")
  config.seed = seed
  config.binarization.update(RUNS[run])
  config.training.update(steps=args.qat_steps, teacher=teacher_path(args))
  # every checkpoint from the earliest evaluated step on stays (one more for a preemption's save)
  t = config.training
  earliest = min(qat_eval_steps(args))
  if earliest < args.qat_steps:
    needed = -(-(args.qat_steps - earliest) // t.checkpoint_every) + 2
    t.keep_checkpoints = max(t.keep_checkpoints, needed)
  return config


def stage(name: str, record: str, fn) -> dict:
  """Runs fn() and keeps its result (with its wall time) in the JSON file `record`, unless
  that file exists from an earlier run; returns the record."""
  if not os.path.exists(record):
    start = time.perf_counter()
    result = fn()
    result["wall_s"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record, "w") as f:
      json.dump(result, f, indent=2, default=str)
    print(
        json.dumps(
            {"stage": name, **{k: v for k, v in result.items() if isinstance(v, (int, float, str))}}
        ),
        flush=True,
    )
  with open(record) as f:
    return json.load(f)


def qat_eval_steps(args) -> list[int]:
  """The checkpoint steps each QAT model is evaluated at: --eval_steps and the last."""
  return sorted(set(args.eval_steps) | {args.qat_steps})


def eval_names(args, raw: bool) -> list[tuple[str, bool, bool, int]]:
  """(record name, clip_x0, use_ema, checkpoint step) of every evaluation of one model; raw
  parameters and earlier steps only where `raw` (QAT workdirs; a teacher folder holds one set of
  parameters: step 0). A step before the last adds `_at<step>` to the name."""
  params = [True, False] if raw and args.params == "both" else [args.params != "raw" or not raw]
  steps = qat_eval_steps(args) if raw else [0]
  return [
      (
          "evaluate"
          + ("_clip" if clip else "")
          + ("" if ema else "_raw")
          + (f"_at{step}" if raw and step != args.qat_steps else ""),
          clip,
          ema,
          step,
      )
      for step in steps
      for ema in params
      for clip in CLIP[args.clip]
  ]


def evaluations(args, config, model: str, records: str, raw: bool) -> None:
  """Evaluates the model in `model` once per clip setting (and parameter set, `eval_names`),
  keeping the records (and a few samples for the grid) in the folder `records`."""
  for name, clip, ema, step in eval_names(args, raw):
    c = config.copy_and_resolve_references()
    c.sampling.update(clip_x0=clip, use_ema=ema, checkpoint=model, checkpoint_step=step)
    eval_dir = os.path.join(records, name)
    stage(
        f"{records}/{name}",
        os.path.join(records, f"{name}.json"),
        lambda c=c, eval_dir=eval_dir: cli.run(c, eval_dir, "evaluate"),
    )
    samples = os.path.join(eval_dir, "eval_samples.npz")
    if os.path.exists(samples):
      np.save(os.path.join(records, f"{name}_grid.npy"), np.load(samples)["images"][:GRID_IMAGES])
      os.remove(samples)


def job_name(run: str, seed: int) -> str:
  return f"{run}-s{seed}"


def run_job(args, job: str) -> None:
  """One stage in this process: 'reference', 'fp' (training), 'fp-eval', or '<run>-s<seed>'."""
  w = args.workdir
  if job == "reference":
    stage(job, os.path.join(w, "reference.json"), lambda: cli.run(fp_config(args), w, "ref_stats"))
  elif job == "fp":
    stage(
        job,
        os.path.join(w, "fp", "train.json"),
        lambda: cli.run(fp_config(args), os.path.join(w, "fp"), "train"),
    )
  elif job == "fp-eval":
    evaluations(args, fp_config(args), teacher_path(args), os.path.join(w, "fp-eval"), raw=False)
  else:
    run, _, seed = job.rpartition("-s")
    config = qat_config(args, run, int(seed))
    workdir = os.path.join(w, job)
    stage(
        f"{job}/train",
        os.path.join(workdir, "train.json"),
        lambda: cli.run(config, workdir, "train"),
    )
    evaluations(args, config, workdir, workdir, raw=True)


def launch(argv: list[str], job: str, workdir: str, parallel: int) -> None:
  """Runs `job` in a child process (its own share of accelerator memory and of the CPU cores
  for BLAS, whose threads would otherwise oversubscribe the host); raises on failure."""
  threads = str(max(1, (os.cpu_count() or 1) // parallel))  # BLAS threads: no oversubscription
  env = dict(
      os.environ,
      XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / parallel:.2f}",
      OMP_NUM_THREADS=threads,
      OPENBLAS_NUM_THREADS=threads,
      MKL_NUM_THREADS=threads,
  )
  log = os.path.join(workdir, f"{job}.log")
  start = time.perf_counter()
  with open(log, "w") as f:
    code = subprocess.call(
        [sys.executable, __file__, *argv, f"--job={job}"],
        stdout=f,
        stderr=subprocess.STDOUT,
        env=env,
    )
  print(
      json.dumps({"job": job, "exit": code, "wall_s": round(time.perf_counter() - start, 1)}),
      flush=True,
  )
  if code:
    raise RuntimeError(f"job {job} failed (exit {code}); see {log}")


def summarize(args, jobs: list[str], wall_s: float) -> dict:
  def load(path):
    with open(path) as f:
      return json.load(f)

  runs, rows = {}, {}
  for job in ["fp", *jobs]:
    d = os.path.join(args.workdir, "fp-eval" if job == "fp" else job)
    train_file = os.path.join(args.workdir, job, "train.json")
    train = load(train_file) if os.path.exists(train_file) else {}
    for name, clip, ema, step in eval_names(args, raw=job != "fp"):
      metrics = load(os.path.join(d, f"{name}.json"))
      at = f" @{step}" if job != "fp" and step != args.qat_steps else ""
      key = f"{job}{' clip' if clip else ''}{'' if ema else ' raw'}{at}"
      runs[key] = dict(
          loss=train.get("loss"),
          steps=train.get("step"),
          steps_per_sec=train.get("steps_per_sec"),
          train_wall_s=train.get("wall_s"),
          **{
              k: metrics.get(k)
              for k in (
                  "fid",
                  "sfid",
                  "precision",
                  "recall",
                  "saturated_fraction",
                  "mean_image_std",
                  "num_samples",
                  "checkpoint_step",
                  "wall_s",
              )
          },
      )
      grid = os.path.join(d, f"{name}_grid.npy")
      if os.path.exists(grid):
        rows[f"{key}\nFID {metrics['fid']:.1f}"] = np.load(grid).astype(np.float32) / 127.5 - 1
  if rows:
    save_labelled_rows(rows, os.path.join(args.workdir, "samples.png"), ncols=GRID_IMAGES, scale=2)
  summary = dict(
      protocol={k: v for k, v in vars(args).items() if k != "job"},
      reference=load(os.path.join(args.workdir, "reference.json")),
      wall_s=wall_s,
      runs=runs,
  )
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  return summary


def make_parser() -> argparse.ArgumentParser:
  """The command line: the protocol's flags (module docstring)."""
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--inception_weights", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument(
      "--teacher",
      default="",
      help="an FP workdir or exported folder; empty: train configs/cifar10.py:small_fp here",
  )
  parser.add_argument("--runs", nargs="+", default=["xnor", "bidm"], choices=list(RUNS))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--fp_steps", type=int, default=16_000)
  parser.add_argument("--qat_steps", type=int, default=10_000)
  parser.add_argument(
      "--set",
      nargs="*",
      default=[],
      metavar="FIELD=VALUE",
      help="config overrides of every stage, e.g. training.learning_rate=1e-4",
  )
  parser.add_argument(
      "--clip",
      default="both",
      choices=list(CLIP),
      help="evaluate with the x0 prediction clipped to [-1, 1], not, or both",
  )
  parser.add_argument(
      "--params",
      default="ema",
      choices=("ema", "raw", "both"),
      help="evaluate each QAT model's EMA parameters, its raw ones, or both",
  )
  parser.add_argument("--ddim_steps", type=int, default=100)
  parser.add_argument("--eval_samples", type=int, default=10_000)
  parser.add_argument("--eval_batch", type=int, default=1000)
  parser.add_argument("--num_reference", type=int, default=0, help="0: all training images")
  parser.add_argument("--checkpoint_every", type=int, default=2500)
  parser.add_argument(
      "--eval_steps",
      type=int,
      nargs="*",
      default=[],
      help="earlier QAT checkpoint steps to evaluate too (multiples of --checkpoint_every)",
  )
  parser.add_argument(
      "--parallel",
      type=int,
      default=3,
      help="jobs sharing the accelerator at once (small models leave it idle)",
  )
  parser.add_argument("--job", default="", help=argparse.SUPPRESS)
  return parser


def main():
  parser = make_parser()
  args = parser.parse_args()
  jobs = [job_name(r, s) for r in args.runs for s in args.seeds]
  every = base_config(args, "small").training.checkpoint_every  # after --set
  for step in args.eval_steps:
    if not 0 < step <= args.qat_steps or (step % every and step != args.qat_steps):
      parser.error(
          f"--eval_steps: {step} is not a checkpoint step (a multiple of checkpoint_every="
          f"{every} up to --qat_steps={args.qat_steps})"
      )
  for run in args.runs:  # a bad --set fails here, before anything runs
    config_lib.validate(qat_config(args, run, 0))
  config_lib.validate(fp_config(args))
  if args.job:
    run_job(args, args.job)
    return
  os.makedirs(args.workdir, exist_ok=True)
  argv = [a for a in sys.argv[1:] if not a.startswith("--job")]
  start = time.perf_counter()
  first = ["reference"] + ([] if args.teacher else ["fp"])
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    for wave in (first, ["fp-eval", *jobs]):
      for future in [pool.submit(launch, argv, job, args.workdir, args.parallel) for job in wave]:
        future.result()
  summary = summarize(args, jobs, time.perf_counter() - start)
  print(json.dumps(summary["runs"], indent=1), flush=True)


if __name__ == "__main__":
  main()
