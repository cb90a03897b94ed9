"""Mirai: autoregressive image generation with foresight alignment.

LlamaGen-style class-conditional AR transformers trained with an extra
cosine-alignment loss between projected intermediate hidden states and
"foresight" targets at nearby future positions of the 2D token grid.
"""
from mirai import _ext

__version__ = "0.1.0"
__all__ = ["_ext", "__version__"]
