"""LSUN-Churches 256x256 on LDM-8: the paper's setting; `:tiny` for tests (docs/ldm.md)."""

import functools

from bidm_jax.config import latent_diffusion_config

get_config = functools.partial(latent_diffusion_config, "lsun_churches")
