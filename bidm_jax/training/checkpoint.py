"""Orbax checkpoints: training runs (CheckpointManager) and exported parameter sets.

A training workdir holds `checkpoints/<step>/` written by an async, keep-N
`ocp.CheckpointManager` with three items: `state` (the TrainState pytree), `data` (the input
iterator's position, JSON) and `meta` (the model description, JSON). Orbax writes each step
to a temporary folder and renames it when complete, so a partially written checkpoint is
never listed as the latest.

An exported parameter set (`export_params`) is a folder with `params/` (a StandardCheckpointer
pytree) and `model.json`. Both kinds are accepted wherever a trained model is read
(`load_params`): a teacher, a QAT initialisation, sampling and evaluation.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

MODEL_JSON = "model.json"
CHECKPOINTS = "checkpoints"


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or holds a different model."""


def check_model_matches(found: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
  """Raises CheckpointError naming every architecture field that differs."""
  diffs = [f"{k}: checkpoint {found.get(k)!r} vs config {expected.get(k)!r}"
           for k in sorted(set(found) | set(expected))
           if _normal(found.get(k)) != _normal(expected.get(k))]
  if diffs:
    raise CheckpointError(f"{where} holds a different model ({'; '.join(diffs)})")


def _normal(v):
  return list(v) if isinstance(v, (tuple, list)) else v


def export_params(directory, params, model: Mapping[str, Any]) -> epath.Path:
  """Writes `params` and the model description to a new folder; refuses to overwrite one."""
  directory = epath.Path(directory)
  if (directory / MODEL_JSON).exists() or (directory / "params").exists():
    raise CheckpointError(f"{directory} already holds exported parameters; choose a new folder")
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", jax.device_get(params))
  (directory / MODEL_JSON).write_text(json.dumps(dict(model), indent=2, sort_keys=True))
  return directory


def _restore_tree(path: epath.Path):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def load_params(path, expected_model: Mapping[str, Any] | None = None, *, use_ema: bool = True):
  """Reads parameters from an exported folder or the latest checkpoint of a training workdir.

  Returns (params, meta): meta['model'] is the architecture description, and for a training
  workdir meta['method'] the binarization method it was trained with. With `expected_model`, a
  different architecture is a CheckpointError listing the differing fields. From a workdir, the EMA parameters are taken
  when `use_ema` (the model the paper evaluates and distils from).
  """
  path = epath.Path(path)
  if (path / MODEL_JSON).exists():
    model = json.loads((path / MODEL_JSON).read_text())
    if expected_model is not None:
      check_model_matches(model, expected_model, str(path))
    try:
      params = _restore_tree(path / "params")
    except Exception as e:  # orbax raises several types for a damaged folder
      raise CheckpointError(f"cannot read parameters in {path / 'params'}: {e}") from e
    return params, {"model": model}
  ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).exists() else path
  if not ckpt_dir.exists():
    raise CheckpointError(f"no checkpoint at {path}: expected an exported folder with "
                          f"{MODEL_JSON} or a training workdir with {CHECKPOINTS}/")
  with ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_names=("state", "meta")) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {ckpt_dir}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if expected_model is not None:
      check_model_matches(meta["model"], expected_model, f"{ckpt_dir} step {step}")
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = state["state"]
  params = state["ema_params"] if use_ema and "ema_params" in state else state["params"]
  return params, meta


def make_manager(workdir, *, keep: int) -> ocp.CheckpointManager:
  """The training run's async, keep-N CheckpointManager under `workdir/checkpoints`.

  The training loop decides when to save (interval, end, preemption) and forces each save.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINTS, options=options,
                               item_names=("state", "data", "meta"))
