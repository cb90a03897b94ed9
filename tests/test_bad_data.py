"""Bad data in a code store is refused with the file, the field and the first bad index named: when the store
is validated (codes, labels, dtypes, unreadable files: before any work), or per batch on the host before it is
copied (NaN / Inf features; all of them at once with `mirai train --check`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mirai.config import ConfigError, validate
from mirai.data.format import CodeStore, CodeStoreError
from mirai.data.loader import epoch_order
from mirai.data.synthetic import write_synthetic_store

from conftest import DEBUG_YAML, STORE, debug_overrides

MIRAI_I = ["foresight.mode=encoder", "foresight.use_precomputed_features=true",
           "foresight.head_out=32"]


@pytest.fixture
def store(tmp_path) -> Path:
    """A fresh copy of the tests' synthetic store (64 images, 2 augmentations, 16 tokens, vocab 64, 10 classes)."""
    return write_synthetic_store(tmp_path / "store", seed=0, **STORE)


def _edit(path: Path, fn) -> None:
    arr = np.load(path, mmap_mode="r+")
    fn(arr)
    arr.flush()
    del arr


def _main(store: Path, out: Path, *extra: str) -> int:
    from mirai.commands.train import main
    return main(["--config", str(DEBUG_YAML), "--set", *debug_overrides(store, out), *extra])


def _refused(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return str(info.value)


def test_token_id_at_or_above_the_vocabulary(store, debug_cfg):
    _edit(store / "codes.npy", lambda a: a.__setitem__((37, 1, 5), 64))
    msg = _refused(debug_cfg(f"data.codes={store}"))
    assert msg.startswith(f"data.codes: {store / 'codes.npy'}: codes: token id 64 at index [37, 1, 5]"), msg


@pytest.mark.parametrize("label", [10, -1])
def test_label_outside_the_classes(store, debug_cfg, label):
    """10 = num_classes is the CFG null class: it would train silently as "no class"."""
    _edit(store / "labels.npy", lambda a: a.__setitem__(12, label))
    msg = _refused(debug_cfg(f"data.codes={store}"))
    assert msg.startswith(f"data.codes: {store / 'labels.npy'}: labels: label {label} at index 12 is outside [0, 10)")


def test_float_labels(store, debug_cfg):
    labels = np.load(store / "labels.npy").astype(np.float64)
    labels[3] = 2.7                                                  # would be truncated to 2
    np.save(store / "labels.npy", labels)
    msg = _refused(debug_cfg(f"data.codes={store}"))
    assert str(store / "labels.npy") in msg and "dtype float64, expected integers" in msg


def test_empty_codes_file(store, debug_cfg, tmp_path, capsys):
    (store / "codes.npy").write_bytes(b"")
    with pytest.raises(CodeStoreError, match="codes.npy: unreadable, not a .npy array"):
        CodeStore(store)
    assert _refused(debug_cfg(f"data.codes={store}")).startswith(f"data.codes: {store / 'codes.npy'}: unreadable")
    assert _main(store, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "codes.npy: unreadable" in err and "Traceback" not in err


def _first_step_image(store: Path) -> int:
    """An image of the first micro-batch of step 1 (seed 0, debug config: rank 0 reads slots 0..3 first)."""
    perm, _ = epoch_order(64, 2, seed=0, epoch=0)
    return int(perm[2])


@pytest.mark.parametrize("value, workers", [(float("nan"), 0), (float("inf"), 2)])
def test_non_finite_features_are_refused_before_the_step(store, tmp_path, capsys, value, workers):
    image = _first_step_image(store)
    bits = torch.tensor([value], dtype=torch.bfloat16).view(torch.uint16).item()
    _edit(store / "features.npy", lambda a: a.__setitem__((image, slice(None), 3, 7), bits))
    out = tmp_path / "run"
    assert _main(store, out, *MIRAI_I, f"data.num_workers={workers}") == 2
    err = capsys.readouterr().err
    assert f"{store / 'features.npy'}: features: non-finite value {value} at index [{image}, " in err
    assert ", 3, 7] (image, augmentation, patch, channel)" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()   # no step ran
    assert not (out / "checkpoints").exists()
    # `mirai train --check` scans every stored feature, without training
    from mirai.commands.train import main
    rc = main(["--config", str(DEBUG_YAML), "--check", "--set", *debug_overrides(store, out), *MIRAI_I])
    assert rc == 2 and f"non-finite value {value} at index [{image}, 0, 3, 7]" in capsys.readouterr().err


def test_feature_scan_helpers_find_the_first_bad_entry():
    from mirai.data.format import check_features, first_nonfinite_bf16
    bits = torch.zeros(3, 4, 5, dtype=torch.bfloat16)
    bits[1, 2, 3] = float("-inf")
    bits[2, 0, 0] = float("nan")
    raw = bits.view(torch.uint16).numpy()
    assert first_nonfinite_bf16(raw) == (1, 2, 3)
    assert first_nonfinite_bf16(raw[2:, 1:]) is None
    with pytest.raises(CodeStoreError, match=r"x.npy: features: non-finite value -inf at index \[8, 1, 2, 3\]"):
        check_features(raw, np.array([7, 8, 9]), np.array([0, 1, 0]), "x.npy")
