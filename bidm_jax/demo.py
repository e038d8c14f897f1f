"""The runnable demo (`--mode=pipeline`): FP training, BiDM W1A1 QAT from it, sampling, report.

Writes, under the workdir: fp/ and bidm/ training runs; report.json (per model: final training
loss, the digits Frechet distance, classifier confidence, when the config clips or thresholds
x0 also the digits Frechet distance from the same noise without that, parameter bytes with
binary weights at 1 bit, and the efficiency counts), which holds only figures that the config
determines, so that every run of the command writes the same bytes; timing.json (wall time, sampling
images/s, device), which varies with the machine and its load; and samples.png (labelled rows).
A rerun in the same workdir reuses finished stages and rewrites the same report.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax import runtime
from bidm_jax import sampling
from bidm_jax.binarize.methods import FP
from bidm_jax.evaluation.digits import DigitsJudge
from bidm_jax.evaluation.efficiency import count_costs
from bidm_jax.io import files
from bidm_jax.training import train as train_lib
from bidm_jax.training.logging import save_labelled_rows


def stage_config(config, method: str, steps: int, learning_rate: float, teacher: str = ""):
  """A copy of `config` for one pipeline stage."""
  c = config.copy_and_resolve_references()
  c.binarization.method = method
  c.training.update(steps=steps, learning_rate=learning_rate, teacher=teacher)
  return c


def sampler_description(sampling) -> str:
  """The sampler as report.json names it, e.g. 'ddim 50 steps, x0 clipped to [-1, 1]'."""
  text = f"{sampling.sampler} {sampling.steps} steps"
  if sampling.dynamic_threshold:
    text += f", x0 dynamically thresholded at the {sampling.dynamic_threshold}th percentile"
  if sampling.clip_x0:
    text += ", x0 clipped to [-1, 1]"
  return text


def final_losses(summary: dict, workdir: str) -> dict:
  """{'loss', 'loss_dm'} of a stage's last logged step: from `summary` when this call trained,
  else from the stage's logs/metrics.jsonl (a rerun of a finished stage trains nothing)."""
  if "loss" in summary:
    return {k: summary[k] for k in ("loss", "loss_dm")}
  path = os.path.join(workdir, "logs", "metrics.jsonl")
  rows = []
  if files.exists(path):
    rows = [
        json.loads(line)
        for line in files.read_bytes(path).decode().splitlines()
        if line.strip().startswith("{")
    ]
  rows = [r for r in rows if r.get("step") == summary["step"] and r.get("loss") is not None]
  if not rows:
    raise ValueError(
        f"{workdir} holds a finished run whose final loss is not in {path}; "
        "remove the folder to train it again"
    )
  return {k: rows[-1].get(k) for k in ("loss", "loss_dm")}


def judge_samples(config, model, params, judge: DigitsJudge, num: int, seed: int):
  """Samples `num` images with config's sampler and judges them; when that sampler clips or
  thresholds x0, also judges the same noise sampled without either (the paper's sampler).

  Returns (scores, plain scores or None, images (num, H, W, C) in [-1, 1], images/s).
  """
  images, rate = sampling.generate(config, model, params, num, seed=seed)
  plain = None
  if config.sampling.clip_x0 or config.sampling.dynamic_threshold:
    plain_cfg = config.copy_and_resolve_references()
    plain_cfg.sampling.update(clip_x0=False, dynamic_threshold=0.0)
    plain = judge.evaluate(sampling.generate(plain_cfg, model, params, num, seed=seed)[0])
  return judge.evaluate(images), plain, images, rate


def run_pipeline(config, workdir: str) -> dict:
  """Runs the demo end to end and returns the report (also written to workdir/report.json)."""
  config_lib.validate(config)
  if config.data.channels != 1 or config.data.image_size % 8:
    raise ValueError(
        "config.data: the pipeline's digits judge needs 1-channel images whose "
        f"size is a multiple of 8, got {config.data.channels} x "
        f"{config.data.image_size}"
    )
  p = config.pipeline
  start = time.perf_counter()
  stages = {
      "fp": stage_config(config, "fp", p.fp_steps, p.fp_learning_rate),
      "bidm": stage_config(
          config,
          config.binarization.method,
          p.qat_steps,
          p.qat_learning_rate,
          teacher=os.path.join(workdir, "fp"),
      ),
  }
  judge = DigitsJudge(config.seed)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  report, rows, timing = {}, {}, {}
  for name, cfg in stages.items():
    stage_dir = os.path.join(workdir, name)
    summary = train_lib.train(cfg, stage_dir)
    losses = final_losses(summary, stage_dir)
    method = config_lib.method_from_config(cfg)
    model = builders.make_model(cfg, method)
    scores, plain, images, rate = judge_samples(
        cfg, model, summary["state"].ema_params, judge, p.eval_samples, cfg.seed + 1
    )
    costs = count_costs(model, shape)
    report[name] = dict(
        method=method.name,
        training_steps=summary["step"],
        final_loss=losses["loss"],
        final_loss_dm=losses["loss_dm"],
        **scores,
        **({"digits_fd_unprocessed_x0": plain["digits_fd"]} if plain else {}),
        sampler=sampler_description(cfg.sampling),
        param_bytes=costs["size_mb"] * 2**20,
        params=costs["params"],
        binary_params=costs["binary_params"],
        bops=costs["bops"],
        flops=costs["flops"],
        ops=costs["ops"],
    )
    timing[f"{name}_sampling_images_per_s"] = rate if math.isfinite(rate) else None
    rows[f"{name} ({method.name})"] = images[:16]
  fp_costs = count_costs(builders.make_model(stages["fp"], FP), shape)
  report["size_ratio"] = fp_costs["size_mb"] * 2**20 / report["bidm"]["param_bytes"]
  report["ops_ratio"] = fp_costs["ops"] / report["bidm"]["ops"]
  report["quality_metric"] = (
      "digits_fd: Frechet distance between the hidden-layer features "
      "of an MLP digit classifier (trained here on the 1797 real "
      "digits) of the samples and of the real digits; lower is better. "
      "digits_fd_baselines: the same score for as many real digits and "
      "uniform-noise images as there are samples."
  )
  report["digits_fd_baselines"] = judge.baselines(p.eval_samples, config.seed)
  timing.update(wall_time_s=time.perf_counter() - start, **runtime.host_description())
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "report.json"), report)
    files.write_json(os.path.join(workdir, "timing.json"), timing)
    save_labelled_rows(
        rows, os.path.join(workdir, "samples.png"), scale=max(3, 48 // config.data.image_size)
    )
  return dict(report, timing=timing)
