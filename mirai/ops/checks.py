"""Input checks shared by the ops' Python fallbacks (the same constraints and wording as the extension's
``TORCH_CHECK``s, so either path names the offending list, index and rule)."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def check_entry(op: str, name: str, i: int, t: torch.Tensor, dtypes: tuple[torch.dtype, ...],
                refs: Sequence[torch.Tensor], ref_name: str) -> None:
    """``{name}[i]`` (the tensor ``t``) must have one of ``dtypes``, sit on ``refs[0]``'s device, have
    ``refs[i]``'s shape and be contiguous; TypeError / ValueError otherwise, prefixed with ``op``."""
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name}[{i}] must be {allowed}, got {t.dtype}")
    device = refs[0].device
    if t.device != device:
        raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {ref_name}[0] is on {device}; "
                         "all tensors must be on one device")
    if t.shape != refs[i].shape:
        raise ValueError(f"{op}: {name}[{i}] has shape {list(t.shape)} but {ref_name}[{i}] has shape "
                         f"{list(refs[i].shape)}; shapes must match per index")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name}[{i}] must be contiguous")
