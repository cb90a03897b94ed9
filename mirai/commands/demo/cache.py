"""Fitted pieces of the demo (tokenizer, encoder, classifier) are reused while their inputs are unchanged.

Each piece is saved as ``NAME.pt`` with a sidecar ``NAME.json`` holding the *key* it was fitted for (a
digest of its training data and settings) and a few facts about it. ``load_current`` returns the saved
piece only when the sidecar's key equals the requested one; the sidecar is written after the piece, so
a crash between the two leaves a piece that is simply fitted again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def load_current(path: Path, key: str, load: Callable[[Path], Any]) -> tuple[Any, dict] | None:
    """(piece, facts) when ``path`` holds the piece fitted for ``key``; None otherwise (or if unreadable: a
    truncated file is fitted again). A file the weights-only loader refuses (it names types that would run
    code) raises ``UnsafeFileError`` naming it: it is never loaded, and never silently overwritten."""
    from mirai.io.torch_files import UnsafeFileError
    path = Path(path)
    try:
        info = json.loads(sidecar(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("key") != key or not path.is_file():
        return None
    try:
        return load(path), info.get("facts", {})
    except UnsafeFileError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError):
        return None


def mark_current(path: Path, key: str, facts: dict[str, Any]) -> None:
    """Record that ``path`` (already saved) is the piece fitted for ``key``."""
    tmp = sidecar(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"key": key, "facts": facts}, indent=2))
    os.replace(tmp, sidecar(path))
