"""Sampling a model the config describes: loading it, the jitted sampler, the batched loop.

`load_model(config, source)` reads the parameters that `sample`, `evaluate` and `export` use
(a training workdir's EMA parameters, an exported folder, or with `sampling.engine` 'packed' a
packed export) and checks them against the config's model and method. `make_sampler` is the
config's DDIM/DDPM sampler as one jitted scan; `sample_batches` runs it batch by batch,
sharded over the mesh, and `generate` collects the batches. Training's sample grids, the demo
and the benchmarks draw through these too.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from bidm_jax import builders
from bidm_jax import config as config_lib
from bidm_jax.diffusion import samplers
from bidm_jax.diffusion.schedules import Schedule
from bidm_jax.export import packed as packed_export
from bidm_jax.layers import packed as packed_layers
from bidm_jax.models.unet import UNet
from bidm_jax.training import checkpoint as ckpt_lib

Array = jax.Array


def load_model(config, source) -> tuple[UNet, Any, dict]:
  """(model, params, meta) of the trained model at `source`, checked against the config.

  source: a training workdir (its EMA parameters unless config.sampling.use_ema is False; its
  newest step unless config.sampling.checkpoint_step names one), an exported folder, or with
  config.sampling.engine 'packed' a --mode=export file or a folder holding it (`params` is then
  the packed tree). meta is the checkpoint's (`load_params` / `load_export`): 'model',
  'method', and 'step' (the verified step; None for an export). Raises CheckpointError when
  the source holds another architecture or method.
  """
  method = config_lib.method_from_config(config)
  if config.sampling.engine == "packed":
    params, meta = packed_export.load_export(source, config)
  else:
    params, meta = ckpt_lib.load_params(
        source,
        builders.model_description(config),
        use_ema=config.sampling.use_ema,
        step=config.sampling.checkpoint_step or None,
    )
  found = meta.get("method", {}).get("name", method.name)
  if found != method.name:
    raise ckpt_lib.CheckpointError(
        f"{source} holds a {found!r} model; set --config.binarization.method={found}"
    )
  return builders.make_model(config, method), params, meta


def make_sampler(config, model: UNet, schedule: Schedule, mesh) -> Callable:
  """sample(params, rng, batch) -> (batch, H, W, C) images in about [-1, 1], batch-sharded.

  Runs config.sampling's sampler (DDIM with `steps` and `eta`, or DDPM) as one jitted scan,
  carrying the TBS cache of models that have connections, with the x0 clipping or dynamic
  thresholding of `clip_x0` and `dynamic_threshold` (both off by default). With `engine`
  'packed', `params` is an export's packed tree (`export.packed.load_export`) and the binary
  layers run on its sign bits (`layers.packed.apply` with `packed_impl`).
  """
  s = config.sampling
  data_sharding = NamedSharding(mesh, P("data"))
  x0_options = dict(clip_x0=bool(s.clip_x0), dynamic_threshold=float(s.dynamic_threshold))

  def sample(params, rng, batch):
    def apply(x, t, cache):
      x = jax.lax.with_sharding_constraint(x, data_sharding)
      if s.engine == "packed":
        return packed_layers.apply(model, params, x, t, cache=cache, impl=s.packed_impl)
      return model.apply({"params": params}, x, t, cache=cache)

    shape = builders.image_shape(config, batch)
    if s.sampler == "ddim":
      return samplers.ddim_sample(
          apply, schedule, shape, rng, steps=s.steps, eta=s.eta, **x0_options
      )
    return samplers.ddpm_sample(apply, schedule, shape, rng, **x0_options)

  return jax.jit(sample, static_argnums=2, out_shardings=data_sharding)


class SampleBatch(NamedTuple):
  """images: (b, H, W, C) float32 on the host; images_per_s: the rate of the batches so far,
  the first batch's compilation excluded (nan until the second batch)."""

  images: np.ndarray
  images_per_s: float


def sample_batches(
    config,
    model: UNet,
    params,
    num: int,
    *,
    seed: int,
    batch_size: int,
    mesh=None,
    desc: str = "sampling",
    progress_bar: bool = True,
) -> Iterator[SampleBatch]:
  """`num` samples of `model`, batch by batch, as host arrays (num rows in all).

  Batches of `batch_size` (rounded up to the mesh size) run sharded over all devices; batch i
  draws with key fold_in(PRNGKey(seed), i), so the samples depend on the seed and batch size
  only. An LDM's latents are decoded by config.first_stage (`builders.latent_decoder`, images
  clipped to [-1, 1]). The progress bar (images) shows on process 0.
  """
  mesh = mesh or builders.make_mesh(config)
  sample = make_sampler(config, model, builders.make_schedule(config), mesh)
  first_stage = builders.load_first_stage(config, mesh)
  decode = builders.latent_decoder(first_stage) if first_stage else lambda z: z
  devices = mesh.devices.size
  batch = -(-min(batch_size, num) // devices) * devices
  params = jax.device_put(params, NamedSharding(mesh, P()))
  key = jax.random.PRNGKey(seed)
  done, timed, elapsed = 0, 0, 0.0
  with tqdm(
      total=num, desc=desc, unit="img", disable=not progress_bar or jax.process_index() != 0
  ) as bar:
    for i in range(-(-num // batch)):
      start = time.perf_counter()
      images = jax.block_until_ready(decode(sample(params, jax.random.fold_in(key, i), batch)))
      if i:
        timed, elapsed = timed + batch, elapsed + time.perf_counter() - start
      images = np.asarray(multihost_utils.process_allgather(images, tiled=True))[: num - done]
      yield SampleBatch(images, timed / elapsed if elapsed else float("nan"))
      done += len(images)
      bar.update(len(images))


def generate(
    config, model: UNet, params, num: int, *, seed: int, mesh=None, progress_bar: bool = True
) -> tuple[np.ndarray, float]:
  """`num` samples (num, H, W, C) float32 on the host, and the sampling rate in images/s
  (`sample_batches` in batches of config.sampling.batch_size)."""
  parts, rate = [], float("nan")
  for part in sample_batches(
      config,
      model,
      params,
      num,
      seed=seed,
      batch_size=config.sampling.batch_size,
      mesh=mesh,
      progress_bar=progress_bar,
  ):
    parts.append(part.images)
    rate = part.images_per_s
  return np.concatenate(parts), rate
