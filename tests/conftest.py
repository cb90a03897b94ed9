"""Shared fixtures: a tiny synthetic code store and the debug config pointed at it.

``code_store``  session-wide store written with ``mirai.data.format.write_code_store`` (through
                ``mirai.data.synthetic``): 64 images, 2 augmentations, 4x4 tokens, 64 codes,
                10 classes, 32-channel bf16 "encoder features".
``debug_cfg``   a function ``debug_cfg(*overrides, out=None) -> Config``: configs/debug.yaml with the
                store, a fresh out_dir under tmp_path, no progress bar / TensorBoard, then the overrides.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEBUG_YAML = REPO / "configs" / "debug.yaml"
STORE = dict(num_images=64, grid_size=4, vocab_size=64, num_classes=10, num_aug=2, features_dim=32)


@pytest.fixture(scope="session")
def code_store(tmp_path_factory) -> Path:
    from mirai.data.synthetic import write_synthetic_store
    return write_synthetic_store(tmp_path_factory.mktemp("codes") / "store", seed=0, **STORE)


def debug_overrides(store: Path, out: Path) -> list[str]:
    return [f"data.codes={store}", f"out_dir={out}", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture
def debug_cfg(code_store, tmp_path):
    from mirai.config import load_config

    def make(*overrides: str, out: Path | str | None = None):
        out = Path(out) if out is not None else tmp_path / "run"
        return load_config(DEBUG_YAML, debug_overrides(code_store, out) + list(overrides))
    return make


@pytest.fixture(params=["ext", "fallback"])
def ext_or_fallback(request, monkeypatch) -> str:
    """Run a test once through mirai._C and once through the PyTorch fallback (the extension hidden), with
    the fallback's one-time warning silenced; skips the "ext" run when the extension is not built."""
    import warnings

    from mirai import _ext
    if request.param == "ext" and not _ext.available():
        pytest.skip("mirai._C not built")
    if request.param == "fallback":
        monkeypatch.setattr(_ext, "_C", None)
    warnings.simplefilter("ignore", RuntimeWarning)
    return request.param
