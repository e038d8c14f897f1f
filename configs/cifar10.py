"""CIFAR-10 32x32, the paper's pixel-space setting (spec section 1, paper appendix A).

  --config=configs/cifar10.py      BiDM W1A1 QAT: lr 6e-5, batch 64, 100k steps, Adam, clip 1,
                                   EMA 0.9999, 2 TBS connections, SPD lambda 3e-2, DDIM 100.
  --config=configs/cifar10.py:fp   the full-precision DDPM teacher trained from scratch
                                   (DDPM's recipe: lr 2e-4, batch 128, 800k steps, warm-up 5k).
QAT needs --config.training.teacher=DIR (an FP workdir or a converted public checkpoint).
"""

from bidm_jax.config import default_config


def get_config(variant: str = "bidm"):
  config = default_config()
  if variant == "fp":
    config.binarization.method = "fp"
    config.training.update(steps=800_000, batch_size=128, learning_rate=2e-4, warmup_steps=5000)
  elif variant != "bidm":
    raise ValueError(f"unknown cifar10 variant {variant!r}; valid: 'bidm' (default) or 'fp'; "
                     "choose other methods with --config.binarization.method")
  return config
