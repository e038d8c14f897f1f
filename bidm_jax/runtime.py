"""Process-wide runtime settings that the command line applies before any compilation.

JAX's persistent compilation cache keeps compiled executables on disk, keyed by the program,
its shapes, the backend and the jax version, so a second start of the same run (or any run
with the same step function) loads its train, sample and evaluation steps instead of
compiling them again (40-110 s each for the CIFAR-10 U-Net on a GPU).
"""

from __future__ import annotations

import importlib.metadata
import os

import jax
from absl import logging

CACHE_OFF = ("", "off", "none")


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/bidm_jax/xla, else ~/.cache/bidm_jax/xla."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "bidm_jax", "xla")


def enable_compilation_cache(setting: str) -> str | None:
  """Turns JAX's persistent compilation cache on for this process, per `config.compilation_cache`.

  'auto' uses `default_cache_dir()`, a path (local or a URI such as gs://) uses that folder,
  and '' / 'off' / 'none' leaves it off. Executables that compiled in under a second are not
  stored. Returns the folder in use, or None.
  """
  if setting.lower() in CACHE_OFF:
    return None
  path = default_cache_dir() if setting == "auto" else setting
  if "://" not in path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:  # a speed-up only: never the reason a run fails
      logging.warning("compilation cache off: cannot create %s (%s)", path, e)
      return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.info("persistent compilation cache: %s", path)
  return path


def host_description() -> dict:
  """What a result's bits may depend on beyond the code: the device kind, the CPU model (XLA:CPU
  compiles for the host's instruction set), the usable cores, jax/jaxlib and XLA_FLAGS. W1A1
  training turns a last-bit difference into another model, so records name the machine."""
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  except OSError:
    pass
  return dict(
      device=str(jax.devices()[0].device_kind),
      cpu_model=cpu,
      cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      jax=jax.__version__,
      jaxlib=importlib.metadata.version("jaxlib"),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
  )
