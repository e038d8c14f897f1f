"""benchmarks/cifar_reduced.py: which evaluations each model of the study gets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

import helpers as H

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import cifar_reduced  # noqa: E402


@pytest.mark.parametrize(
    "params, clip, qat, teacher",
    [
        ("ema", "off", ["evaluate"], ["evaluate"]),
        ("raw", "on", ["evaluate_clip_raw"], ["evaluate_clip"]),
        (
            "both",
            "both",
            ["evaluate", "evaluate_clip", "evaluate_raw", "evaluate_clip_raw"],
            ["evaluate", "evaluate_clip"],
        ),
    ],
)
def test_eval_names(params, clip, qat, teacher):
  args = argparse.Namespace(params=params, clip=clip, eval_steps=[], qat_steps=100)
  names = cifar_reduced.eval_names(args, raw=True)
  assert [n for n, *_ in names] == qat
  for name, clip_x0, use_ema, step in names:
    assert clip_x0 == ("_clip" in name) and use_ema == ("_raw" not in name) and step == 100
  assert [n for n, _, ema, _ in cifar_reduced.eval_names(args, raw=False) if ema] == teacher
  assert {step for *_, step in cifar_reduced.eval_names(args, raw=False)} == {0}


@pytest.mark.parametrize("qat_steps, keep", [(10_000, 4), (10_100, 5)])
def test_eval_steps_name_their_checkpoint_and_keep_it(qat_steps, keep):
  """--eval_steps 5000: each QAT model is evaluated at step 5000 (records *_at5000) and at its
  last step, and its training keeps every checkpoint from step 5000 on, and one more (the
  off-schedule save of a preemption)."""
  args = cifar_reduced.make_parser().parse_args(
      ["--data_dir=D", "--inception_weights=I", "--workdir=W", "--teacher=T", "--clip=on"]
      + [f"--qat_steps={qat_steps}", "--checkpoint_every=2500", "--eval_steps", "5000"]
  )
  names = cifar_reduced.eval_names(args, raw=True)
  assert [(n, s) for n, _, _, s in names] == [
      ("evaluate_clip_at5000", 5000),
      ("evaluate_clip", qat_steps),
  ]
  assert cifar_reduced.qat_config(args, "bidm", 0).training.keep_checkpoints == keep
  args.eval_steps = []
  assert cifar_reduced.qat_config(args, "bidm", 0).training.keep_checkpoints == 1


def test_eval_steps_must_be_checkpoint_steps(monkeypatch, capsys):
  argv = ["cifar_reduced.py", "--data_dir=D", "--inception_weights=I", "--workdir=W"]
  monkeypatch.setattr(sys, "argv", argv + ["--checkpoint_every=2500", "--eval_steps", "3000"])
  with pytest.raises(SystemExit):
    cifar_reduced.main()
  assert "--eval_steps: 3000 is not a checkpoint step" in capsys.readouterr().err


def test_digits_study_spread_is_over_seeds():
  """digits_study.summarize: per run, the mean and half-range over its seeds of each figure,
  and of its difference to XNOR's figure of the same seed (only seeds both have)."""
  import digits_study  # pylint: disable=import-outside-toplevel

  records = {
      f"{run}-s{seed}": dict(
          run=run, seed=seed, digits_fd=fd, digits_fd_not_clipped=2 * fd, loss_dm=0.1
      )
      for run, seed, fd in (("xnor", 0, 6.0), ("xnor", 1, 8.0), ("bidm", 0, 5.0))
  }
  runs = digits_study.summarize(records)
  assert runs["xnor"]["digits_fd"] == dict(mean=7.0, half_range=1.0, n=2)
  assert runs["xnor"]["digits_fd_not_clipped"] == dict(mean=14.0, half_range=2.0, n=2)
  assert runs["bidm"]["digits_fd"] == dict(mean=5.0, half_range=0.0, n=1)
  assert runs["bidm"]["digits_fd_minus_xnor"] == dict(mean=-1.0, half_range=0.0, n=1)
  assert "digits_fd_minus_xnor" not in runs["xnor"]


def test_digits_study_end_to_end(tmp_path):
  """The smoke variant: a teacher and one W1A1 run, each scored clipped and not, the run's
  difference to XNOR (itself: none) absent; an unknown run name is one error."""
  import digits_study  # pylint: disable=import-outside-toplevel

  argv = ["--workdir", str(tmp_path), "--runs", "xnor", "--seeds", "0", "--variant", "smoke"]
  micro = [f"{k}={v}" for k, v in H.MICRO_OVERRIDES.items()]  # compiled in this process
  results = digits_study.main([*argv, "--eval_samples", "16", "--set", *micro])
  record = results["records"]["xnor-s0"]
  assert record["method"] == "xnor" and record["steps"] == 10 and record["overrides"] == micro
  assert record["device"] == "cpu" and "cpu_model" in record and "xla_flags" in record
  assert results["records"]["fp"]["method"] == "fp"
  for r in results["records"].values():
    assert 0 < r["digits_fd"] < 1e3 and 0 < r["digits_fd_not_clipped"] < 1e3
  assert results["runs"]["xnor"]["digits_fd"]["mean"] == record["digits_fd"]
  assert (tmp_path / "samples.png").exists() and (tmp_path / "xnor-s0.json").exists()
  with pytest.raises(SystemExit, match="unknown run"):
    digits_study.main([*argv[:2], "--runs", "xnr"])
  with pytest.raises(SystemExit, match=r"fp.json was trained with --set \["):
    digits_study.main([*argv, "--set", *micro, "tbs.init=0.5"])
  with pytest.raises(SystemExit, match="--teacher .* is not a directory"):
    digits_study.main([*argv, "--teacher", str(tmp_path / "none")])
