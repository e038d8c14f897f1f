"""FFHQ 256x256 on LDM-4 (VQ-f4 latents 64x64x3), the paper's latent setting.

  --config=configs/ffhq_ldm4.py        BiDM W1A1 QAT (`config.latent_diffusion_config`);
                                                needs --config.first_stage.source.
  --config=configs/ffhq_ldm4.py:tiny   the same layout at test size (TINY_LDM4).
FFHQ is an image folder (--config.data.data_dir=DIR; docs/ldm.md, 'Preparing the data'); QAT
needs --config.training.teacher=DIR (a --mode=convert of the CompVis LDM checkpoint).
"""

from bidm_jax.config import latent_diffusion_config
from bidm_jax.models import ldm_unet


def get_config(variant: str = ""):
  unet = ldm_unet.TINY_LDM4 if variant == "tiny" else ldm_unet.LDM4
  config = latent_diffusion_config(unet, "vq_f4", 0.0195, variant)
  config.data.update(source="folder", data_dir="ffhq")
  return config
