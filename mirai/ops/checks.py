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


def table_range_error(table: torch.Tensor, s: int) -> str | None:
    """The foresight ops' table contract, values in [-1, S) (S = teacher.size(1), -1 = no target): None when
    ``table`` keeps it, else the message (the words of the extension's ``TORCH_CHECK`` in csrc/foresight).
    One reduction; on a GPU it syncs the host, so callers check a table once, not every step."""
    if table.numel() == 0:
        return None
    lo, hi = (int(v) for v in torch.aminmax(table))
    if lo >= -1 and hi < s:
        return None
    return (f"table values must lie in [-1, S) = [-1, {s}) (S = teacher.size(1); -1 means no target), "
            f"got values in [{lo}, {hi}]")
