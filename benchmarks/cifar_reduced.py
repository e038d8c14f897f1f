"""The reduced-scale CIFAR-10 reproduction of the paper's Table 1 and Table 3 orderings.

One protocol for every method (docs/results.md states it with the figures):
  1. an FP DDPM trained from scratch on the training images (`--fp_steps`);
  2. W1A1 QAT of each method from that FP model, same steps / learning rate / batch for all;
  3. FID, sFID, precision and recall of `--eval_samples` DDIM samples against the training
     images, with the FID Inception network of `--inception_weights`.

  python benchmarks/cifar_reduced.py --data_dir=/data/cifar10 \
      --inception_weights=fid-inception-2015-12-05-fp16.npz --workdir=/tmp/cifar_reduced

`--data_dir` is an image folder with `train/<class>/*.jpg` (or PNG). Every stage goes through
`bidm_jax.main.run`, the command line's entry point, in a child process (`--parallel` of them
share the accelerator, which one small model leaves mostly idle; their step rates are therefore
not speed figures: benchmarks/bench.py measures those). A stage whose record exists is skipped,
so a rerun continues where an interrupted one stopped (training resumes from its checkpoint).
Writes <workdir>/results.json and <workdir>/samples.png (one labelled row per run).
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
    "bidm": dict(method="bidm"),
    "xnor+tbs": dict(method="xnor", learnable_k=True, cross_timestep=True),
    "xnor+spd": dict(method="xnor", distillation="spd"),
}
GRID_IMAGES = 10
CONFIG_FILE = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "cifar10.py")


def base_config(args, variant: str):
  """configs/cifar10.py with the reduced model, the folder data and the evaluation fields."""
  c = config_lib.load_config_file(f"{CONFIG_FILE}:{variant}")
  c.model.update(ch=args.ch, ch_mult=tuple(args.ch_mult), compute_dtype=args.dtype)
  c.data.update(source="folder", data_dir=args.data_dir, split="train",
                num_workers=args.data_workers)
  c.training.update(progress_bar=False, log_every=250, checkpoint_every=args.checkpoint_every,
                    keep_checkpoints=1)
  c.sampling.update(steps=args.ddim_steps, batch_size=args.eval_batch)
  c.eval.update(num_samples=args.eval_samples, batch_size=args.eval_batch,
                inception_weights=args.inception_weights, keep_samples=True,
                reference=os.path.join(args.workdir, "reference_stats.npz"),
                num_reference=args.num_reference, pr_reference=args.eval_samples,
                progress_bar=False)
  return c


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
    print(json.dumps({"stage": name, **{k: v for k, v in result.items()
                                        if isinstance(v, (int, float, str))}}), flush=True)
  with open(record) as f:
    return json.load(f)


def fp_config(args):
  config = base_config(args, "fp")
  config.training.update(steps=args.fp_steps, batch_size=args.fp_batch, learning_rate=args.fp_lr,
                         warmup_steps=min(1000, args.fp_steps // 10), ema_decay=args.ema_decay)
  return config


def qat_config(args, name: str):
  config = base_config(args, "bidm")
  config.binarization.update(RUNS[name])
  config.training.update(steps=args.qat_steps, batch_size=args.qat_batch, learning_rate=args.qat_lr,
                         ema_decay=args.ema_decay, teacher=os.path.join(args.workdir, "fp"))
  return config


def run_job(args, job: str) -> None:
  """One stage in this process: 'reference', 'fp' (training), 'fp-eval', or a run of RUNS."""
  w = args.workdir
  if job == "reference":
    stage(job, os.path.join(w, "reference.json"), lambda: cli.run(fp_config(args), w, "ref_stats"))
  elif job == "fp":
    stage(job, os.path.join(w, "fp", "train.json"),
          lambda: cli.run(fp_config(args), os.path.join(w, "fp"), "train"))
  elif job == "fp-eval":
    evaluate_run(fp_config(args), os.path.join(w, "fp"), "fp")
  else:
    config = qat_config(args, job)
    stage(f"{job}/train", os.path.join(w, job, "train.json"),
          lambda: cli.run(config, os.path.join(w, job), "train"))
    evaluate_run(config, os.path.join(w, job), job)


def evaluate_run(config, workdir: str, name: str) -> None:
  stage(f"{name}/evaluate", os.path.join(workdir, "evaluate.json"),
        lambda: cli.run(config, workdir, "evaluate"))
  samples = os.path.join(workdir, "eval_samples.npz")
  if os.path.exists(samples):
    np.save(os.path.join(workdir, "grid.npy"), np.load(samples)["images"][:GRID_IMAGES])
    os.remove(samples)


def launch(argv: list[str], job: str, workdir: str, parallel: int) -> None:
  """Runs `job` in a child process (its own share of accelerator memory); raises on failure."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / parallel:.2f}")
  log = os.path.join(workdir, f"{job}.log")
  start = time.perf_counter()
  with open(log, "w") as f:
    code = subprocess.call([sys.executable, __file__, *argv, f"--job={job}"], stdout=f,
                           stderr=subprocess.STDOUT, env=env)
  print(json.dumps({"job": job, "exit": code, "wall_s": round(time.perf_counter() - start, 1)}),
        flush=True)
  if code:
    raise RuntimeError(f"job {job} failed (exit {code}); see {log}")


def summarize(args, wall_s: float) -> dict:
  def load(path):
    with open(path) as f:
      return json.load(f)

  runs, rows = {}, {}
  for name in ["fp", *args.runs]:
    d = os.path.join(args.workdir, name)
    train, metrics = load(os.path.join(d, "train.json")), load(os.path.join(d, "evaluate.json"))
    runs[name] = dict(loss=train.get("loss"), steps=train.get("step"),
                      steps_per_sec=train.get("steps_per_sec"), train_wall_s=train.get("wall_s"),
                      **{k: metrics.get(k) for k in ("fid", "sfid", "precision", "recall",
                                                     "num_samples", "images_per_s", "wall_s")})
    if os.path.exists(os.path.join(d, "grid.npy")):
      images = np.load(os.path.join(d, "grid.npy")).astype(np.float32) / 127.5 - 1
      rows[f"{name}\nFID {metrics['fid']:.1f}"] = images
  save_labelled_rows(rows, os.path.join(args.workdir, "samples.png"), ncols=GRID_IMAGES, scale=2)
  summary = dict(protocol={k: v for k, v in vars(args).items() if k != "job"},
                 reference=load(os.path.join(args.workdir, "reference.json")),
                 wall_s=wall_s, runs=runs)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--inception_weights", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
  parser.add_argument("--ch", type=int, default=64)
  parser.add_argument("--ch_mult", type=int, nargs="+", default=[1, 2, 2, 2])
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--fp_steps", type=int, default=10_000)
  parser.add_argument("--fp_batch", type=int, default=128)
  parser.add_argument("--fp_lr", type=float, default=2e-4)
  parser.add_argument("--qat_steps", type=int, default=2_000)
  parser.add_argument("--qat_batch", type=int, default=64)
  parser.add_argument("--qat_lr", type=float, default=2e-4)
  parser.add_argument("--ema_decay", type=float, default=0.999)
  parser.add_argument("--ddim_steps", type=int, default=100)
  parser.add_argument("--eval_samples", type=int, default=10_000)
  parser.add_argument("--eval_batch", type=int, default=500)
  parser.add_argument("--num_reference", type=int, default=0, help="0: all training images")
  parser.add_argument("--data_workers", type=int, default=4)
  parser.add_argument("--checkpoint_every", type=int, default=1000)
  parser.add_argument("--parallel", type=int, default=3,
                      help="jobs sharing the accelerator at once (small models leave it idle)")
  parser.add_argument("--job", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.job:
    run_job(args, args.job)
    return
  os.makedirs(args.workdir, exist_ok=True)
  argv = [a for a in sys.argv[1:] if not a.startswith("--job")]
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    for wave in (["reference", "fp"], ["fp-eval", *args.runs]):
      for future in [pool.submit(launch, argv, job, args.workdir, args.parallel) for job in wave]:
        future.result()
  summary = summarize(args, time.perf_counter() - start)
  print(json.dumps(summary["runs"], indent=1), flush=True)


if __name__ == "__main__":
  main()
