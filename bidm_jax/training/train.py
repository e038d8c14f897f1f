"""Training: full-precision DDPM pretraining and W1A1 QAT (BiDM and the baselines).

One jitted train step serves both: the loss is L_DM (epsilon MSE) plus, for a binary method
with distillation, lambda * L_SPD (or L2) against a frozen FP teacher; methods with TBS run the
paired-timestep forward. The step runs data-parallel under a device mesh: parameters
replicated, batches sharded over the 'data' axis, on any number of devices and hosts. The
model, schedule, mesh, optimizer and teacher come from the assembly layer (`bidm_jax.builders`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable, Iterator

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax import data as data_lib
from bidm_jax import sampling
from bidm_jax.bidm import tbs
from bidm_jax.binarize.methods import BinarizationMethod, recorded_fields
from bidm_jax.diffusion.schedules import Schedule, epsilon_loss, q_sample
from bidm_jax.io import files
from bidm_jax.models.unet import UNet
from bidm_jax.training import checkpoint as ckpt_lib
from bidm_jax.training.logging import MetricWriter, save_grid

Array = jax.Array


class TrainingDiverged(RuntimeError):
  """The loss or gradients became non-finite; parameters were left at their last good values."""


class TrainState(struct.PyTreeNode):
  """step: () int32 steps done; params, ema_params: model trees; opt_state: optax state."""

  step: Array
  params: Any
  ema_params: Any
  opt_state: Any


def overlay_params(base, update):
  """`base` with every leaf that `update` also has replaced by update's (same shape).

  Initialises a binary student (whose tree contains the FP tree) from an FP model.
  """
  flat_base = flax.traverse_util.flatten_dict(flax.core.unfreeze(base))
  flat_update = flax.traverse_util.flatten_dict(flax.core.unfreeze(update))
  missing = [k for k in flat_update if k not in flat_base]
  bad = [k for k, v in flat_update.items() if k in flat_base and v.shape != flat_base[k].shape]
  if missing or bad:
    raise ckpt_lib.CheckpointError(
        f"FP parameters do not fit the student: unknown {['/'.join(k) for k in missing][:5]}, "
        f"shape mismatch {['/'.join(k) for k in bad][:5]}"
    )
  flat_base.update({k: jnp.array(v) for k, v in flat_update.items()})  # copies: never aliased
  return flax.traverse_util.unflatten_dict(flat_base)


def create_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree_util.tree_map(jnp.copy, params),
      opt_state=tx.init(params),
  )


def make_loss_fn(config, model: UNet, schedule: Schedule, teacher: UNet | None):
  """loss_fn(params, teacher_params, images, rng, progress) -> (loss, metrics).

  images: (B, H, W, C) in [-1, 1]. Samples t ~ U{0..T-1} and noise; for a TBS model the
  binary student runs at t+1 then at t with the cache (paired-timestep forward); the teacher
  (when the method distils) sees the same (x_t, t). L_DM is reduced by `distill.reduction`:
  'mean' (the paper's MSE) or 'sum' over each image's values (the authors' CIFAR code, which
  makes lambda * L_distill H*W*C times weaker relative to L_DM; metrics then add 'eps_mse').
  The distilled features are the student's and the teacher's `UNetOutput.distill`, the
  points `distill.points` names (`builders.make_model`): 'blocks' (every timestep block's
  output) or 'release' (the authors' points, `UNet.release_points`); the loss and its weight
  are `builders.make_distillation`'s.
  """
  method = model.method
  reduction = config.distill.reduction
  n = model.num_connections
  num_t = schedule.num_timesteps
  distillation = builders.make_distillation(config, method)
  if distillation is not None and teacher is None:
    raise ValueError(f"method {method.name!r} distils from a teacher, but none was given")

  def loss_fn(params, teacher_params, images, rng, progress):
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    t = jax.random.randint(k_t, (images.shape[0],), 0, num_t)
    noise = jax.random.normal(k_noise, images.shape, jnp.float32)
    x_t = q_sample(schedule, images, t, noise)

    def apply(p, x, tt, cache, r):
      return model.apply(
          {"params": p}, x, tt, cache=cache, train=True, progress=progress, rngs={"dropout": r}
      )

    if n:
      t_prev = jnp.minimum(t + 1, num_t - 1)
      out = tbs.paired_timestep_forward(
          apply, params, q_sample(schedule, images, t_prev, noise), t_prev, x_t, t, k_drop
      )
    else:
      out = apply(params, x_t, t, None, k_drop)
    loss_dm = epsilon_loss(out.eps, noise, reduction)
    metrics = {"loss_dm": loss_dm}
    if reduction == "sum":  # the per-value MSE as well, comparable with 'mean' runs
      metrics["eps_mse"] = loss_dm / np.prod(images.shape[1:])
    loss = loss_dm
    if distillation is not None:
      target = teacher.apply({"params": teacher_params}, x_t, t)
      loss_distill = distillation.loss(out.distill, target.distill)
      metrics["loss_distill"] = loss_distill
      loss = loss + distillation.weight * loss_distill
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


def make_train_step(
    config,
    model: UNet,
    schedule: Schedule,
    tx: optax.GradientTransformation,
    teacher: UNet | None = None,
) -> Callable:
  """train_step(state, images, rng, teacher_params) -> (state, metrics); pure, jittable.

  `rng` is the run's base key: the step folds in state.step, so a resumed run draws the same
  timesteps and noise. A non-finite loss, gradient, updated parameters or updated EMA leaves
  parameters, optimizer and EMA unchanged and reports metrics['finite'] = False.
  """
  loss_fn = make_loss_fn(config, model, schedule, teacher)
  total, decay = config.training.steps, config.training.ema_decay

  def train_step(state: TrainState, images: Array, rng: Array, teacher_params):
    progress = state.step.astype(jnp.float32) / total
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(
        state.params, teacher_params, images, jax.random.fold_in(rng, state.step), progress
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params) & _all_finite(ema)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        ema_params=keep(ema, state.ema_params),
        opt_state=keep(opt_state, state.opt_state),
    )
    return state, dict(metrics, grad_norm=grad_norm, finite=finite)

  return train_step


def _all_finite(tree) -> Array:
  """() bool: every value of every leaf of `tree` is finite."""
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


def global_batch(mesh, local: np.ndarray) -> Array:
  """Assembles each host's (B_local, ...) rows into one batch sharded over 'data'."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)


def run_meta(config, method: BinarizationMethod, model: UNet) -> dict:
  """What a workdir's checkpoints must agree with to be resumed by this config.

  The TBS structure is recorded only when it is not the default, so that workdirs written
  before the field existed still match.
  """
  meta = {
      "model": builders.model_description(config),
      "method": dataclasses.asdict(method),
      "tbs_connections": model.num_connections,
      "image_size": config.data.image_size,
  }
  if config.tbs.structure != "blocks":
    meta["tbs_structure"] = config.tbs.structure
  return meta


def sample_grid(config, model: UNet, state: TrainState, mesh, workdir: str) -> None:
  """Writes 64 samples of the EMA parameters to workdir/samples_<step>.png."""
  images, _ = sampling.generate(
      config, model, state.ema_params, 64, seed=config.seed, mesh=mesh, progress_bar=False
  )
  if jax.process_index() == 0:
    save_grid(images, os.path.join(workdir, f"samples_{int(state.step)}.png"))


class _Preemption:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks once per step
  (saved, then exit 0); a second Ctrl-C raises KeyboardInterrupt at once. A SIGINT the process
  ignores (a shell's background job) stays ignored."""

  def __init__(self):
    self.requested = ""  # the name of the signal that asked the run to stop
    self._previous = {}

  def __enter__(self):
    if jax.process_count() > 1:  # multi-host: jax's own handler + mngr.reached_preemption
      return self
    try:
      for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is not signal.SIG_IGN:
          self._previous[signum] = signal.signal(signum, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


class _StepProfile:
  """A jax.profiler trace of the steps [start, start + count) into `directory` (process 0
  only), each step complete (dispatched and finished) inside it; start < 0 traces nothing.
  Profiling never stops a run: a trace that cannot be written is a warning."""

  def __init__(self, start: int, count: int, directory: str):
    self.start, self.stop, self.directory = start, start + count, directory
    self.active, self.last = False, start

  def before(self, step: int, settle: Callable[[], None]) -> None:
    if step != self.start:
      return
    settle()  # on every process: the hosts stay in step
    if jax.process_index() == 0:
      # jax writes the Perfetto file through a local path; a URI gets TensorBoard's files only
      perfetto = not files.is_remote(self.directory)
      jax.profiler.start_trace(self.directory, create_perfetto_trace=perfetto)
      self.active = True

  def after(self, done: int, state) -> None:
    if self.active:
      self.last = done - 1
      if done == self.stop:
        self.close(state)

  def close(self, state) -> None:
    if not self.active:
      return
    self.active = False
    try:
      jax.block_until_ready(state)
    except Exception:  # pylint: disable=broad-except  # a failed step reports itself
      pass
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("profile of steps %d-%d not written: %s", self.start, self.last, e)
      return
    logging.info("profile of steps %d-%d written to %s", self.start, self.last, self.directory)


def train(config, workdir: str, *, data_iterator: Iterator | None = None) -> dict:
  """Trains the model of `config` in `workdir`, resuming from its newest intact checkpoint.

  FP training when config.binarization.method is 'fp', else QAT from config.training.teacher.
  `data_iterator` replaces the config's data: it yields {'image': (B_local, H, W, C)}; its
  position is checkpointed when it is a `grain.DatasetIterator`. Returns a summary: last
  losses, steps, steps/s, whether the run was preempted (SIGTERM or Ctrl-C: saved, then
  returned). The workdir is locked for the run. A damaged newest checkpoint is moved to
  `damaged_checkpoints/` (one warning line) and the run resumes from the newest intact one; a
  run already at training.steps returns at once. Raises ValueError when the checkpoint is past
  training.steps, TrainingDiverged on a non-finite loss, CheckpointError when the workdir or
  teacher holds a different model or the workdir holds an export, WorkdirInUse when another
  run trains in the workdir.
  """
  config_lib.validate(config)
  ckpt_lib.check_training_workdir(workdir)
  files.makedirs(workdir)
  with ckpt_lib.workdir_lock(workdir):
    return _train(config, workdir, data_iterator)


def _check_run_meta(found: dict, meta: dict, workdir: str) -> None:
  """Raises CheckpointError when a checkpoint's meta describes another run than `meta`."""
  found = {k: v for k, v in found.items() if k != ckpt_lib.CHECKSUM}
  if isinstance(found.get("method"), dict):
    found["method"] = recorded_fields(found["method"])
  if found == meta:
    return
  ckpt_lib.check_model_matches(found["model"], meta["model"], f"workdir {workdir}")
  diffs = []
  for key in sorted(set(found) | set(meta)):
    a, b = found.get(key), meta.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += [
          f"{key}.{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}"
          for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)
      ]
    elif a != b:
      diffs.append(f"{key}: checkpoint {a!r} vs config {b!r}")
  raise ckpt_lib.CheckpointError(
      f"workdir {workdir} holds a run of method {found.get('method', {}).get('name')!r} with "
      f"other settings ({'; '.join(diffs[:5])}{'; ...' if len(diffs) > 5 else ''}); use "
      "another --workdir"
  )


def _train(config, workdir: str, data_iterator: Iterator | None) -> dict:
  """train() inside the workdir lock."""
  method = config_lib.method_from_config(config)
  model = builders.make_model(config, method)
  schedule = builders.make_schedule(config)
  mesh = builders.make_mesh(config)
  t = config.training
  if t.batch_size % mesh.devices.size:
    raise ValueError(
        f"config.training.batch_size: {t.batch_size} is not divisible by the "
        f"{mesh.devices.size} devices of the mesh"
    )
  repl = NamedSharding(mesh, P())
  meta = run_meta(config, method, model)
  tx = builders.make_optimizer(config)
  rng = jax.random.PRNGKey(config.seed)
  if data_iterator is None:
    first_stage = builders.load_first_stage(config, mesh)
    encode, described = None, None
    if first_stage is not None:
      encode = builders.latent_encoder(config, first_stage)
      if config.data.latent_cache:
        described = builders.first_stage_description(config, first_stage)
    data_iterator = data_lib.make_train_iterator(
        config.data,
        global_batch_size=t.batch_size,
        seed=config.seed,
        encode=encode,
        first_stage=described,
    )
  checkpoint_data = isinstance(data_iterator, grain.DatasetIterator)

  with ckpt_lib.make_manager(workdir) as mngr:
    abstract = jax.eval_shape(
        lambda: create_state(builders.init_params(model, config, jax.random.fold_in(rng, 1)), tx)
    )
    data_args = data_lib.orbax_restore_args(data_iterator) if checkpoint_data else None
    latest, restored, damaged = ckpt_lib.newest_good(
        mngr,
        lambda step: ckpt_lib.read_step(
            mngr,
            step,
            abstract=abstract,
            data_args=data_args,
            check_meta=lambda found: _check_run_meta(found, meta, workdir),
        ),
    )
    if latest is None and damaged:
      raise ckpt_lib.CheckpointError(
          f"no readable checkpoint in {mngr.directory} ({ckpt_lib.describe_damaged(damaged)}); "
          "move that folder away to start the run over"
      )
    if latest is not None and latest > t.steps:
      raise ValueError(
          f"config.training.steps: {t.steps} is below step {latest} of the run in "
          f"{workdir}; nothing was trained: raise it to continue that run, or "
          "train in another --workdir"
      )
    if damaged:
      moved = [str(ckpt_lib.move_aside(mngr, step)) for step, _ in damaged]
      logging.warning(
          "damaged checkpoint(s) in %s (%s): moved to %s; resuming from step %d",
          mngr.directory,
          ckpt_lib.describe_damaged(damaged),
          ", ".join(moved),
          latest,
      )
    if latest is not None and latest == t.steps:
      logging.warning(
          "the run in %s is already at step %d = config.training.steps; nothing to train",
          workdir,
          latest,
      )

    teacher, teacher_params = None, None
    if method.binary:
      teacher, teacher_params = builders.load_teacher(config, mesh)
    if latest is None:
      params = builders.init_params(model, config, jax.random.fold_in(rng, 1))
      if teacher_params is not None:
        params = method.init_from_fp(overlay_params(params, teacher_params))
      state = create_state(params, tx)
    else:
      state = restored[1]
    state = jax.device_put(state, repl)

    step_fn = jax.jit(make_train_step(config, model, schedule, tx, teacher), donate_argnums=0)
    start = int(state.step)
    writer = (
        MetricWriter(os.path.join(workdir, "logs"), resume_step=start)
        if jax.process_index() == 0 and start < t.steps
        else None
    )
    summary = {"preempted": False, "start_step": start}
    unverified = None  # the step saved last, not read back yet

    def verify_last_save() -> int | None:
      """Waits for the last save and reads it back: intact, the steps before it beyond
      keep_checkpoints are deleted; damaged, it is moved aside and its step returned."""
      nonlocal unverified
      mngr.wait_until_finished()
      step, unverified = unverified, None
      if step is None:
        return None
      try:
        ckpt_lib.read_step(mngr, step)
      except ckpt_lib.DamagedCheckpoint as e:
        where = ckpt_lib.move_aside(mngr, step)
        logging.warning(
            "checkpoint step %d did not read back intact (%s): moved to %s; the "
            "older checkpoints are kept",
            step,
            e,
            where,
        )
        return step
      ckpt_lib.remove_old(mngr, t.keep_checkpoints, step)
      return None

    def save(step: int) -> None:
      nonlocal unverified
      verify_last_save()
      ckpt_lib.save_state(
          mngr,
          step,
          state,
          meta,
          data_lib.orbax_save_args(data_iterator) if checkpoint_data else None,
      )
      unverified = step

    def check(metrics, step):
      """Fetches one step's metrics (waiting for that step only) and stops on a non-finite loss,
      gradient, parameter or EMA value."""
      metrics = jax.device_get(metrics)
      if not bool(metrics["finite"]):
        verify_last_save()
        good = mngr.latest_step()
        where = (
            f"the last good checkpoint is step {good} in {workdir}/checkpoints"
            if good is not None
            else "no checkpoint was written yet"
        )
        what = (
            "loss"
            if not np.isfinite(metrics["loss"])
            else "gradient"
            if not np.isfinite(metrics["grad_norm"])
            else "parameters or EMA"
        )
        raise TrainingDiverged(
            f"non-finite {what} at step {step} "
            f"(loss={float(metrics['loss'])}); parameters were not updated; "
            f"{where}"
        )
      return metrics

    window, last_log, pending = [], time.perf_counter(), None
    profile = _StepProfile(t.profile_start, t.profile_steps, os.path.join(workdir, "profile"))
    if 0 <= t.profile_start < start:
      logging.warning(
          "training.profile_start=%d is before step %d, where this run resumes: nothing is "
          "profiled",
          t.profile_start,
          start,
      )

    def settle():
      """Checks the dispatched-but-unread step, if any, and adds its metrics to the log window."""
      nonlocal pending
      if pending is not None:
        window.append(check(*pending))
        pending = None

    with (
        _Preemption() as preemption,
        tqdm(
            total=t.steps, initial=start, desc=method.name, unit="step", disable=not t.progress_bar
        ) as bar,
    ):
      try:
        for step in range(start, t.steps):
          profile.before(step, settle)
          batch = global_batch(mesh, np.asarray(next(data_iterator)["image"], np.float32))
          state, metrics = step_fn(state, batch, rng, teacher_params)
          settle()  # the previous step's metrics, fetched while this one runs
          pending = (metrics, step)
          done = step + 1
          profile.after(done, state)
          stop = preemption.requested if jax.process_count() == 1 else mngr.reached_preemption(done)
          if done % t.checkpoint_every == 0 or done == t.steps or stop:
            settle()
            save(done)
          if done % t.log_every == 0 or done == t.steps or stop:
            settle()
            now = time.perf_counter()
            scalars = {
                k: float(np.mean([m[k] for m in window])) for k in window[0] if k != "finite"
            }
            scalars["steps_per_sec"] = len(window) / (now - last_log)
            window, last_log = [], now
            summary.update(scalars)
            if writer:
              writer.write_scalars(done, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}")
          bar.update(1)
          if t.sample_every and (done % t.sample_every == 0 or done == t.steps):
            sample_grid(config, model, state, mesh, workdir)
          if stop:
            summary["preempted"] = True
            logging.warning(
                "%s: saved step %d, exiting; rerun the same command to resume",
                preemption.requested or "preemption",
                done,
            )
            break
        failed = verify_last_save()
        if failed is not None and failed == int(state.step):  # the state is still here: again
          save(failed)
          if verify_last_save() is not None:
            raise ckpt_lib.CheckpointError(
                f"checkpoint step {failed} in {mngr.directory} did not read back intact twice "
                f"(copies in {workdir}/{ckpt_lib.DAMAGED}); the older checkpoints are kept"
            )
      finally:
        profile.close(state)
        mngr.wait_until_finished()
        if writer:
          writer.close()
  summary["step"] = int(state.step)
  summary["state"] = state
  return summary
