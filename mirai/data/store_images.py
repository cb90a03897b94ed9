"""Image crops of code-store samples, re-created from the original files (Mirai-I with an online encoder).

A code store (``mirai.data.format``) holds codes, not pixels. ``mirai prepare`` made row i's A codes
from the augmentations ``mirai.data.images.code_crops`` returns for image ``files.txt[i]``; with
``data.images`` set the trainer re-creates, for each (row, augmentation index) of a micro-batch, exactly
that crop from the image file and hands it to the frozen encoder:

* ten-crop stores (``meta["ten_crop"]``, A = 10): ADM centre crop of the image to
  ``int(image_size * crop_range)``, then crop ``aug`` of torchvision's FiveCrop order (top-left,
  top-right, bottom-left, bottom-right, centre) for aug 0..4, and the same five crops of the mirrored
  ADM crop for aug 5..9;
* centre-crop stores (A = 2): ADM centre crop to ``image_size``; aug 1 is its mirror.

``crop_variant`` returns the crop as uint8 ``[S, S, 3]``; converting it as prepare does (``/255``, then
``(x - 0.5) / 0.5``) gives ``code_crops(...)[aug]`` bit for bit (tested), so the encoder sees the pixels
the codes were made from. ``StoreImages`` resolves the files of a store (paths in ``files.txt`` are
relative to the image folder, absolute ones are used as is), checks the settings, and loads a
micro-batch as uint8 ``[B, 3, S, S]`` (one image file opened per sample: this is the one per-sample file
read of the loader, done in its worker processes).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mirai.data.images import five_crop, center_crop_arr, num_augs, read_rgb


class ImageSourceError(ValueError):
    """``data.images`` does not fit the code store (the message names the field, folder or file)."""


def crop_variant(image: Image.Image, image_size: int, aug: int, ten_crop: bool = True,
                 crop_range: float = 1.1) -> np.ndarray:
    """Augmentation ``aug`` of ``mirai.data.images.code_crops(image, ...)`` as uint8 ``[S, S, 3]``."""
    count = num_augs(ten_crop)
    if not 0 <= aug < count:
        raise ValueError(f"augmentation index {aug} out of range 0..{count - 1} "
                         f"({'ten-crop' if ten_crop else 'centre crop + flip'})")
    if ten_crop:
        big = center_crop_arr(image, int(image_size * crop_range))
        if aug >= 5:                                               # the mirrored image's five crops
            big = big.transpose(Image.FLIP_LEFT_RIGHT)
        crop = five_crop(big, image_size)[aug % 5]
        return np.array(crop, dtype=np.uint8, copy=True)           # [S, S, 3]
    arr = np.array(center_crop_arr(image, image_size), dtype=np.uint8, copy=True)   # [S, S, 3]
    return np.ascontiguousarray(arr[:, ::-1]) if aug == 1 else arr


class StoreImages:
    """The original images of a code store's rows (see the module docstring).

    Args:
        folder: the image folder given to ``mirai prepare --images`` (``data.images``).
        store: an open ``mirai.data.format.CodeStore`` made from it.
    """

    def __init__(self, folder: str | os.PathLike, store) -> None:
        self.folder = Path(folder)
        meta = store.meta
        where = f"{Path(store.root) / 'meta.json'}"
        if not self.folder.is_dir():
            raise ImageSourceError(f"data.images: folder {self.folder} does not exist")
        if "ten_crop" not in meta or "image_size" not in meta:
            raise ImageSourceError(f"data.images: the store's {where} records no crop settings (ten_crop, "
                                   "image_size); only stores written by `mirai prepare` can be paired with images")
        self.ten_crop = bool(meta["ten_crop"])
        self.crop_range = float(meta.get("crop_range", 1.1))
        self.image_size = int(meta["image_size"])
        if num_augs(self.ten_crop) != store.num_aug:
            raise ImageSourceError(f"data.images: {where} says ten_crop={self.ten_crop} ({num_augs(self.ten_crop)} "
                                   f"augmentations) but the store holds {store.num_aug}")
        index = Path(store.root) / "files.txt"
        if not index.is_file():
            raise ImageSourceError(f"data.images: {index} is missing (the store's row -> image file index)")
        self.files = [line for line in index.read_text().splitlines() if line.strip()]
        if len(self.files) != len(store):
            raise ImageSourceError(f"data.images: {index} lists {len(self.files)} files for {len(store)} rows")

    def path(self, row: int) -> Path:
        """Image file of store row ``row`` (relative entries resolved against the folder)."""
        return self.folder / self.files[row]                       # an absolute entry replaces the folder

    def check(self) -> None:
        """The first and last rows' files exist (a wrong folder fails here, before training)."""
        for row in {0, len(self.files) - 1}:
            p = self.path(row)
            if not p.is_file():
                raise ImageSourceError(f"data.images: {p} (row {row} of files.txt) does not exist; is "
                                       f"{self.folder} the folder the store was prepared from?")

    def load(self, rows: np.ndarray, augs: np.ndarray) -> torch.Tensor:
        """uint8 ``[B, 3, S, S]``: the crop of each (row, augmentation) pair."""
        crops = [crop_variant(read_rgb(self.path(int(r))), self.image_size, int(a), self.ten_crop, self.crop_range)
                 for r, a in zip(rows, augs)]                      # B x [S, S, 3]
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()   # [B, 3, S, S]
