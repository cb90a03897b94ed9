"""Helpers of the checkpoint tests: corrupt a file, plant a payload, re-record a file in meta.json, a tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import torch


class Payload:
    """Unpickling this creates ``marker`` (what an attacker's file would do with a shell command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> Path:
    """Write a checkpoint-looking file with the payload inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.zeros(2)}, "ema": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)
    return path


def rehash(ckpt: Path, rel: str) -> Path:
    """Make meta.json record the current size and hash of ``ckpt / rel`` (a file replaced on purpose passes
    every integrity check, so what follows must catch it)."""
    from mirai.io.torch_files import file_digest
    path = ckpt / rel
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][rel] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return path


def flip(path: Path, n: int = 16, at: float = 0.5) -> None:
    """Invert ``n`` bytes at fraction ``at`` of the file (a silent corruption: same size)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def tokenizer_file(folder: Path) -> Path:
    """A random 64-code tokenizer of 16x16 patches (fits GPT-debug's vocabulary and 4x4 grid at 64 px)."""
    from mirai.models.vq import PatchKMeansTokenizer
    tok = PatchKMeansTokenizer(torch.rand(64, 3 * 16 * 16) * 2 - 1, patch=16, channels=3)
    return tok.save(Path(folder) / "tok.pt")
