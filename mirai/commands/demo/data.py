"""The demo's data: scikit-learn's digits, its splits, and the code stores the runs train on.

* ``load_splits(split, seed)``: the 1,797 8x8 digits (values 0..16) scaled to [-1, 1] and bilinearly upscaled
  to 32x32 (grey, 1 channel). 20 % are held out (stratified, fixed seed): 1,437 training / 360 held-out
  digits. ``split="heldout"`` fits everything on the 1,437 and evaluates on the 360; ``split="validation"``
  carves 20 % of the training digits off (stratified, same seed) and fits on the other 1,149, evaluating on
  those 288 validation digits: the held-out digits are then never returned.
* ``write_store``: a code store (``mirai.data.format``) of one split, one augmentation per image (digits are
  not flip-symmetric), written like ``mirai prepare`` writes one: the tokenizer's codes and, with an encoder,
  that encoder's per-cell features (``encoder.targets(images in [0, 1]) -> [N, Tf, C]``, stored in bf16, with
  the same ``meta.json`` fields prepare writes). A store whose ``demo_key`` (digest of the tokenizer, the
  encoder and the images) matches is reused.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 32                    # digits are upscaled from 8x8 to 32x32 pixels
PATCH = 4                          # k-means patches of 4x4 pixels
GRID = IMAGE_SIZE // PATCH         # -> an 8x8 token grid
NUM_CLASSES = 10
HELDOUT_FRAC = 0.2
VALIDATION_FRAC = 0.2


@dataclass
class Digits:
    """Images float32 [N, 1, 32, 32] in [-1, 1] and labels int64 [N] of the fit and the evaluation split."""

    split: str             # "heldout" or "validation": what the eval_* arrays are
    fit_x: torch.Tensor
    fit_y: np.ndarray
    eval_x: torch.Tensor
    eval_y: np.ndarray

    @property
    def eval_name(self) -> str:
        return "held-out" if self.split == "heldout" else "validation"


def load_digits_32() -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits: float32 [N, 1, 32, 32] in [-1, 1], labels int64 [N]."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x8 = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]          # [N, 1, 8, 8] in [0, 1]
    x32 = F.interpolate(x8, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x32 * 2.0 - 1.0).clamp(-1.0, 1.0), bunch.target.astype(np.int64)       # [N, 1, 32, 32]


def _stratified(labels: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split
    keep, out = train_test_split(np.arange(len(labels)), test_size=frac, stratify=labels, random_state=seed)
    return np.sort(keep), np.sort(out)


def load_splits(split: str = "heldout", seed: int = 0) -> Digits:
    """The fit / evaluation split of the demo (see the module docstring)."""
    x, y = load_digits_32()
    train, held = _stratified(y, HELDOUT_FRAC, seed)
    if split == "heldout":
        return Digits(split, x[train], y[train], x[held], y[held])
    if split != "validation":
        raise ValueError(f"split must be 'heldout' or 'validation', got {split!r}")
    fit, val = _stratified(y[train], VALIDATION_FRAC, seed)
    return Digits(split, x[train][fit], y[train][fit], x[train][val], y[train][val])


def fit_size(split: str, seed: int = 0) -> int:
    """Number of digits the runs train on for ``split`` (1,437 for "heldout", 1,149 for "validation")."""
    from sklearn.datasets import load_digits
    y = load_digits().target
    train, _ = _stratified(y, HELDOUT_FRAC, seed)
    return len(train) if split == "heldout" else len(_stratified(y[train], VALIDATION_FRAC, seed)[0])


def digest(*parts) -> str:
    """16 hex digits of sha256 over arrays, tensors, bytes and strings (in order)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().contiguous().numpy()
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype, p.shape)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    return digest(Path(path).read_bytes())


def store_key(root: Path) -> str | None:
    """The ``demo_key`` of a finished store (None: no store or an unreadable one)."""
    try:
        return json.loads((Path(root) / "meta.json").read_text()).get("demo_key")
    except (OSError, json.JSONDecodeError):
        return None


@torch.no_grad()
def encoder_features(encoder, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Per-cell features [N, Tf, C] bf16 of images [N, C, H, W] in [-1, 1], computed as ``mirai prepare``
    computes them: the images mapped to [0, 1] and handed to ``encoder.targets`` in batches."""
    unit = images.float().add(1).mul_(0.5).clamp_(0, 1)                              # [-1, 1] -> [0, 1]
    return torch.cat([encoder.targets(c).to(torch.bfloat16) for c in unit.split(batch)])


def write_store(root: Path, tokenizer, images: torch.Tensor, labels: np.ndarray, *, key: str, split: str,
                encoder=None) -> bool:
    """Encode one split into a code store at ``root``; returns True when a matching store was reused."""
    from mirai.data.format import write_code_store
    root = Path(root)
    if store_key(root) == key:
        return True
    if root.exists():
        shutil.rmtree(root)                                      # a store of another tokenizer / encoder
    codes = tokenizer.encode(images).numpy().astype(np.uint16)[:, None]   # [N, T] -> [N, A=1, T]
    extra = {"demo_key": key, "source": "sklearn.datasets.load_digits", "split": split, "tokenizer": "kmeans"}
    features, name = None, "features"
    if encoder is not None:
        features = encoder_features(encoder, images)[:, None]           # [N, Tf, C] -> [N, A=1, Tf, C]
        name = encoder.name
        extra.update(encoder_block_causal=int(encoder.block_causal), encoder_input_size=encoder.input_size,
                     encoder=encoder.description)
    write_code_store(root, codes, labels, grid_size=GRID, vocab_size=tokenizer.codebook_size,
                     num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, features=features, feature_name=name,
                     files=[f"sklearn.datasets.load_digits[{split}][{i}]" for i in range(len(labels))],
                     extra=extra)
    return False
