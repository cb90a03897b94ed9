"""Metric math on precomputed features (no network here), following the ADM evaluator.

- ``FIDStatistics.from_features``: mean and covariance (float64, ``np.cov(rowvar=False)``).
- ``frechet_distance``: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) with ``scipy.linalg.sqrtm``;
  eps * I added to both covariances when the product is singular; a small imaginary part from
  numerical error is dropped, a large one raises. The same function gives sFID on the spatial
  features.
- ``inception_score``: softmax of the (bias-free) Inception logits, exp(mean KL(p(y|x) || p(y)))
  per split of ``split_size`` samples (5000 as in ADM), averaged over splits.
- ``manifold_radii`` / ``precision_recall``: improved precision and recall (Kynkaanniemi et al.)
  with k-NN hyperspheres, k = 3 as in ADM: the radius of a point is its squared distance to its
  k-th nearest neighbour in its own set (the point itself counted as the 0th); precision = share of
  samples inside some reference hypersphere, recall = share of references inside some sample
  hypersphere. Distances are squared Euclidean in fp32 blocks (ADM uses fp16 blocks with an fp32
  fallback, so the last digit can differ).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FIDStatistics:
    mu: np.ndarray      # [D] mean feature
    sigma: np.ndarray   # [D, D] covariance

    @classmethod
    def from_features(cls, feats: np.ndarray | torch.Tensor) -> "FIDStatistics":
        x = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"features must be [N >= 2, D], got {x.shape}")
        return cls(x.mean(0), np.cov(x, rowvar=False))

    def frechet_distance(self, other: "FIDStatistics", eps: float = 1e-6) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    try:
        from scipy import linalg
    except ImportError as err:
        raise ImportError("FID needs scipy (pip install scipy)") from err
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
    if s1.shape != s2.shape:
        raise ValueError(f"covariances differ in shape: {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():          # singular products are handled just below, as in ADM
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1.dot(s2))   # (scipy >= 1.17 deprecates ADM's disp=False)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = 5000) -> float:
    """IS from logits [N, classes] (softmax over all classes, splits of ``split_size``)."""
    x = torch.as_tensor(np.asarray(logits.cpu() if isinstance(logits, torch.Tensor) else logits), dtype=torch.float64)
    if x.dim() != 2:
        raise ValueError(f"logits must be [N, classes], got {tuple(x.shape)}")
    preds = torch.softmax(x, dim=1)
    scores = []
    for part in preds.split(split_size):
        kl = part * (torch.log(part) - torch.log(part.mean(0, keepdim=True)))
        scores.append(torch.exp(kl.sum(1).mean()).item())
    return float(np.mean(scores))


def _as_tensor(x, device) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=torch.float32)


def _sq_dists(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(u), len(v)], clamped at 0."""
    return ((u * u).sum(1, keepdim=True) - 2 * u @ v.t() + (v * v).sum(1)[None]).clamp_min_(0)


def manifold_radii(features, k: int = 3, row_batch: int = 2048, device="cpu") -> torch.Tensor:
    """Squared distance of each feature to its k-th nearest neighbour in the set (self = 0th): [N]."""
    f = _as_tensor(features, device)
    if f.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples, got {f.shape[0]}")
    out = [torch.kthvalue(_sq_dists(rows, f), k + 1, dim=1).values for rows in f.split(row_batch)]
    return torch.cat(out).cpu()


def _inside_any(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, row_batch: int) -> torch.Tensor:
    """For each point: is it within radius of some centre? -> bool [len(points)]."""
    radii = radii.to(points.device)
    return torch.cat([(_sq_dists(rows, centres) <= radii[None]).any(1) for rows in points.split(row_batch)])


def precision_recall(ref_features, sample_features, k: int = 3, row_batch: int = 2048,
                     device="cpu") -> tuple[float, float]:
    """(precision, recall) of samples against references with k-NN manifolds."""
    ref, sam = _as_tensor(ref_features, device), _as_tensor(sample_features, device)
    if ref.shape[1] != sam.shape[1]:
        raise ValueError(f"feature sizes differ: reference {ref.shape[1]}, samples {sam.shape[1]}")
    r_ref = manifold_radii(ref, k, row_batch, device)
    r_sam = manifold_radii(sam, k, row_batch, device)
    precision = _inside_any(sam, ref, r_ref, row_batch).double().mean().item()
    recall = _inside_any(ref, sam, r_sam, row_batch).double().mean().item()
    return float(precision), float(recall)
