"""CIFAR-10 32x32, the paper's pixel-space setting (paper section 4 and appendix A).

  --config=configs/cifar10.py      BiDM W1A1 QAT: lr 6e-5, batch 64, 100k steps, Adam, clip 1,
                                   EMA 0.9999, 2 TBS connections, SPD lambda 3e-2, DDIM 100.
  --config=configs/cifar10.py:fp   the full-precision DDPM teacher trained from scratch
                                   (DDPM's recipe: lr 2e-4, batch 128, 800k steps, warm-up 5k).
  --config=configs/cifar10.py:small_fp   the reduced-scale study's FP teacher: the U-Net at
                                   half width (ch 64), bf16, no dropout, batch 256, lr 4e-4,
                                   EMA 0.9995, 16k steps: about 12 minutes of one H200.
  --config=configs/cifar10.py:small      BiDM QAT on that model (the study's other methods are
                                   --config.binarization.method overrides of it): batch 64,
                                   lr 2e-4, EMA 0.999.
QAT needs --config.training.teacher=DIR (an FP workdir or a converted public checkpoint).
"""

from bidm_jax.config import default_config

VARIANTS = ("bidm", "fp", "small_fp", "small")


def get_config(variant: str = "bidm"):
  if variant not in VARIANTS:
    raise ValueError(
        f"unknown cifar10 variant {variant!r}; valid: {', '.join(VARIANTS)}; "
        "choose other methods with --config.binarization.method"
    )
  config = default_config()
  if variant.startswith("small"):
    config.model.update(ch=64, dropout=0.0, compute_dtype="bfloat16")
    config.training.update(
        steps=10_000,
        batch_size=64,
        learning_rate=2e-4,
        ema_decay=0.999,
        log_every=250,
        checkpoint_every=2500,
        keep_checkpoints=2,
        progress_bar=False,
    )
  if variant.endswith("fp"):
    config.binarization.method = "fp"
  if variant == "fp":
    config.training.update(steps=800_000, batch_size=128, learning_rate=2e-4, warmup_steps=5000)
  elif variant == "small_fp":
    config.training.update(
        steps=16_000, batch_size=256, learning_rate=4e-4, warmup_steps=1000, ema_decay=0.9995
    )
  return config
