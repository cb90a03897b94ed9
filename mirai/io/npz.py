"""Image batches as .npz files, streamed: the format the ADM evaluation suite reads and ``mirai sample`` writes.

An image batch holds ``arr_0``: uint8 [N, H, W, 3] (C order) and optionally small arrays beside it (labels,
settings, the reference statistics ``mu`` / ``sigma``). A 50k x 256 x 256 x 3 batch is about 10 GB, so it is
never loaded whole:

    npz_keys(path)                         the arrays a file holds
    npz_image_shape(path, key="arr_0")     (N, H, W, 3), checked
    iter_npz_images(path, batch_size)      uint8 [b, H, W, 3] chunks, read from the zip member as a stream
    write_npz_streaming(path, chunks, shape, extra)   arr_0 written chunk by chunk, plus small arrays

A missing or malformed file raises ``NpzError`` naming the file.
"""
from __future__ import annotations

import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


class NpzError(ValueError):
    """An image batch .npz is missing or malformed (names the file)."""


def npz_keys(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise NpzError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as err:
        raise NpzError(f"{path}: not an .npz file ({err})") from err


@contextmanager
def _open_member(path: Path, key: str):
    with zipfile.ZipFile(path) as z:
        name = f"{key}.npy"
        if name not in z.namelist():
            raise NpzError(f"{path}: no array {key!r} (has {npz_keys(path)})")
        with z.open(name) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise NpzError(f"{path}: {key} uses .npy format {version}, expected 1.0 or 2.0")
            yield f, shape, fortran, dtype


def npz_image_shape(path: Path, key: str = "arr_0") -> tuple[int, ...]:
    with _open_member(path, key) as (_, shape, fortran, dtype):
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8 or fortran:
            raise NpzError(f"{path}: {key} must be uint8 [N, H, W, 3] (C order), got {dtype} {shape}")
        return tuple(shape)


def iter_npz_images(path: str | Path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Stream uint8 [b, H, W, 3] batches of ``key`` without loading the whole array."""
    path = Path(path)
    n, h, w, c = npz_image_shape(path, key)
    per = h * w * c
    with _open_member(path, key) as (f, *_):
        for lo in range(0, n, batch_size):
            b = min(batch_size, n - lo)
            buf = f.read(b * per)
            if len(buf) != b * per:
                raise NpzError(f"{path}: {key} is truncated (image {lo + len(buf) // per} of {n})")
            yield np.frombuffer(bytearray(buf), dtype=np.uint8).reshape(b, h, w, c)   # writable


def write_npz_streaming(path: Path, images_iter, shape: tuple[int, ...], extra: dict[str, np.ndarray]) -> Path:
    """Write ``arr_0`` (uint8 ``shape``) chunk by chunk plus small ``extra`` arrays into an .npz."""
    tmp = path.with_suffix(".npz.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": tuple(shape)}
            np.lib.format.write_array_header_1_0(f, header)
            written = 0
            for chunk in images_iter:
                f.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
                written += len(chunk)
            if written != shape[0]:
                raise RuntimeError(f"{path}: wrote {written} images, expected {shape[0]}")
        for key, arr in extra.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
    tmp.replace(path)
    return path
