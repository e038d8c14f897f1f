"""Orbax checkpoints: training runs (CheckpointManager) and exported parameter sets.

A training workdir holds `checkpoints/<step>/` written by an async `ocp.CheckpointManager`
with three items: `state` (the TrainState pytree), `data` (the input iterator's position, JSON)
and `meta` (the model description, plus `checksum`: the dtype, shape and CRC-32 of every state
array, JSON). Orbax writes each step to a temporary folder and renames it when complete, so a
partially written checkpoint is never listed. A step is used only once it reads back intact:
Orbax raises no error, every array matches its checksum and is finite (`read_step`). Readers
take the newest intact step (`newest_good`); the training loop moves a damaged one to
`damaged_checkpoints/` (nothing is deleted) and deletes old steps itself, only once a newer
step has been read back (`remove_old`), so an unverified step never costs the last good one.

An exported parameter set (`export_params`) is a folder with `params/` (a StandardCheckpointer
pytree) and `model.json` (the model description and the parameters' checksum). `load_params`
reads either kind, saying which one it found, and refuses a folder that holds both; an export is
never written into a training workdir, nor a run into an export folder. `workdir_lock` keeps a
second run out of a workdir that a run is training in.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging as py_logging
import os
import socket
import sys
import time
import warnings
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from bidm_jax.io import files

MODEL_JSON = "model.json"
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
CHECKSUM = "checksum"
LOCK = ".lock"


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or holds a different model."""


class DamagedCheckpoint(CheckpointError):
  """A checkpoint that does not read back as it was written (its message is the reason)."""


class WorkdirInUse(RuntimeError):
  """Another run holds the workdir's lock."""


def check_model_matches(found: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
  """Raises CheckpointError naming every architecture field that differs."""
  diffs = [
      f"{k}: checkpoint {found.get(k)!r} vs config {expected.get(k)!r}"
      for k in sorted(set(found) | set(expected))
      if _normal(found.get(k)) != _normal(expected.get(k))
  ]
  if diffs:
    raise CheckpointError(f"{where} holds a different model ({'; '.join(diffs)})")


def _normal(v):
  return list(v) if isinstance(v, (tuple, list)) else v


# ---------------------------------------------------------------------------------------------
# What a folder holds.

KINDS = {
    "export": f"an exported parameter set ({MODEL_JSON}, params/)",
    "training": f"a training workdir ({CHECKPOINTS}/<step>/)",
    "checkpoints": "a training run's checkpoints folder (<step>/)",
    "both": f"both an exported parameter set ({MODEL_JSON}, params/) and training checkpoints "
    f"({CHECKPOINTS}/)",
    "missing": "nothing (no such path)",
    "file": "a file",
    "empty": "an empty folder",
}


def folder_kind(path) -> str:
  """What `path` holds: one of KINDS, or 'other' for a folder holding neither kind of model."""
  path = epath.Path(path)
  if not path.exists():
    return "missing"
  if not path.is_dir():
    return "file"
  export = (path / MODEL_JSON).exists() or (path / "params").exists()
  training = (path / CHECKPOINTS).is_dir()
  if export or training:
    return "both" if export and training else "export" if export else "training"
  entries = list(path.iterdir())
  if any(p.name.isdigit() and p.is_dir() for p in entries):
    return "checkpoints"
  return "other" if entries else "empty"


def describe_folder(path, kind: str | None = None) -> str:
  kind = kind or folder_kind(path)
  if kind == "other":
    names = sorted(p.name for p in epath.Path(path).iterdir())
    return f"a folder holding {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
  return KINDS[kind]


def check_export_target(directory) -> None:
  """Refuses a folder that already holds exported parameters or a training run (an export there
  would shadow the run's checkpoints for sampling, evaluation and teacher loading)."""
  kind = folder_kind(directory)
  if kind in ("export", "both"):
    raise CheckpointError(f"{directory} already holds exported parameters; choose a new folder")
  if kind in ("training", "checkpoints", "file"):
    raise CheckpointError(
        f"{directory} holds {describe_folder(directory, kind)}; an export "
        f"({MODEL_JSON}, params/) goes to a new folder: choose another one"
    )


def check_training_workdir(workdir) -> None:
  """Refuses a workdir that holds an exported parameter set (training expects checkpoints/)."""
  kind = folder_kind(workdir)
  if kind in ("export", "both"):
    raise CheckpointError(
        f"workdir {workdir} holds {describe_folder(workdir, kind)}, not only a training run; "
        "train in another --workdir (an export can be its --config.training.teacher)"
    )


# ---------------------------------------------------------------------------------------------
# Checksums and verification.


def _host(x) -> np.ndarray:
  """A leaf as a NumPy array; a replicated array spanning several hosts gives its local copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_host(tree) -> dict[str, np.ndarray]:
  """{'params/conv_in/kernel': array, ...}: the same names for a TrainState and for the nested
  dicts and lists that Orbax restores without a target."""
  return {
      "/".join(_key_name(k) for k in path): _host(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _leaf_checksum(a: np.ndarray) -> str:
  data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
  return f"{a.dtype}{list(a.shape)}:{zlib.crc32(data):08x}"


def tree_checksum(tree) -> dict[str, str]:
  """'dtype[shape]:crc32' of every array of `tree` (read to the host), by its path."""
  return {k: _leaf_checksum(a) for k, a in _flat_host(tree).items()}


def verify_tree(tree, checksum: Mapping[str, str] | None) -> None:
  """Raises DamagedCheckpoint when `tree` differs from `checksum` (its arrays, their dtypes,
  shapes and CRC-32s) or holds non-finite values. Without a checksum (checkpoints written before
  checksums were), only finiteness is checked."""
  flat = _flat_host(tree)
  if checksum is not None:
    if set(flat) != set(checksum):
      odd = sorted(set(flat) ^ set(checksum))
      raise DamagedCheckpoint(f"its arrays are not those saved ({len(odd)} differ, e.g. {odd[0]})")
    bad = [k for k, a in flat.items() if _leaf_checksum(a) != checksum[k]]
    if bad:
      raise DamagedCheckpoint(
          f"{len(bad)} array(s) do not match the checksum saved with them, e.g. {bad[0]}"
      )
  bad = [
      k
      for k, a in flat.items()
      if jnp.issubdtype(a.dtype, jnp.inexact) and not np.isfinite(a).all()
  ]
  if bad:
    raise DamagedCheckpoint(f"{len(bad)} array(s) hold non-finite values, e.g. {bad[0]}")


def _brief(e: BaseException) -> str:
  """One line of an Orbax/TensorStore error (their messages embed long JSON specs)."""
  text = " ".join(str(e).split()).split(" [tensorstore_spec=")[0]
  text = text if len(text) <= 200 else text[:200] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _DropOrbaxRecords(py_logging.Filter):

  def filter(self, record):
    return "orbax" not in record.pathname


@contextlib.contextmanager
def _quiet_orbax():
  """Silences Orbax's log records and warnings while a possibly damaged checkpoint is read: the
  caller reports the outcome in one line."""
  logger, drop = py_logging.getLogger("absl"), _DropOrbaxRecords()
  logger.addFilter(drop)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    logger.removeFilter(drop)


def _read(what: str, fn: Callable[[], Any]):
  _ignore_closed_loop_callbacks()
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except  # Orbax raises many types
    raise DamagedCheckpoint(f"its {what} cannot be read ({_brief(e)})") from None


def _ignore_closed_loop_callbacks() -> None:
  """Drops the 'Event loop is closed' errors of an aborted Orbax read.

  When one array of a damaged checkpoint fails, Orbax closes its asyncio loop while TensorStore
  still completes the other reads; each completion then reports a RuntimeError through
  sys.unraisablehook, some before the failure reaches our handler and thousands after it.
  Installed before the first read (installing it on failure loses that race, as a CI run
  showed); every other unraisable error still reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_bidm_closed_loop_filter", False):
    return

  def hook(unraisable):
    if not (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    ):
      previous(unraisable)

  hook._bidm_closed_loop_filter = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def read_host_tree(path) -> Any:
  """The pytree saved at `path` (an Orbax pytree folder), as NumPy arrays on this host, whatever
  devices wrote it."""
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(epath.Path(path)).item_metadata.tree
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(epath.Path(path), args=ocp.args.PyTreeRestore(restore_args=args))


def step_dir(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
  return epath.Path(mngr.directory) / str(step)


def read_step(
    mngr: ocp.CheckpointManager,
    step: int,
    *,
    abstract=None,
    check_meta: Callable[[dict], None] | None = None,
    data_args=None,
):
  """(meta, state) of checkpoint `step`, verified (see `verify_tree`).

  The state is restored as `abstract` (a TrainState of ShapeDtypeStructs) when given, else as
  NumPy arrays on the host. `check_meta(meta)` runs before the state is read: its errors (a
  different model) propagate as they are. With `data_args`, the data iterator's position is
  restored too. Anything unreadable or not matching raises DamagedCheckpoint (one line).
  """
  with _quiet_orbax():
    meta = _read(
        "meta item",
        lambda: mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"],
    )
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
      raise DamagedCheckpoint("its meta item holds no model description")
    if check_meta is not None:
      check_meta(meta)
    if abstract is None:
      state = _read("state", lambda: read_host_tree(step_dir(mngr, step) / "state"))
    else:
      state = _read(
          "state",
          lambda: mngr.restore(
              step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
          )["state"],
      )
    verify_tree(state, meta.get(CHECKSUM))
    if data_args is not None:
      _read("data position", lambda: mngr.restore(step, args=ocp.args.Composite(data=data_args)))
  return meta, state


def newest_good(mngr: ocp.CheckpointManager, read: Callable[[int], Any]):
  """(step, read(step), damaged) for the newest step that `read` accepts, trying the steps from
  the newest down; `damaged` lists (step, reason) of the newer ones it rejected. step is None
  when no step is accepted."""
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return step, read(step), damaged
    except DamagedCheckpoint as e:
      damaged.append((step, str(e)))
  return None, None, damaged


def describe_damaged(damaged) -> str:
  return "; ".join(f"step {step}: {why}" for step, why in damaged)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def move_aside(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves checkpoint `step` out of the run, to <workdir>/damaged_checkpoints/<step>[.n] (kept
  for inspection, never deleted); returns where it went."""
  base = epath.Path(mngr.directory).parent / DAMAGED
  target, n = base / str(step), 0
  while target.exists():
    n += 1
    target = base / f"{step}.{n}"
  if jax.process_index() == 0:
    base.mkdir(parents=True, exist_ok=True)
    step_dir(mngr, step).rename(target)
  _sync(f"bidm_move_aside_{step}")
  mngr.reload()
  return target


def remove_old(mngr: ocp.CheckpointManager, keep: int, verified: int) -> None:
  """Deletes all but the newest `keep` steps up to `verified`, a step just read back intact;
  steps after it (not verified yet) are never counted or touched."""
  for step in sorted(s for s in mngr.all_steps() if s <= verified)[:-keep]:
    mngr.delete(step)


def save_state(
    mngr: ocp.CheckpointManager, step: int, state, meta: Mapping[str, Any], data_args=None
) -> None:
  """Saves `state` (asynchronously), `meta` with the state's checksum, and the data position."""
  items = dict(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave({**meta, CHECKSUM: tree_checksum(state)}),
  )
  if data_args is not None:
    items["data"] = data_args
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def make_manager(workdir, *, keep: int | None = None) -> ocp.CheckpointManager:
  """The training run's async CheckpointManager under `workdir/checkpoints`.

  The training loop decides when to save (interval, end, preemption) and forces each save. It
  also rotates the checkpoints itself (`remove_old`, after reading the newest one back), so
  Orbax's own keep-N (`keep`) is off unless asked for.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager(
      epath.Path(workdir) / CHECKPOINTS, options=options, item_names=("state", "data", "meta")
  )


# ---------------------------------------------------------------------------------------------
# Exported parameter sets and the loader.


def export_params(directory, params, model: Mapping[str, Any]) -> epath.Path:
  """Writes `params` and the model description (with the parameters' checksum) to a new folder;
  refuses one that holds exported parameters or a training run."""
  directory = epath.Path(directory)
  check_export_target(directory)
  directory.mkdir(parents=True, exist_ok=True)
  params = jax.device_get(params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", params)
  description = {**dict(model), CHECKSUM: tree_checksum(params)}
  (directory / MODEL_JSON).write_text(json.dumps(description, indent=2, sort_keys=True))
  return directory


def _load_export(path: epath.Path, expected_model):
  try:
    model = json.loads((path / MODEL_JSON).read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path / MODEL_JSON}: {_brief(e)}") from None
  if not isinstance(model, dict):
    raise CheckpointError(f"{path / MODEL_JSON} holds no model description")
  checksum = model.pop(CHECKSUM, None)
  if expected_model is not None:
    check_model_matches(model, expected_model, str(path))
  try:
    with _quiet_orbax():
      params = _read("parameters", lambda: read_host_tree(path / "params"))
      verify_tree(params, checksum)
  except DamagedCheckpoint as e:
    raise CheckpointError(f"the exported parameters in {path} are damaged: {e}") from None
  return params, {"model": model, "kind": "export"}


def load_params(
    path,
    expected_model: Mapping[str, Any] | None = None,
    *,
    use_ema: bool = True,
    step: int | None = None,
):
  """Reads parameters (NumPy, on the host) from an exported folder or a training workdir.

  Which kind `path` holds decides (`folder_kind`): an export (model.json, params/), a training
  workdir (checkpoints/<step>/) or a run's checkpoints folder itself; a folder with both an export
  and checkpoints, or with neither, is a CheckpointError saying what it found. From a workdir,
  the newest step that reads back intact is used (one warning line names any newer damaged
  step), or exactly `step` when given, and its EMA parameters when `use_ema` (the model the
  paper evaluates and distils from), else the raw ones.
  Returns (params, meta): meta['model'] is the architecture description, meta['kind'] 'export'
  or 'training', and for a workdir meta['step'] and meta['method'] (the binarization method it
  was trained with). With `expected_model`, a different architecture is a CheckpointError listing
  the differing fields.
  """
  path = epath.Path(path)
  kind = folder_kind(path)
  if kind == "export":
    if step is not None or not use_ema:
      raise CheckpointError(
          f"{path} is an export, which holds one set of parameters: a checkpoint step or the "
          "raw (non-EMA) parameters need a training workdir"
      )
    return _load_export(path, expected_model)
  if kind not in ("training", "checkpoints"):
    hint = ": move one of them to its own folder" if kind == "both" else ""
    raise CheckpointError(
        f"no model to load at {path}: expected {KINDS['export']} or {KINDS['training']}, "
        f"found {describe_folder(path, kind)}{hint}"
    )
  ckpt_dir = path / CHECKPOINTS if kind == "training" else path

  def read(step):
    check = None
    if expected_model is not None:
      check = lambda meta: check_model_matches(
          meta["model"], expected_model, f"{ckpt_dir} step {step}"
      )
    return read_step(mngr, step, check_meta=check)

  with (
      _quiet_orbax(),
      ocp.CheckpointManager(
          ckpt_dir,
          options=ocp.CheckpointManagerOptions(read_only=True),
          item_names=("state", "meta"),
      ) as mngr,
  ):
    if step is not None:
      if step not in mngr.all_steps():
        raise CheckpointError(
            f"no checkpoint step {step} in {ckpt_dir} (steps there: "
            f"{sorted(mngr.all_steps()) or 'none'})"
        )
      damaged = []
      restored = read(step)
    else:
      step, restored, damaged = newest_good(mngr, read)
  if step is None:
    if damaged:
      raise CheckpointError(f"no readable checkpoint in {ckpt_dir} ({describe_damaged(damaged)})")
    raise CheckpointError(f"no complete checkpoint in {ckpt_dir}")
  if damaged:
    logging.warning(
        "damaged checkpoint(s) in %s (%s); using step %d", ckpt_dir, describe_damaged(damaged), step
    )
  meta, state = restored
  meta = {k: v for k, v in meta.items() if k != CHECKSUM}
  params = state["ema_params"] if use_ema and "ema_params" in state else state["params"]
  return params, dict(meta, kind="training", step=step)


# ---------------------------------------------------------------------------------------------
# The workdir lock.


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds an exclusive lock on `workdir` while a run trains in it: `fcntl.flock` on
  `workdir/.lock`, which names the holder and is removed on exit. A second run raises
  WorkdirInUse; the kernel drops the lock of a killed run. Remote (gs://) workdirs and the other
  hosts of a multi-host run take no lock."""
  if files.is_remote(workdir) or jax.process_index() != 0:
    yield
    return
  path = os.path.join(os.fspath(workdir), LOCK)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirInUse(
          f"workdir {workdir} is in use by another run ({holder}); wait for it "
          "to end or use another --workdir"
      ) from None
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # the previous holder removed the file meanwhile: lock the new one
  try:
    os.ftruncate(fd, 0)
    os.write(
        fd,
        f"pid {os.getpid()} on {socket.gethostname()} since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
    )
    yield
  finally:
    os.unlink(path)  # before unlocking: a run waiting on this file retries on a new one
    os.close(fd)
