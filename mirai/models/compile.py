"""Where ``torch.compile`` applies to a model: the one rule the trained model and the Mirai-E teacher share."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn


def compile_in_scope(module: nn.Module, blocks: Sequence[nn.Module], scope: str) -> None:
    """``torch.compile`` in place at a resolved ``train.compile_scope``: "model" compiles `module` as one graph
    (state-dict keys keep their names), "blocks" each of `blocks` (the transformer blocks inside it) alone."""
    if scope == "model":
        module.compile(dynamic=False)
    elif scope == "blocks":
        for block in blocks:
            block.compile()
    else:
        raise ValueError(f"compile scope must be 'model' or 'blocks', got {scope!r}")
