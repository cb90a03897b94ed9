"""The embedded demo (mirai.demo): its pieces, one tiny end-to-end run, and that a re-run reuses it.

The end-to-end run uses tiny settings (32 codes, a 3-layer width-32 GPT, 4 steps per run, 2 samples per
class) so the whole pipeline - digits, tokenizer, code stores, both `python -m mirai.train` runs under
DeepSpeed on CPU, held-out loss, sampling, classifier, t-SNE, report - runs in well under a minute.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mirai import demo

TINY_SETS = ["model.dim=32", "model.n_layer=3", "model.n_head=2", "foresight.head_hidden=32",
             "foresight.warmup_epochs=0", "train.log_every=2"]


def tiny_options(out: Path, **kw) -> demo.DemoOptions:
    base = dict(out=out, steps=4, device="cpu", overrides=list(TINY_SETS), codebook_size=32, kmeans_iters=2,
                kmeans_patches=4000, samples_per_class=2, tsne_images=1, progress=False)
    base.update(kw)
    return demo.DemoOptions(**base)


# ------------------------------------------------------------------------------------------ pieces
def test_digits_split_is_stratified_and_scaled():
    d = demo.load_digits_32(0.2, seed=0)
    assert d.train_x.shape == (1437, 1, 32, 32) and d.held_x.shape == (360, 1, 32, 32)
    assert float(d.train_x.min()) >= -1.0 and float(d.train_x.max()) <= 1.0
    assert float(d.train_x.min()) == -1.0 and float(d.train_x.max()) > 0.9     # background and ink both present
    counts = np.bincount(d.held_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37                           # ~36 per class: stratified
    again = demo.load_digits_32(0.2, seed=0)
    assert torch.equal(d.held_x, again.held_x)                                 # fixed seed -> same split


def test_pool8_matches_for_tensors_and_uint8_images():
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    as_uint8 = torch.clamp(127.5 * x.expand(-1, 3, -1, -1) + 128.0, 0, 255).to(torch.uint8)
    a = demo.pool8(x)
    b = demo.pool8(as_uint8.permute(0, 2, 3, 1).numpy())
    assert a.shape == (3, 64)
    np.testing.assert_allclose(a, b, atol=0.02)


def test_class_rows_puts_each_class_on_its_own_row():
    images = np.zeros((20, 4, 4, 3), np.uint8)
    labels = np.repeat(np.arange(10), 2)
    images[:, :, :, 0] = (labels * 20)[:, None, None]
    grid = demo.class_rows(images, labels, per_class=2)
    assert grid.shape == (10 * 6 + 2, 2 * 6 + 2, 3)
    for c in range(10):
        assert grid[2 + 6 * c, 2, 0] == c * 20


def test_consistency_counts_matches_per_class():
    labels = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    c = demo.consistency(pred, labels)
    assert c["overall"] == 0.75
    assert c["per_class"][:2] == [0.5, 1.0] and c["per_class"][2] is None


def test_bad_options_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        demo.check_options(tiny_options(tmp_path, steps=0))
    with pytest.raises(ValueError, match="--kmeans-patches"):
        demo.check_options(tiny_options(tmp_path, kmeans_patches=10))
    assert demo.main(["--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = demo.run_demo(tiny_options(out))
    return out, report


def test_demo_writes_report_figures_and_numbers(tiny_demo):
    out, report = tiny_demo
    for name in ("loss_curves.png", "samples.png", "tsne.png", "tokenizer.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 50, name
    text = (out / "report.md").read_text()
    for section in ("## Setup", "## Timings", "## Training loss", "## Samples", "## Class consistency",
                    "## t-SNE of layer-l token features", "(loss_curves.png)", "(samples.png)", "(tsne.png)"):
        assert section in text, section
    assert "python -m mirai.train --config" in text and "foresight.head_hidden=32" in text
    assert json.loads((out / "report.json").read_text()) == report
    runs = report["runs"]
    for key in ("baseline", "mirai_e"):
        ev = runs[key]["eval"]
        assert 0.0 < ev["heldout_ntp_ema"] < 2 * np.log(32)
        assert 0.0 <= ev["consistency"]["overall"] <= 1.0
        assert len(ev["consistency"]["per_class"]) == 10
        # the table row carries the measured numbers
        assert any(line.startswith(f"| {runs[key]['title']} |") and f"| {ev['heldout_ntp_ema']:.4f} |" in line
                   for line in text.splitlines())
        assert f"**{ev['consistency']['overall']:.3f}**" in text
        tr = runs[key]["training"]
        assert not tr["reused"] and tr["seconds"] > 0 and tr["cpu_seconds"] > 0
        metrics = demo.read_metrics(out / key)
        assert [r["step"] for r in metrics] == [2, 4]
    assert report["classifier"]["heldout_acc"] > 0.9                    # the classifier itself works
    assert report["foresight"]["k"] == 3 and report["tsne"]["layer"] == 2   # round(2/3 * 3) = 2
    assert demo.read_metrics(out / "mirai_e")[-1]["head_loss"]          # Mirai-E logged its 3 heads
    assert re.search(r"\| tokenizer \| [0-9.]+ \|", text)


def test_rerun_reuses_tokenizer_stores_and_runs(tiny_demo):
    out, first = tiny_demo
    watched = [out / "tokenizer.pt", out / "data" / "train" / "meta.json", out / "data" / "heldout" / "meta.json"]
    watched += [p for key in ("baseline", "mirai_e") for p in (out / key / "checkpoints").glob("step_*/meta.json")]
    assert len(watched) == 5
    before = {p: p.stat().st_mtime_ns for p in watched}
    report = demo.run_demo(tiny_options(out))
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert report["tokenizer"]["reused"]
    for key in ("baseline", "mirai_e"):
        assert report["runs"][key]["training"]["reused"]
        # the reused run's training time is the one measured when it trained
        assert report["runs"][key]["training"]["seconds"] == first["runs"][key]["training"]["seconds"]
        # same weights, same held-out data -> same held-out loss
        assert report["runs"][key]["eval"]["heldout_ntp_ema"] == pytest.approx(
            first["runs"][key]["eval"]["heldout_ntp_ema"], abs=1e-6)
    assert "(reused; measured when it trained)" in (out / "report.md").read_text()


def test_changed_settings_mark_runs_stale_not_finished(tiny_demo):
    out, _ = tiny_demo
    same = demo.make_specs(tiny_options(out), "cpu")
    assert [demo.run_state(s)[0] for s in same] == ["finished", "finished"]
    longer = demo.make_specs(tiny_options(out, steps=6), "cpu")
    states = [demo.run_state(s) for s in longer]
    assert [s for s, _ in states] == ["stale", "stale"]
    assert all("train.max_steps" in why for _, why in states)
    other_dir = demo.make_specs(tiny_options(out / "elsewhere"), "cpu")
    assert [demo.run_state(s)[0] for s in other_dir] == ["new", "new"]
