"""The embedded demo: scikit-learn's 8x8 grayscale handwritten digits (shipped with the
package) at their own size, on a small U-Net that trains on 2 CPU cores in a few minutes.

`--mode=pipeline` trains the FP model, then BiDM W1A1 QAT from it, samples both and writes
report.json and samples.png. The `:smoke` variant shortens everything for the test suite.
"""

from bidm_jax.config import default_config


def get_config(variant: str = ""):
  config = default_config()
  config.data.update(source="digits", image_size=8, channels=1, random_flip=False)
  config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
  config.tbs.connections = 2
  config.training.update(
      steps=1500,
      batch_size=64,
      learning_rate=2e-3,
      ema_decay=0.995,
      log_every=50,
      checkpoint_every=500,
      warmup_steps=100,
  )
  # Clipping DDIM's x0 estimate to the data range keeps the W1A1 model's larger eps error at
  # high t (divided by sqrt(alpha_bar_t), below 0.02 there) from saturating whole samples:
  # BiDM's digits_fd 23.8 unclipped, 5.7 clipped (docs/results.md). The pipeline reports both.
  config.sampling.update(steps=50, num_samples=64, batch_size=64, clip_x0=True)
  config.pipeline = dict(
      fp_steps=1200, fp_learning_rate=2e-3, qat_steps=800, qat_learning_rate=1e-3, eval_samples=256
  )
  if variant == "smoke":
    config.training.update(log_every=5, checkpoint_every=10, progress_bar=False)
    config.sampling.update(steps=5, num_samples=16, batch_size=16)
    config.pipeline.update(fp_steps=10, qat_steps=10, eval_samples=32)
  elif variant:
    raise ValueError(f"unknown digits variant {variant!r}; valid: '' or 'smoke'")
  return config
