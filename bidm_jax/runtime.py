"""Process-wide runtime settings that the command line applies before any compilation.

JAX's persistent compilation cache keeps compiled executables on disk, keyed by the program,
its shapes, the backend and the jax version, so a second start of the same run (or any run
with the same step function) loads its train, sample and evaluation steps instead of
compiling them again (40-110 s each for the CIFAR-10 U-Net on a GPU).
"""

from __future__ import annotations

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
