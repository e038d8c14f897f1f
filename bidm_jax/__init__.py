"""bidm-jax: BiDM (NeurIPS 2024) fully binarized diffusion models in JAX/Flax.

The pieces a user composes, by where they live:
  binarize   sign functions with straight-through estimators; binarization methods
  layers     BinaryConv, BinaryDense
  models     the DDPM U-Net returning eps and its timestep blocks' features
  diffusion  schedules, q_sample, epsilon loss, DDIM/DDPM samplers (lax.scan)
  bidm       TBS (cross-timestep connections, paired-timestep forward) and SPD
  builders   a config's model, schedule, mesh, optimizer, distillation and teacher
  sampling   load_model, the config's sampler, batched sampling (generate)

Importing the package keeps XLA:CPU's reductions out of YNNPACK (`_deterministic_cpu`).
"""

import importlib.metadata
import os


def _deterministic_cpu() -> None:
  """Adds `--xla_cpu_experimental_ynn_fusion_type=-reduce` to XLA_FLAGS, unless it sets that
  option already.

  jaxlib >= 0.10 runs CPU reductions in YNNPACK, which splits their partial sums by the number
  of intra-op threads (the cores the process may use) and races on some broadcast reductions
  (tensorflow/tensorflow#126812), so sums differ in the last bits between machines and between
  runs. W1A1 training turns such a bit, through sign(), into a different model. XLA's own
  reduction code gives the same bits on any thread count. The flag has to be in place before
  JAX starts its CPU backend, hence here.

  XLA aborts on a flag it does not know, and this one is experimental, so it is set only on
  the jaxlib minor version it was checked on (0.10); on others XLA's defaults stay.
  """
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if version.split(".")[:2] == ["0", "10"] and "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=-reduce".strip()


_deterministic_cpu()

# pylint: disable=wrong-import-position
from bidm_jax.bidm import TBSCache, l2_distillation_loss, paired_timestep_forward, spd_loss
from bidm_jax.binarize import (
    METHODS,
    BinarizationMethod,
    QuantContext,
    binarize_activation,
    binarize_weight,
    get_method,
    sign_approx,
    sign_ste,
)
from bidm_jax.diffusion import (
    Schedule,
    ddim_sample,
    ddpm_sample,
    epsilon_loss,
    make_schedule,
    q_sample,
)
from bidm_jax.layers import BinaryConv, BinaryDense
from bidm_jax.models import UNet, UNetOutput

__version__ = "0.1.0"
