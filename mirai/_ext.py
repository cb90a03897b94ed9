"""Loader of the compiled extension ``mirai._C``.

``ext()`` returns the module or ``None``. When the extension is missing (not
built, or ``MIRAI_DISABLE_EXT=1``) every op falls back to its PyTorch reference;
``warn_fallback`` says so once per op and reason. ``self_checked`` runs and remembers
each op's one-time check of its CUDA kernels on a device.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch  # noqa: F401  (loads libc10 / libtorch before the extension)

_C: ModuleType | None = None
_LOAD_ERROR: str | None = None

if os.environ.get("MIRAI_DISABLE_EXT", "0") == "1":
    _LOAD_ERROR = "disabled by MIRAI_DISABLE_EXT=1"
else:
    try:
        from mirai import _C  # type: ignore[attr-defined, no-redef]
    except ImportError as err:  # not built, or built against another torch
        _LOAD_ERROR = f"{type(err).__name__}: {err}"

_WARNED: set[tuple[str, str]] = set()
_SELF_CHECKS: dict[tuple[str, str], str] = {}


def ext() -> ModuleType | None:
    """The compiled module, or None when it is unavailable."""
    return _C


def available() -> bool:
    return _C is not None


def has_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.has_cuda())


def has_op(name: str) -> bool:
    return _C is not None and hasattr(_C, name)


def op_unavailable(C: ModuleType | None, op: str, device_type: str | None) -> str | None:
    """Why the extension module `C` (``ext()``, or a stand-in) cannot run `op` on a device of this type,
    or None when it can; ``device_type`` None (an empty call) only checks that the op exists."""
    if C is None:
        return f"extension unavailable ({load_error()})"
    if not hasattr(C, op):
        return f"extension has no {op} (stale build?)"
    if device_type is None or device_type == "cpu":
        return None
    if device_type == "cuda":
        return None if has_cuda() else "extension built without CUDA kernels"
    return f"no kernel for device type {device_type!r}"


def load_error() -> str | None:
    return _LOAD_ERROR


def describe() -> str:
    if _C is None:
        return f"unavailable ({_LOAD_ERROR})"
    ops = sorted(n for n in dir(_C) if not n.startswith("_") and n != "has_cuda")
    return f"loaded from {_C.__file__}; cuda={'yes' if has_cuda() else 'no'}; ops={ops}"


def warn_fallback(op: str, reason: str) -> None:
    """Warn once per (op, reason) that `op` runs its slower fallback."""
    key = (op, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"mirai: {op} falls back: {reason}", RuntimeWarning, stacklevel=3)


def self_checked(op: str, device: str, check: Callable[[], str]) -> str:
    """Why `op`'s CUDA kernels must not run on `device`, or "" when they may: ``check()`` (the op's
    comparison against its PyTorch formulation), run the first time and remembered per (op, device),
    so a kernel that computes wrong numbers on some GPU is never used there. A check that raises (for
    example "no kernel image is available" on a GPU the extension was not built for) is a failed check:
    its error becomes the reason. While the check runs the answer is "", so the check may call the op
    it checks."""
    key = (op, device)
    if key not in _SELF_CHECKS:
        _SELF_CHECKS[key] = ""
        try:
            _SELF_CHECKS[key] = check()
        except Exception as err:  # noqa: BLE001 - the kernel is not used; the reason says why
            _SELF_CHECKS[key] = f"its self-check on {device} raised {type(err).__name__}: {str(err).strip()[:300]}"
        except BaseException:     # KeyboardInterrupt, SystemExit: not a verdict on the kernel
            del _SELF_CHECKS[key]
            raise
    return _SELF_CHECKS[key]


def report() -> dict[str, object]:
    """What ran in this process: each CUDA self-check's outcome ("ok" or why the kernel is not used) by
    "op@device", and every fallback warned so far as "op: reason" (benchmarks record it beside their numbers)."""
    return {"self_checks": {f"{op}@{dev}": (why or "ok") for (op, dev), why in sorted(_SELF_CHECKS.items())},
            "fallbacks": sorted(f"{op}: {why}" for op, why in _WARNED)}
