"""Mirai: autoregressive image generation with foresight alignment.

LlamaGen-style class-conditional AR transformers trained with an extra
cosine-alignment loss between projected intermediate hidden states and
"foresight" targets at nearby future positions of the 2D token grid.

``mirai._ext`` (the loader of the compiled extension, which imports torch) is loaded on first use, so
``import mirai`` and ``mirai --help`` stay light. The layout: docs/architecture.md.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["_ext", "__version__"]


def __getattr__(name: str):
    if name == "_ext":
        return importlib.import_module("mirai._ext")
    raise AttributeError(f"module 'mirai' has no attribute {name!r}")
