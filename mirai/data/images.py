"""Images in and out: reading, the crops codes are made from, and uint8 conversion / grids of model output.

- ``center_crop_arr``: ADM's centre crop (box-halve while the short side >= 2x the target, then
  bicubic resize of the short side to the target, then centre crop) as LlamaGen uses it.
- ``code_crops``: the augmentations LlamaGen's extract_codes_c2i.py encodes per image: ADM centre
  crop to ``crop_range * size`` then TenCrop (4 corners + centre, then the same 5 of the mirrored
  image: 10 augs), or, without ten-crop, ADM centre crop to ``size`` and its mirror (2 augs).
  Returned as float [A, 3, size, size] in [-1, 1]. ``five_crop`` is torchvision's FiveCrop.
- ``to_uint8``: model output [B, 3, H, W] (about [-1, 1]) -> uint8 [B, H, W, 3], LlamaGen's rounding
  (clamp(127.5 x + 128)), optional bicubic resize first (``mirai sample --image-size-eval``).
- ``save_grid`` / ``make_grid``: a grid PNG of uint8 [N, H, W, 3] images.
- ``read_rgb``: open an image file as RGB (raises ``UnreadableImage`` naming the file).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnreadableImage(OSError):
    """An image file that PIL cannot decode (the message names the file)."""


def read_rgb(path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")   # convert() forces the full decode inside the try
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds; all mean "unreadable"
        raise UnreadableImage(f"{path}: unreadable image ({type(err).__name__}: {err})") from err


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop of a PIL image to ``image_size`` x ``image_size``."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    y0 = (arr.shape[0] - image_size) // 2
    x0 = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[y0:y0 + image_size, x0:x0 + image_size])


def _to_unit(pil_image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    arr = torch.from_numpy(np.array(pil_image, dtype=np.uint8, copy=True))   # [H, W, 3]
    return arr.permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)


def five_crop(img: Image.Image, size: int) -> list[Image.Image]:
    """torchvision's FiveCrop order: top-left, top-right, bottom-left, bottom-right, centre."""
    w, h = img.size
    if size > w or size > h:
        raise ValueError(f"crop {size} larger than image {w}x{h}")
    cy, cx = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    boxes = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size), (cx, cy)]
    return [img.crop((x, y, x + size, y + size)) for x, y in boxes]


def num_augs(ten_crop: bool) -> int:
    return 10 if ten_crop else 2


def code_crops(pil_image: Image.Image, image_size: int, ten_crop: bool = True,
               crop_range: float = 1.1) -> torch.Tensor:
    """The augmented crops LlamaGen encodes for one image: float [A, 3, size, size] in [-1, 1]."""
    if ten_crop:
        big = center_crop_arr(pil_image, int(image_size * crop_range))
        crops = five_crop(big, image_size) + five_crop(big.transpose(Image.FLIP_LEFT_RIGHT), image_size)
        return torch.stack([_to_unit(c) for c in crops])
    x = _to_unit(center_crop_arr(pil_image, image_size))
    return torch.stack([x, x.flip(-1)])


def to_uint8(images: torch.Tensor, size: int | None = None) -> np.ndarray:
    """[B, 3, H, W] in about [-1, 1] -> uint8 [B, H', W', 3]; bicubic resize to ``size`` first if given."""
    x = images.float()
    if size is not None and (x.shape[-2], x.shape[-1]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic")
    x = torch.clamp(127.5 * x + 128.0, 0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, 3] mosaic."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.shape}")
    n, h, w, _ = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), fill, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, pad: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow, pad)).save(path)
    return path
