"""The paper's Table 1 and Table 3 orderings at the digits demo's scale, on a CPU.

One protocol for every run, the demo's (`configs/digits.py`, docs/results.md states it):
  1. the FP teacher: the demo's FP stage (pipeline.fp_steps at pipeline.fp_learning_rate),
     trained once in <workdir>/fp, or another study's with `--teacher` (for sweeps of --set);
  2. W1A1 QAT of each run of `--runs` (the names of benchmarks/cifar_reduced.py: methods, and
     BiDM's parts on XNOR), once per seed of `--seeds`, from that teacher with the demo's QAT
     recipe (pipeline.qat_steps at pipeline.qat_learning_rate; `--set` overrides any config
     field of every stage, e.g. `--set training.ema_decay=0.999`);
  3. the digits Frechet distance (bidm_jax.evaluation.digits) of `--eval_samples` DDIM samples of
     each model's EMA parameters, x0 clipped and not clipped, from the same noise for every
     model (`--sample_seed`), so that runs differ only by their training.

  python benchmarks/digits_study.py --workdir=/tmp/digits_study \
      --runs xnor xnor+tbs xnor+spd bidm --seeds 0 1 2

Everything runs in this process, one stage after another; a stage whose record exists is
skipped, so a rerun continues where an interrupted one stopped (a record of other --set
overrides is refused). Writes <workdir>/<run>-s<seed>.json
per model, <workdir>/results.json (every record; per run the mean and half-range over its
seeds, also of its score minus XNOR's of the same seed) and <workdir>/samples.png (the first
clipped samples of each model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import time

import numpy as np

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax import demo
from bidm_jax import runtime
from bidm_jax.evaluation.digits import DigitsJudge
from bidm_jax.training import train as train_lib
from bidm_jax.training.logging import save_labelled_rows
from cifar_reduced import RUNS, apply_sets, stage

CONFIG_FILE = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.py")
GRID_IMAGES = 16


def base_config(args):
  """configs/digits.py[:variant] with --set applied."""
  config = config_lib.load_config_file(CONFIG_FILE + (f":{args.variant}" if args.variant else ""))
  config.training.progress_bar = False
  config = apply_sets(config, args.set)
  config.sampling.update(clip_x0=True, dynamic_threshold=0.0)  # judged clipped and not
  return config


def teacher_dir(args) -> str:
  """The FP teacher's workdir: --teacher, else <workdir>/fp (trained there when missing)."""
  return args.teacher or os.path.join(args.workdir, "fp")


def stage_config(args, run: str, seed: int):
  """The config of one stage: 'fp' (the teacher) or a run of RUNS with its seed."""
  config = base_config(args)
  p = config.pipeline
  if run == "fp":
    return demo.stage_config(config, "fp", p.fp_steps, p.fp_learning_rate)
  c = demo.stage_config(
      config,
      RUNS[run]["method"],
      p.qat_steps,
      p.qat_learning_rate,
      teacher=teacher_dir(args),
  )
  c.binarization.update(RUNS[run])
  c.seed = seed
  return c


def train_and_score(args, judge: DigitsJudge, run: str, seed: int) -> dict:
  """Trains one model (resuming if interrupted) and scores its samples, clipped and not."""
  config = stage_config(args, run, seed)
  workdir = os.path.join(args.workdir, "fp" if run == "fp" else f"{run}-s{seed}")
  start = time.perf_counter()
  summary = train_lib.train(config, workdir)
  train_s = time.perf_counter() - start
  model = builders.make_model(config, config_lib.method_from_config(config))
  record = dict(
      run=run,
      seed=seed,
      method=config.binarization.method,
      binarization={k: config.binarization[k] for k in sorted(RUNS.get(run, {}))},
      overrides=list(args.set),
      steps=summary["step"],
      **demo.final_losses(summary, workdir),
      train_s=train_s,
      **runtime.host_description(),
      date=datetime.date.today().isoformat(),
  )
  scores, plain, images, _ = demo.judge_samples(
      config, model, summary["state"].ema_params, judge, args.eval_samples, args.sample_seed
  )
  record.update(scores, **{f"{k}_not_clipped": v for k, v in plain.items()})
  np.save(os.path.join(workdir, "grid.npy"), images[:GRID_IMAGES])
  return record


def check_overrides(args, record: str) -> None:
  """Refuses to reuse a stage record that was trained with other --set overrides."""
  if os.path.exists(record):
    with open(record) as f:
      kept = json.load(f).get("overrides", [])
    if kept != list(args.set):
      raise SystemExit(
          f"digits_study: {record} was trained with --set {kept}, not {list(args.set)};"
          " use another --workdir (and --teacher to share the FP model)"
      )


def spread(values: list[float]) -> dict:
  """Mean and half-range of one figure over seeds."""
  a = np.asarray(values, np.float64)
  return dict(mean=float(a.mean()), half_range=float(a.max() - a.min()) / 2, n=len(a))


def summarize(records: dict[str, dict], baseline: str = "xnor") -> dict:
  """Per run (over its seeds): the mean and half-range of each digits_fd and the loss, and of
  digits_fd minus the `baseline` run's of the same seed (same data order and noise draws)."""
  by_run: dict[str, dict[int, dict]] = {}
  for r in records.values():
    by_run.setdefault(r["run"], {})[r["seed"]] = r
  runs = {}
  for run, rs in by_run.items():
    runs[run] = {
        k: spread([r[k] for r in rs.values()])
        for k in ("digits_fd", "digits_fd_not_clipped", "loss_dm")
        if all(r.get(k) is not None for r in rs.values())
    }
    paired = sorted(set(rs) & set(by_run.get(baseline, {})))
    if run != baseline and paired:
      runs[run][f"digits_fd_minus_{baseline}"] = spread(
          [rs[s]["digits_fd"] - by_run[baseline][s]["digits_fd"] for s in paired]
      )
  return runs


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--runs", nargs="+", default=["xnor", "xnor+tbs", "xnor+spd", "bidm"])
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
  parser.add_argument("--eval_samples", type=int, default=512)
  parser.add_argument("--sample_seed", type=int, default=1)
  parser.add_argument("--variant", default="", help="configs/digits.py variant ('smoke')")
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
  parser.add_argument(
      "--teacher",
      default="",
      help="an FP workdir (e.g. another study's <workdir>/fp) to start from instead of training one",
  )
  return parser


def main(argv: list[str] | None = None) -> dict:
  args = make_parser().parse_args(argv)
  unknown = sorted(set(args.runs) - set(RUNS))
  if unknown:
    raise SystemExit(f"digits_study: unknown run(s) {unknown}; valid: {sorted(RUNS)}")
  start = time.perf_counter()
  judge = DigitsJudge(0)
  if args.teacher and not os.path.isdir(args.teacher):
    raise SystemExit(f"digits_study: --teacher {args.teacher} is not a directory")
  jobs = [] if args.teacher else [("fp", 0)]
  jobs += [(run, seed) for seed in args.seeds for run in args.runs]
  records = {}
  for run, seed in jobs:
    name = "fp" if run == "fp" else f"{run}-s{seed}"
    check_overrides(args, os.path.join(args.workdir, f"{name}.json"))
    records[name] = stage(
        name,
        os.path.join(args.workdir, f"{name}.json"),
        lambda run=run, seed=seed: train_and_score(args, judge, run, seed),
    )
  rows = {
      f"{name}\nfd {r['digits_fd']:.2f}": np.load(os.path.join(args.workdir, name, "grid.npy"))
      for name, r in records.items()
  }
  save_labelled_rows(rows, os.path.join(args.workdir, "samples.png"), ncols=GRID_IMAGES, scale=4)
  results = dict(
      protocol=vars(args),
      baselines=judge.baselines(args.eval_samples, 0),
      wall_s=time.perf_counter() - start,
      runs=summarize({k: v for k, v in records.items() if k != "fp"}),
      records=records,
  )
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results["runs"], indent=1))
  return results


if __name__ == "__main__":
  main()
