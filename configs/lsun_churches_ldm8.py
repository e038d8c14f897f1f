"""LSUN-Churches 256x256 on LDM-8 (KL-f8 latents 32x32x4), the paper's latent setting.

  --config=configs/lsun_churches_ldm8.py        BiDM W1A1 QAT (`config.latent_diffusion_config`);
                                                needs --config.first_stage.source.
  --config=configs/lsun_churches_ldm8.py:tiny   the same layout at test size (TINY_LDM8).
The data are TFDS 'lsun/church_outdoor' (docs/ldm.md, 'Preparing the data'); QAT needs
--config.training.teacher=DIR (a --mode=convert of the CompVis LDM checkpoint).
"""

from bidm_jax.config import latent_diffusion_config
from bidm_jax.models import ldm_unet


def get_config(variant: str = ""):
  unet = ldm_unet.TINY_LDM8 if variant == "tiny" else ldm_unet.LDM8
  config = latent_diffusion_config(unet, "kl_f8", 0.0155, variant)
  config.data.update(source="tfds", name="lsun/church_outdoor")
  return config
