"""Synthetic code stores for tests, the debug config and the step benchmark.

``write_synthetic_store(root, num_images, grid_size, vocab_size, num_classes, num_aug=2,
features_dim=None, seed=0)`` writes a real code store (``mirai.data.format``) of random codes with
a little structure (each class has its own token distribution, so the NTP loss can go down), and
optional random bf16 "encoder features" [N, A, T, C] for Mirai-I.

    mirai synthetic --out runs/debug_codes            # the store configs/debug.yaml reads
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mirai.data.format import write_code_store


def write_synthetic_store(root: str | Path, num_images: int = 64, grid_size: int = 4, vocab_size: int = 64,
                          num_classes: int = 10, num_aug: int = 2, features_dim: int | None = None,
                          seed: int = 0, image_size: int | None = None) -> Path:
    """Write the store at ``root`` (see the module docstring); ``image_size`` only goes into meta.json (default
    16 px per token). Returns ``root``."""
    rng = np.random.default_rng(seed)
    T = grid_size * grid_size
    labels = rng.integers(0, num_classes, size=num_images)
    # class c draws tokens mostly from its own window of the vocabulary
    width = max(2, vocab_size // max(num_classes, 1))
    base = (labels * width) % vocab_size                                   # [N]
    codes = (base[:, None, None] + rng.integers(0, width, size=(num_images, num_aug, T))) % vocab_size
    noise = rng.random((num_images, num_aug, T)) < 0.1
    codes = np.where(noise, rng.integers(0, vocab_size, size=codes.shape), codes).astype(np.uint16)
    features = None
    if features_dim:
        features = torch.from_numpy(rng.standard_normal((num_images, num_aug, T, features_dim)).astype(np.float32))
        features = features.to(torch.bfloat16)                             # [N, A, T, C]
    return write_code_store(root, codes, labels, grid_size=grid_size, vocab_size=vocab_size,
                            num_classes=num_classes, image_size=image_size or grid_size * 16,
                            features=features, feature_name="features",
                            extra={"synthetic": True, "seed": seed})
