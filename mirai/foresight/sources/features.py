"""Mode "encoder" with ``foresight.use_precomputed_features`` (Mirai-I, offline): ``PrecomputedFeatures``, the
encoder patch features stored in the code store (bf16, [Tf, C] per sample), a ``ForesightSource``.

``targets(features[B, Tf, C]) -> [B, T, C]`` checks the grid and casts to the target dtype;
``targets_for(batch, model)`` reads ``batch["features"]`` (the loader reads them because ``batch_keys`` names
them). Nothing to compile; FLOPs: the heads only (mode "encoder", the encoder not counted).
Registered with the online encoder under mode "encoder" (``sources/encoder.py``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from mirai.foresight.sources.protocol import ForesightSource


class PrecomputedFeatures(ForesightSource):
    """Encoder patch features read from the code store: ``targets(features[B,Tf,C]) -> [B,T,C]`` in ``dtype``."""

    batch_keys = ("features",)

    def __init__(self, grid_size: int, dim: int | None = None, name: str | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        self.grid_size, self.dim, self.name, self.dtype = int(grid_size), dim, name, dtype

    @classmethod
    def from_store(cls, store, grid_size: int, name: str | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> "PrecomputedFeatures":
        """Check a ``mirai.data.format.CodeStore``'s features against the token grid (and encoder name)."""
        meta = store.meta.get("features")
        meta_path = Path(store.root) / "meta.json"
        if not meta:
            raise ValueError(f"{meta_path}: the store holds no encoder features "
                             "(prepare it with --encoder, or set foresight.use_precomputed_features=false)")
        if int(meta["grid_size"]) != grid_size:
            raise ValueError(f"{meta_path}: features on a {meta['grid_size']}x{meta['grid_size']} patch grid, "
                             f"the token grid is {grid_size}x{grid_size}")
        if name is not None and meta.get("name") not in (None, "features", name):
            raise ValueError(f"{meta_path}: features of encoder {meta.get('name')!r}, config asks for {name!r}")
        return cls(grid_size, int(meta["dim"]), meta.get("name"), dtype)

    def targets(self, features: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        if features.dim() != 3 or features.shape[1] != self.grid_size ** 2:
            raise ValueError(f"precomputed features must be [B, T={self.grid_size ** 2}, C], "
                             f"got {tuple(features.shape)}")
        if self.dim is not None and features.shape[2] != self.dim:
            raise ValueError(f"precomputed features have C = {features.shape[2]}, expected {self.dim}")
        return features.to(device=device if device is not None else features.device,
                           dtype=self.dtype, non_blocking=True)

    __call__ = targets

    # ------------------------------------------------------------------ ForesightSource
    def targets_for(self, batch: dict[str, torch.Tensor], model) -> torch.Tensor:
        if "features" not in batch:
            raise ValueError(f"foresight source PrecomputedFeatures: the batch has no 'features' "
                             f"(keys {sorted(batch)}); the loader reads them for foresight.use_precomputed_features")
        return self.targets(batch["features"])

    def flops(self, gpt_config, cfg):
        from mirai.foresight.sources.encoder import encoder_flops
        return encoder_flops(gpt_config, cfg, count_encoder=False)
