"""FFHQ 256x256 on LDM-4: the paper's setting; `:tiny` for tests (docs/ldm.md)."""

import functools

from bidm_jax.config import latent_diffusion_config

get_config = functools.partial(latent_diffusion_config, "ffhq")
