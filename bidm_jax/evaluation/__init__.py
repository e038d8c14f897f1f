"""Evaluation: sample quality and efficiency.

Modules:
  inception   the FID Inception-v3 (Flax) and its weight loader
  metrics     FID, sFID, Inception Score, precision/recall, FeatureStats
  evaluate    `ref_stats` (reference statistics of a dataset) and `evaluate` (metrics of a
              trained model's samples), the command-line modes of the same names:
              `from bidm_jax.evaluation import evaluate as eval_lib; eval_lib.evaluate(...)`
  efficiency  model size and BOPs / FLOPs / OPs (paper Table 4)
  digits      a weight-free Frechet distance for the digits demo
"""
