"""Sample-quality metrics of the ADM ImageNet evaluation suite, in PyTorch.

- ``inception``: the 2015 TF Inception-v3 as ported by torch-fidelity (same module names, so its
  weights file ``weights-inception-2015-12-05-6726825d.pth`` / pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` load), with a TF1-exact bilinear resize to 299 px;
  returns pool features (FID, precision/recall), spatial features (sFID) and logits (IS).
- ``stats``: the math on features only (testable with injected features): Frechet distance,
  Inception Score, k-NN manifold precision and recall.
"""
from mirai.metrics.stats import (FIDStatistics, frechet_distance, inception_score, manifold_radii,
                                 precision_recall)

__all__ = ["FIDStatistics", "frechet_distance", "inception_score", "manifold_radii", "precision_recall"]
