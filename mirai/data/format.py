"""On-disk format of pre-extracted training data (one folder per dataset).

Layout of a code store folder::

    meta.json      written last: {"format": "mirai-codes-v1", "num_images", "num_aug",
                   "seq_len", "grid_size", "vocab_size", "num_classes", "image_size",
                   "features": null | {"name", "dim", "grid_size"}, ...free-form extras}
    codes.npy      uint16 [N, A, T]    VQ codes of each image's A augmentations (ten-crop, flips)
    labels.npy     int64  [N]          class labels
    files.txt      N lines             source image of each row (the index)
    done.npy       bool   [N]          rows already written (resumable preparation)
    features.npy   uint16 [N, A, Tf, C] optional encoder patch features, bf16 bits stored as uint16

Every array is memory-mapped (``np.load(mmap_mode="r")``), so a loader never opens
one file per sample. ``CodeStore`` refuses arrays of the wrong shape or dtype (float labels or codes
would be truncated silently) and unreadable files (an empty ``codes.npy``) naming the file;
``CodeStore.check(vocab_size, num_classes)`` scans every code and label in memory-mapped chunks
(a code >= the vocabulary, a label outside [0, num_classes): the label ``num_classes`` is the CFG null
class, so it would train silently) and, on request, every feature (NaN / Inf); ``check_features`` does
the latter for one loaded batch. Each error names the file, the field and the first bad index.

``CodeStoreWriter`` preallocates the arrays, fills rows in any order (several ranks may each fill
their own rows) and writes ``meta.json`` only in ``finalize`` once every row is done; ``CodeStore``
refuses a folder without it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "mirai-codes-v1"


class CodeStoreError(ValueError):
    """A code store folder is missing, incomplete or inconsistent (the message names the file)."""


SCAN_CHUNK_BYTES = 64 << 20          # memory-mapped scans read this much at a time
_BF16_EXPONENT = 0x7F80              # bf16 bits: all exponent bits set = Inf or NaN
_DTYPES = {"codes.npy": "integer", "labels.npy": "integer", "features.npy": np.dtype(np.uint16)}


def _row_chunks(arr: np.ndarray):
    """(first row, rows) slices of `arr` of about SCAN_CHUNK_BYTES each (memory maps are read lazily)."""
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    step = max(1, SCAN_CHUNK_BYTES // row_bytes)
    for start in range(0, arr.shape[0], step):
        yield start, arr[start:start + step]


def first_nonfinite_bf16(bits: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first Inf / NaN in an array of bf16 bit patterns (uint16), or None when all are finite."""
    magnitude = np.bitwise_and(bits, 0x7FFF)
    if magnitude.size == 0 or magnitude.max() < _BF16_EXPONENT:
        return None
    flat = int(np.flatnonzero(magnitude.reshape(-1) >= _BF16_EXPONENT)[0])
    return tuple(int(i) for i in np.unravel_index(flat, bits.shape))


def _feature_error(path: Path | str, where: tuple[int, int, int, int], bits: int) -> CodeStoreError:
    value = (np.array([bits], dtype=np.uint32) << 16).view(np.float32)[0]          # bf16 bits -> float32
    return CodeStoreError(f"{path}: features: non-finite value {value} at index [{', '.join(map(str, where))}] "
                          "(image, augmentation, patch, channel); re-extract this store's features "
                          "(`mirai prepare --encoder`)")


def check_features(bits: np.ndarray, index: np.ndarray, aug: np.ndarray, path: Path | str) -> None:
    """Refuse a loaded batch of features (uint16 bf16 bits [B, Tf, C] of images `index`, augmentations `aug`)
    holding an Inf or NaN, naming the file and the first bad (image, augmentation, patch, channel)."""
    bad = first_nonfinite_bf16(bits)
    if bad is not None:
        b, patch, chan = bad
        raise _feature_error(path, (int(index[b]), int(aug[b]), patch, chan), int(bits[bad]))


@dataclass(frozen=True)
class FeatureSpec:
    name: str       # encoder name, e.g. "dinov2_vitb14"
    dim: int        # C, channels per patch
    grid_size: int  # patch grid side (Tf = grid_size ** 2)


class CodeStoreWriter:
    """Preallocates a store and fills it row by row; resumable (see ``done``)."""

    def __init__(self, root: str | os.PathLike, num_images: int, num_aug: int, grid_size: int,
                 vocab_size: int, num_classes: int, image_size: int,
                 features: FeatureSpec | None = None, extra: dict[str, Any] | None = None):
        if num_images <= 0:
            raise CodeStoreError(f"{root}: num_images must be positive, got {num_images}")
        if vocab_size > 65536:
            raise CodeStoreError(f"{root}: vocab_size {vocab_size} does not fit uint16 codes")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        seq_len = grid_size * grid_size
        self.meta: dict[str, Any] = {
            "format": FORMAT, "num_images": num_images, "num_aug": num_aug, "seq_len": seq_len,
            "grid_size": grid_size, "vocab_size": vocab_size, "num_classes": num_classes,
            "image_size": image_size,
            "features": None if features is None else
            {"name": features.name, "dim": features.dim, "grid_size": features.grid_size},
            **(extra or {}),
        }
        self.codes = self._open("codes.npy", np.uint16, (num_images, num_aug, seq_len))
        self.labels = self._open("labels.npy", np.int64, (num_images,))
        self.done = self._open("done.npy", np.bool_, (num_images,))
        self.features = None
        if features is not None:
            shape = (num_images, num_aug, features.grid_size ** 2, features.dim)
            self.features = self._open("features.npy", np.uint16, shape)

    def _open(self, name: str, dtype, shape) -> np.memmap:
        path = self.root / name
        if path.exists():
            arr = np.load(path, mmap_mode="r+")
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise CodeStoreError(f"{path}: exists with shape {arr.shape} {arr.dtype}, expected "
                                     f"{tuple(shape)} {np.dtype(dtype)}; remove the folder to start over")
            return arr
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))

    def pending(self) -> np.ndarray:
        """Indices of rows not yet written."""
        return np.flatnonzero(~np.asarray(self.done))

    def write(self, rows, codes, labels, features: torch.Tensor | None = None) -> None:
        """rows [n]; codes [n, A, T] ints < 2**16; labels [n]; features [n, A, Tf, C] (bf16)."""
        rows = np.asarray(rows, dtype=np.int64)
        codes = codes.cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if codes.shape[1:] != self.codes.shape[1:]:
            raise CodeStoreError(f"codes of shape {codes.shape[1:]} per row, store expects {self.codes.shape[1:]}")
        self.codes[rows] = codes.astype(np.uint16)
        self.labels[rows] = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if self.features is not None:
            if features is None:
                raise CodeStoreError("this store holds encoder features: write() needs `features`")
            self.features[rows] = features.to(torch.bfloat16).cpu().view(torch.uint16).numpy()
        self.done[rows] = True

    def finalize(self, files: list[str] | None = None) -> Path:
        """Flush, write the index and (atomically) meta.json. Fails if any row is missing."""
        missing = self.pending()
        if len(missing):
            raise CodeStoreError(f"{self.root}: {len(missing)} rows not written yet (first: {missing[:5].tolist()})")
        for arr in (self.codes, self.labels, self.done, self.features):
            if arr is not None:
                arr.flush()
        if files is not None:
            (self.root / "files.txt").write_text("\n".join(files) + "\n")
        tmp = self.root / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2))
        os.replace(tmp, self.root / "meta.json")
        return self.root


def write_code_store(root, codes, labels, grid_size: int, vocab_size: int, num_classes: int,
                     image_size: int, features: torch.Tensor | None = None, feature_name: str = "features",
                     files: list[str] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a whole store at once: codes [N, A, T], labels [N], optional features [N, A, Tf, C]."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    spec = None
    if features is not None:
        spec = FeatureSpec(feature_name, int(features.shape[-1]), int(round(features.shape[2] ** 0.5)))
    w = CodeStoreWriter(root, codes.shape[0], codes.shape[1], grid_size, vocab_size, num_classes,
                        image_size, spec, extra)
    w.write(np.arange(codes.shape[0]), codes, labels, features)
    return w.finalize(files)


class CodeStore:
    """Read-only, memory-mapped view of a finished store."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not self.root.is_dir():
            raise CodeStoreError(f"{self.root}: no such data folder (run `mirai prepare` first)")
        if not meta_path.exists():
            raise CodeStoreError(f"{meta_path}: missing; the store is unfinished or not a mirai code store")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise CodeStoreError(f"{meta_path}: not valid JSON ({err})") from err
        if self.meta.get("format") != FORMAT:
            raise CodeStoreError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        n, a, t = self.meta["num_images"], self.meta["num_aug"], self.meta["seq_len"]
        self.codes = self._load("codes.npy", (n, a, t))
        self.labels = self._load("labels.npy", (n,))
        self.features = None
        if self.meta.get("features"):
            f = self.meta["features"]
            self.features = self._load("features.npy", (n, a, f["grid_size"] ** 2, f["dim"]))

    def _load(self, name: str, shape) -> np.ndarray:
        path = self.root / name
        if not path.exists():
            raise CodeStoreError(f"{path}: missing")
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:          # EOFError: an empty file
            raise CodeStoreError(f"{path}: unreadable, not a .npy array ({type(err).__name__}: "
                                 f"{err or 'empty file'})") from None
        if arr.shape != tuple(shape):
            raise CodeStoreError(f"{path}: shape {arr.shape}, meta.json says {tuple(shape)}")
        want = _DTYPES[name]
        if want == "integer" and (not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise CodeStoreError(f"{path}: dtype {arr.dtype}, expected integers ({name[:-4]} would be truncated)")
        if want != "integer" and arr.dtype != want:
            raise CodeStoreError(f"{path}: dtype {arr.dtype}, expected {want} (bf16 bit patterns)")
        return arr

    def check(self, vocab_size: int, num_classes: int, features: bool = False) -> None:
        """Scan the whole store (memory-mapped, chunked): every code in [0, vocab_size), every label in
        [0, num_classes) (the tighter of these and meta.json's values), and with `features` every feature
        finite. Raises CodeStoreError naming the file, the field and the first bad index."""
        vocab = min(int(vocab_size), int(self.meta.get("vocab_size", vocab_size)))
        classes = min(int(num_classes), int(self.meta.get("num_classes", num_classes)))
        why = f"(model.vocab_size {vocab_size}, meta.json vocab_size {self.meta.get('vocab_size')})"
        signed = np.issubdtype(self.codes.dtype, np.signedinteger)
        for start, chunk in _row_chunks(self.codes):                       # [n, A, T]
            if chunk.size and (int(chunk.max()) >= vocab or (signed and int(chunk.min()) < 0)):
                i, a, t = np.unravel_index(int(np.flatnonzero((chunk >= vocab) | (chunk < 0))[0]), chunk.shape)
                raise CodeStoreError(f"{self.root / 'codes.npy'}: codes: token id {int(chunk[i, a, t])} at index "
                                     f"[{start + int(i)}, {int(a)}, {int(t)}] (image, augmentation, position) is "
                                     f"outside [0, {vocab}) {why}")
        labels = np.asarray(self.labels)
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        if len(bad):
            i = int(bad[0])
            raise CodeStoreError(f"{self.root / 'labels.npy'}: labels: label {int(labels[i])} at index {i} is outside "
                                 f"[0, {classes}) (model.num_classes {num_classes}, meta.json num_classes "
                                 f"{self.meta.get('num_classes')}; the label num_classes is the CFG null class)")
        if features and self.features is not None:
            for start, chunk in _row_chunks(self.features):                # [n, A, Tf, C]
                bad = first_nonfinite_bf16(chunk)
                if bad is not None:
                    i, a, patch, chan = bad
                    raise _feature_error(self.root / "features.npy", (start + i, a, patch, chan), int(chunk[bad]))

    def __len__(self) -> int:
        return int(self.meta["num_images"])

    @property
    def grid_size(self) -> int:
        return int(self.meta["grid_size"])

    @property
    def num_aug(self) -> int:
        return int(self.meta["num_aug"])

    def get(self, index: int, aug: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(codes int64 [T], label, features bf16 [Tf, C] or None) of one image and augmentation."""
        codes = torch.from_numpy(self.codes[index, aug].astype(np.int64))
        feats = None
        if self.features is not None:
            feats = torch.from_numpy(np.array(self.features[index, aug], copy=True)).view(torch.bfloat16)
        return codes, int(self.labels[index]), feats
