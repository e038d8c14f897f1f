"""Noise-prediction error per timestep of trained models: where a binarized model loses to FP.

  python benchmarks/timestep_error.py --config=configs/digits.py \
      --workdirs /tmp/bidm_demo/fp /tmp/bidm_demo/bidm

Each workdir's EMA weights are loaded (its method comes from the checkpoint's metadata). The
script computes the mean squared error of the eps prediction (one call, no TBS cache) on the
first `--num_images` images of config.data, noised at each of `--timesteps` with the same noise
for every model. It prints one JSON line per model. DDIM's x0 estimate divides this error by
sqrt(alpha_bar_t), so an error at large t costs far more than the loss average shows.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax.binarize.methods import get_method
from bidm_jax.data import pipeline as data_lib
from bidm_jax.diffusion import q_sample
from bidm_jax.training import checkpoint as ckpt_lib


def main():
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
  parser.add_argument("--workdirs", nargs="+", required=True)
  parser.add_argument("--timesteps", type=int, nargs="+", default=[10, 100, 300, 600, 900, 990])
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  config = config_lib.load_config_file(args.config)
  schedule = builders.make_schedule(config)
  batch = next(
      iter(
          data_lib.make_eval_iterator(
              config.data, batch_size=args.num_images, num_examples=args.num_images
          )
      )
  )
  x0 = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1
  noise = jax.random.normal(jax.random.PRNGKey(args.seed), x0.shape)
  for workdir in args.workdirs:
    params, meta = ckpt_lib.load_params(workdir, builders.model_description(config))
    fields = dict(meta["method"])
    method = get_method(fields.pop("name"), **fields)
    model = builders.make_model(config, method)
    apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t).eps)
    errors = {}
    for t in args.timesteps:
      ts = jnp.full((x0.shape[0],), t, jnp.int32)
      eps = apply(params, q_sample(schedule, x0, ts, noise), ts)
      errors[str(t)] = float(jnp.mean((eps - noise) ** 2))
    print(
        json.dumps(
            dict(
                workdir=workdir,
                method=method.name,
                eps_mse_by_t=errors,
                sqrt_alpha_bar={
                    str(t): float(np.sqrt(schedule.alphas_cumprod[t])) for t in args.timesteps
                },
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
  main()
