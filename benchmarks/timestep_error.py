"""Noise-prediction error per timestep of trained models: where a binarized model loses to FP.

  python benchmarks/timestep_error.py --config=configs/digits.py \
      --workdirs=/tmp/bidm_demo/fp,/tmp/bidm_demo/bidm

Each workdir's (or exported folder's) EMA weights are loaded, at `--step` where given and the
folder is a training workdir (its method comes from the checkpoint's metadata). The script
computes the mean squared error of the eps prediction on the first `--num_images` images of
config.data (at most the split's), noised at each of `--timesteps` with the same noise for
every model. A model with TBS connections predicts as it trains
(`bidm.tbs.paired_timestep_forward`: first at t + 1 on the same noise, then at t with that
pass's cache); others in one call. It prints one JSON line per model. DDIM's x0 estimate
divides this error by sqrt(alpha_bar_t), so an error at large t costs far more than the loss
average shows. `--config.KEY=VALUE` overrides a config field, as for bidm_jax.main (e.g.
`--config.data.source=folder`).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax.bidm import tbs
from bidm_jax.binarize.methods import get_method
from bidm_jax.data import pipeline as data_lib
from bidm_jax.data.preprocess import scale_batch
from bidm_jax.diffusion import q_sample
from bidm_jax.training import checkpoint as ckpt_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a script: importing this module (its
  `eps_predictor`) leaves absl's global flags alone."""
  config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]", lock_config=True)
  flags.DEFINE_list("workdirs", None, "training workdirs or exported folders, comma-separated")
  flags.DEFINE_list("timesteps", ["10", "100", "300", "600", "900", "990"], "timesteps t")
  flags.DEFINE_integer("num_images", 256, "images of config.data (at most the split's)")
  flags.DEFINE_integer("seed", 0, "seed of the noise")
  flags.DEFINE_integer("step", None, "checkpoint step of the training workdirs (default: newest)")
  flags.mark_flags_as_required(["config", "workdirs"])


def eps_predictor(model, schedule, x0, noise):
  """eps_at(params, t) -> (N, H, W, C): the model's eps prediction for x0 noised to t with
  `noise`, jitted; a TBS model first runs at t + 1 and predicts at t with that pass's cache."""
  num_t = schedule.num_timesteps

  def apply(p, x, t, cache, rng):
    return model.apply({"params": p}, x, t, cache=cache)

  @jax.jit
  def eps_at(params, t):
    ts = jnp.full((x0.shape[0],), t, jnp.int32)
    x_t = q_sample(schedule, x0, ts, noise)
    if not model.num_connections:
      return apply(params, x_t, ts, None, None).eps
    t_prev = jnp.minimum(ts + 1, num_t - 1)
    x_prev = q_sample(schedule, x0, t_prev, noise)
    rng = jax.random.PRNGKey(0)  # no dropout outside training: unused
    return tbs.paired_timestep_forward(apply, params, x_prev, t_prev, x_t, ts, rng).eps

  return eps_at


def main(argv):
  del argv
  config = FLAGS.config
  timesteps = [int(t) for t in FLAGS.timesteps]
  schedule = builders.make_schedule(config)
  num_images = min(FLAGS.num_images, data_lib.dataset_size(config.data))
  batch = next(
      iter(data_lib.make_eval_iterator(config.data, batch_size=num_images, num_examples=num_images))
  )
  x0 = jnp.asarray(scale_batch(batch)["image"])
  noise = jax.random.normal(jax.random.PRNGKey(FLAGS.seed), x0.shape)
  programs = {}  # one compiled prediction per method: the seeds of a variant share it
  for workdir in FLAGS.workdirs:
    training = ckpt_lib.folder_kind(workdir) == "training"
    params, meta = ckpt_lib.load_params(
        workdir, builders.model_description(config), step=FLAGS.step if training else None
    )
    fields = dict(meta.get("method", {"name": "fp"}))
    key = json.dumps(fields, sort_keys=True)
    if key not in programs:
      method = get_method(fields.pop("name"), **fields)
      model = builders.make_model(config, method)
      programs[key] = (method, model.num_connections > 0, eps_predictor(model, schedule, x0, noise))
    method, paired, eps_at = programs[key]
    errors = {str(t): float(jnp.mean((eps_at(params, t) - noise) ** 2)) for t in timesteps}
    print(
        json.dumps(
            dict(
                workdir=workdir,
                step=meta.get("step"),
                num_images=num_images,
                method=method.name,
                tbs_paired=paired,
                eps_mse_by_t=errors,
                sqrt_alpha_bar={
                    str(t): float(np.sqrt(schedule.alphas_cumprod[t])) for t in timesteps
                },
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
  define_flags()
  app.run(main)
