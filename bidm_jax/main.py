"""Command line: `python -m bidm_jax.main --config=configs/<name>.py --workdir=DIR --mode=MODE`.

Every config field can be overridden, e.g. `--config.training.steps=1000`.
Modes:
  train     FP training or QAT (by config.binarization.method), resuming from DIR
  sample    config.sampling.num_samples images from DIR (or config.sampling.checkpoint) to
            DIR/samples.png and DIR/samples.npz (config.sampling.engine=packed: from an export)
  pipeline  the demo: FP training, BiDM QAT, sampling, report.json and samples.png
  convert   a public PyTorch DDPM checkpoint (config.convert.source) to an Orbax folder DIR;
            with model.family 'ldm', an LDM checkpoint (CompVis .ckpt or diffusers pipeline
            folder) to the teacher DIR and its first stage DIR/first_stage
  report    size / BOPs / FLOPs / OPs of the config's FP and binary models to DIR/efficiency.json
  evaluate  config.eval.num_samples samples from DIR: FID, sFID, IS, precision/recall to
            DIR/metrics.json against the reference statistics config.eval.reference
  ref_stats reference statistics of config.data's images to config.eval.reference
  export    the trained binary model as packed sign bits to config.export.path (default
            DIR/packed.safetensors), for sampling.engine=packed
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax import demo
from bidm_jax import runtime
from bidm_jax import sampling
from bidm_jax.binarize.methods import FP
from bidm_jax.data.preprocess import BadImageError, to_uint8
from bidm_jax.evaluation import evaluate as eval_lib
from bidm_jax.evaluation import ref_stats as ref_stats_lib
from bidm_jax.evaluation.efficiency import efficiency_report
from bidm_jax.export import convert_ddpm
from bidm_jax.export import convert_ldm_unet
from bidm_jax.export import packed as packed_export
from bidm_jax.io import files
from bidm_jax.models import autoencoders
from bidm_jax.training import checkpoint as ckpt_lib
from bidm_jax.training import train as train_lib
from bidm_jax.training.logging import save_grid

MODES = ("train", "sample", "pipeline", "convert", "report", "evaluate", "ref_stats", "export")

config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py[:variant]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and reports.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU pods, SLURM)."
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "With --distributed where the cluster is not detected: host:port of process 0's coordinator.",
)
flags.DEFINE_integer("num_processes", None, "With --coordinator_address: how many processes.")
flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def sample(config, workdir: str) -> dict:
  """Samples from a trained model; writes samples.png, samples.npz (uint8) and returns stats."""
  model, params, _ = sampling.load_model(config, config.sampling.checkpoint or workdir)
  images, rate = sampling.generate(
      config, model, params, config.sampling.num_samples, seed=config.seed
  )
  files.makedirs(workdir)
  save_grid(images[:64], os.path.join(workdir, "samples.png"))
  if config.sampling.save_npz:
    files.write_npz(os.path.join(workdir, "samples.npz"), images=to_uint8(images))
  return {"num_samples": len(images), "images_per_s": rate}


def convert(config, workdir: str) -> dict:
  if not config.convert.source:
    raise ValueError("config.convert.source: give the PyTorch checkpoint to convert")
  if config.model.family == "ldm":
    preset = config.first_stage.preset
    convert_ldm_unet.convert_checkpoint(
        config.convert.source,
        workdir,
        builders.model_description(config),
        builders.ldm_config(config),
        autoencoders.PRESETS[preset] if preset else None,
        use_ema=config.convert.use_ema,
        scale_factor=config.first_stage.scale_factor,
    )
    first_stage = os.path.join(workdir, convert_ldm_unet.FIRST_STAGE_FOLDER)
    return {"converted": config.convert.source, "to": workdir, "first_stage": first_stage}
  convert_ddpm.convert_checkpoint(
      config.convert.source,
      workdir,
      builders.model_description(config),
      layout=config.convert.layout or None,
      image_size=config.data.image_size,
      in_channels=config.data.channels,
      use_ema=config.convert.use_ema,
  )
  return {"converted": config.convert.source, "to": workdir}


def report(config, workdir: str) -> dict:
  shape = builders.image_shape(config, 1)[1:]
  result = efficiency_report(
      builders.make_model(config, FP),
      builders.make_model(config, config_lib.method_from_config(config)),
      shape,
  )
  files.write_json(os.path.join(workdir, "efficiency.json"), result)
  return result


def check_workdir(workdir: str) -> None:
  """Fails early, in one line, on a local workdir that is a file or cannot be written to (every
  mode writes there); a missing one is created by the mode that writes into it."""
  if files.is_remote(workdir) or not os.path.lexists(workdir):
    return
  if not os.path.isdir(workdir):
    raise NotADirectoryError(f"workdir {workdir} is a file, not a folder")
  try:
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir} cannot be written to ({e.strerror})") from None


def run(config, workdir: str, mode: str) -> dict:
  """Runs one mode; the library entry point behind the command line."""
  config_lib.validate(config)
  check_workdir(workdir)
  if mode in ("train", "pipeline") and config.sampling.engine == "packed":
    raise ValueError(
        "config.sampling.engine: 'packed' samples an export in sample and evaluate; "
        f"{mode} samples its own simulated model: leave it 'simulated'"
    )
  if mode == "train":
    summary = train_lib.train(config, workdir)
    summary.pop("state")
    return summary
  if mode == "pipeline":
    return demo.run_pipeline(config, workdir)
  return {
      "sample": sample,
      "convert": convert,
      "report": report,
      "evaluate": eval_lib.evaluate,
      "ref_stats": ref_stats_lib.ref_stats,
      "export": packed_export.export,
  }[mode](config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  runtime.enable_compilation_cache(FLAGS.config.compilation_cache)
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if any(v is not None for v in explicit) and not (
      FLAGS.distributed and all(v is not None for v in explicit)
  ):
    print(
        "bidm_jax: error: --coordinator_address, --num_processes and --process_id go together, "
        "with --distributed",
        file=sys.stderr,
    )
    sys.exit(1)
  if FLAGS.distributed:
    jax.distributed.initialize(*explicit)
  logging.info("devices: %s", jax.devices())
  try:
    config_file = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]
    if not os.path.isfile(config_file):
      raise FileNotFoundError(f"--config: no config file at {config_file}")
    result = run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
  except (
      ValueError,
      OSError,
      BadImageError,
      ckpt_lib.CheckpointError,
      ckpt_lib.WorkdirInUse,
      train_lib.TrainingDiverged,
  ) as e:
    print(f"bidm_jax: error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("bidm_jax: interrupted; complete checkpoints and output files are kept", file=sys.stderr)
    sys.exit(130)
  if jax.process_index() == 0:
    print(json.dumps(files.json_safe(result), indent=2, default=str, allow_nan=False))


def parse_flags(argv):
  """absl's flag parsing, with an unknown `--config.<field>` or an unreadable config file
  reported in one line.

  ml_collections raises AttributeError/KeyError (not a flags.Error) for an override of a
  field the config does not have, and OSError for overrides of a config file it could not
  load, which absl would show as tracebacks.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except OSError as e:
    reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    print(f"bidm_jax: error: --config: cannot load the config file ({reason})", file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError) as e:
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    detail = " ".join(str(e.args[0] if e.args else e).split())
    bad = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    print(
        f"FATAL Flags parsing error: unknown config field {detail} "
        f"(overrides given: {' '.join(bad)})",
        file=sys.stderr,
    )
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
