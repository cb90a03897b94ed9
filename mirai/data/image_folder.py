"""An ImageNet-style image folder (``ROOT/<class>/<image>``): its classes, files and labels, in a fixed order.

``scan_image_folder(root, limit_per_class=None) -> ImageFolderScan``: class folders sorted by name give the
labels 0..C-1; the image files of each class (recursively, by extension, ``IMG_EXTENSIONS``) sorted, in that
order, are the rows of the code store ``mirai prepare`` writes. Non-image files are listed in ``ignored``,
classes without images in ``empty_classes`` (their label is kept). An empty or class-less folder is refused
with ``PrepareError`` naming it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mirai.data.images import IMG_EXTENSIONS


class PrepareError(ValueError):
    """Refused input of ``mirai prepare`` (names the folder or file)."""


@dataclass
class ImageFolderScan:
    root: Path
    classes: list[str]                      # sorted class folder names; label = index
    files: list[str]                        # image paths relative to root, in row order
    labels: list[int]                       # label of each file
    ignored: list[str] = field(default_factory=list)       # non-image files (by extension)
    empty_classes: list[str] = field(default_factory=list)  # class folders without images


def scan_image_folder(root: str | os.PathLike, limit_per_class: int | None = None) -> ImageFolderScan:
    """Class folders (sorted) -> sorted image files of each; refuses empty / class-less folders."""
    root = Path(root)
    if not root.is_dir():
        raise PrepareError(f"{root}: no such image folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise PrepareError(f"{root}: no class folders (expected ImageNet layout ROOT/<class>/<image>)")
    scan = ImageFolderScan(root, classes, [], [])
    for label, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                (found if name.lower().endswith(IMG_EXTENSIONS) else scan.ignored).append(rel)
        found.sort()
        if limit_per_class is not None:
            found = found[:limit_per_class]
        if not found:
            scan.empty_classes.append(cls)
        scan.files += found
        scan.labels += [label] * len(found)
    if not scan.files:
        raise PrepareError(f"{root}: {len(classes)} class folders but no images "
                           f"(extensions {', '.join(IMG_EXTENSIONS)})")
    return scan
