"""benchmarks/cifar_reduced.py: which evaluations each model of the study gets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

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
  args = argparse.Namespace(params=params, clip=clip)
  names = cifar_reduced.eval_names(args, raw=True)
  assert [n for n, _, _ in names] == qat
  for name, clip_x0, use_ema in names:
    assert clip_x0 == ("_clip" in name) and use_ema == ("_raw" not in name)
  assert [n for n, _, ema in cifar_reduced.eval_names(args, raw=False) if ema] == teacher
