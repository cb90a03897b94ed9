"""mirai prepare: image folders -> code store (crops as LlamaGen, bad inputs, resume, features)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mirai.data.format import CodeStore
from mirai.data.images import center_crop_arr, code_crops
from mirai.models.vq import PatchKMeansTokenizer, build_vq, load_vq
from mirai.commands.prepare import main
from mirai.data.image_folder import PrepareError, scan_image_folder
from mirai.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


def _image_folder(root: Path, corrupt: bool = True) -> Path:
    """3 classes (sorted: ant, bee, cat), 2-3 images each of odd sizes, a corrupt file, a stray .txt."""
    rng = np.random.default_rng(0)
    sizes = {"bee": [(50, 41), (64, 70)], "ant": [(40, 55), (33, 33), (80, 36)], "cat": [(45, 60), (70, 70)]}
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"img{i}.png")
    if corrupt:
        (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture()
def vq_ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "vq_debug.pt"
    torch.save({"model": build_vq("VQ-debug").state_dict()}, path)
    return path


def test_scan_sorts_classes_and_refuses_empty_folders(tmp_path):
    scan = scan_image_folder(_image_folder(tmp_path / "imgs"))
    assert scan.classes == ["ant", "bee", "cat"]
    assert scan.labels == [0, 0, 0, 1, 1, 1, 2, 2]
    assert scan.files[3] == os.path.join("bee", "broken.jpg")
    assert scan.ignored == [os.path.join("cat", "notes.txt")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="empty.*no class folders"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(PrepareError, match="noimg.*no images"):
        scan_image_folder(tmp_path / "noimg")
    assert scan_image_folder(tmp_path / "imgs", limit_per_class=1).labels == [0, 1, 2]


def test_prepare_ten_crop_matches_llamagen_crops_and_skips_corrupt(tmp_path, vq_ckpt, capsys):
    imgs = _image_folder(tmp_path / "imgs")
    out = tmp_path / "store"
    rc = main(["--images", str(imgs), "--out", str(out), "--vq", str(vq_ckpt), "--vq-model", "VQ-debug",
               "--image-size", "48", "--num-workers", "0", "--batch-size", "3", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr()
    assert "broken.jpg" in err.err and "broken.jpg" in err.out          # reported, and in the summary
    store = CodeStore(out)
    assert len(store) == 7 and store.num_aug == 10 and store.grid_size == 3   # 48 px / 16: grid is not 16
    assert store.meta["classes"] == ["ant", "bee", "cat"]
    assert store.meta["num_classes"] == 3 and store.meta["vocab_size"] == 64
    assert any("broken.jpg" in s for s in store.meta["skipped"])
    files = (out / "files.txt").read_text().split()
    assert len(files) == 7 and not any("broken" in f for f in files)
    assert store.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    # row 3 is bee/img0.png: its codes are the tokenizer's codes of LlamaGen's ten crops
    vq = load_vq(vq_ckpt, "VQ-debug")
    crops = code_crops(Image.open(imgs / files[3]).convert("RGB"), 48, ten_crop=True, crop_range=1.1)
    want = vq.encode(crops)
    assert torch.equal(torch.from_numpy(store.codes[3].astype(np.int64)), want)
    assert store.codes.dtype == np.uint16


def test_code_crops_equal_torchvision_tencrop():
    tv = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (90, 123, 3), dtype=np.uint8))
    ref = tv.Compose([tv.Lambda(lambda p: center_crop_arr(p, int(32 * 1.1))), tv.TenCrop(32),
                      tv.Lambda(lambda cs: torch.stack([tv.ToTensor()(c) for c in cs])),
                      tv.Normalize([0.5] * 3, [0.5] * 3)])(img)
    assert torch.equal(code_crops(img, 32, ten_crop=True, crop_range=1.1), ref)
    two = code_crops(img, 32, ten_crop=False)
    assert two.shape == (2, 3, 32, 32) and torch.equal(two[1], two[0].flip(-1))


class _CountingTokenizer:
    """Wraps a tokenizer; counts encoded crops and can fail after a number of calls."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after, self.calls, self.crops = inner, fail_after, 0, 0
        self.codebook_size, self.downsample = inner.codebook_size, inner.downsample

    def grid(self, size):
        return self.inner.grid(size)

    def encode(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.crops += x.shape[0]
        return self.inner.encode(x)


def test_prepare_resumes_without_redoing_rows(tmp_path):
    imgs = _image_folder(tmp_path / "imgs", corrupt=False)
    tok = PatchKMeansTokenizer.fit(torch.rand(20, 3, 32, 32) * 2 - 1, codebook_size=16, patch=8, iters=3)
    kw = dict(image_size=32, ten_crop=False, batch_size=2, num_workers=0, progress=False)
    crashing = _CountingTokenizer(tok, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        prepare(imgs, tmp_path / "a", crashing, **kw)
    assert not (tmp_path / "a" / "meta.json").exists()
    resumed = _CountingTokenizer(tok)
    prepare(imgs, tmp_path / "a", resumed, **kw)
    assert resumed.crops == (7 - 4) * 2                        # only the 3 unfinished images (2 augs each)
    prepare(imgs, tmp_path / "b", tok, **kw)
    a, b = CodeStore(tmp_path / "a"), CodeStore(tmp_path / "b")
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.labels, b.labels)
    again = _CountingTokenizer(tok)
    assert prepare(imgs, tmp_path / "a", again, **kw)["already_complete"] and again.calls == 0
    with pytest.raises(PrepareError, match="different inputs or settings"):
        prepare(imgs, tmp_path / "a", tok, **{**kw, "image_size": 16})


def test_prepare_refuses_bad_inputs_naming_them(tmp_path, vq_ckpt, capsys):
    (tmp_path / "empty").mkdir()
    base = ["--out", str(tmp_path / "o"), "--num-workers", "0", "--no-progress"]
    assert main(["--images", str(tmp_path / "empty"), "--vq", str(vq_ckpt), "--vq-model", "VQ-debug", *base]) == 2
    assert "empty" in capsys.readouterr().err
    imgs = _image_folder(tmp_path / "imgs")
    wrong = tmp_path / "wrong_vq.pt"
    torch.save({"model": build_vq("VQ-debug").state_dict()}, wrong)
    assert main(["--images", str(imgs), "--vq", str(wrong), "--vq-model", "VQ-8", *base]) == 2
    assert "wrong_vq.pt" in capsys.readouterr().err
    assert main(["--images", str(imgs), "--vq", str(tmp_path / "nope.pt"), *base]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert not (tmp_path / "o" / "meta.json").exists()


class _FakeEncoder:
    """Stands in for EncoderTeacher: per-patch mean colour as a 4-channel feature."""

    name, dim, grid_size = "fake", 4, 2

    def targets(self, images):                                    # images in [0, 1]
        assert images.min() >= 0 and images.max() <= 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 2)           # [B, 3, 2, 2]
        feats = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)          # [B, 4, 2, 2]
        return feats.flatten(2).transpose(1, 2).to(torch.bfloat16)            # [B, 4, 4]


def test_prepare_stores_encoder_features_with_kmeans_tokenizer(tmp_path):
    imgs = _image_folder(tmp_path / "imgs")
    tok = PatchKMeansTokenizer.fit(torch.rand(10, 3, 32, 32) * 2 - 1, codebook_size=8, patch=4, iters=2)
    tok_file = tok.save(tmp_path / "tok.pt")
    summary = prepare(imgs, tmp_path / "s", tok, image_size=32, ten_crop=False, batch_size=4, num_workers=0,
                      encoder=_FakeEncoder(), progress=False, tokenizer_desc=str(tok_file))
    assert summary["rows"] == 7 and len(summary["skipped"]) == 1
    store = CodeStore(tmp_path / "s")
    assert store.grid_size == 8 and store.features.shape == (7, 2, 4, 4)
    assert store.meta["features"] == {"name": "fake", "dim": 4, "grid_size": 2}
    codes, label, feats = store.get(0, 1)
    assert feats.dtype == torch.bfloat16 and feats.shape == (4, 4) and label == 0
    x = code_crops(Image.open(imgs / "ant" / "img0.png").convert("RGB"), 32, ten_crop=False)
    want = _FakeEncoder().targets((x[1:2] + 1) / 2)[0]
    assert torch.equal(feats, want)                               # the mirrored crop's features
    assert torch.equal(codes, tok.encode(x[1:2])[0])


def test_prepare_with_timm_encoder_teacher(tmp_path):
    pytest.importorskip("timm")
    from mirai.foresight.encoders import EncoderTeacher
    imgs = _image_folder(tmp_path / "imgs", corrupt=False)
    enc = EncoderTeacher("vit_tiny_patch16_224", None, grid_size=2, random_init=True,
                         timm_kwargs=dict(depth=1, embed_dim=32, num_heads=2))
    tok = PatchKMeansTokenizer.fit(torch.rand(10, 3, 32, 32) * 2 - 1, codebook_size=8, patch=16, iters=2)
    prepare(imgs, tmp_path / "s", tok, image_size=32, ten_crop=False, num_workers=0, encoder=enc, progress=False)
    store = CodeStore(tmp_path / "s")
    assert store.features.shape == (7, 2, 4, 32)
    assert np.abs(store.features[:, :, :, :].astype(np.int64)).sum() > 0


@pytest.mark.distributed
def test_prepare_two_ranks_under_torchrun(tmp_path, vq_ckpt):
    imgs = _image_folder(tmp_path / "imgs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mirai", "prepare", "--images", str(imgs), "--out", str(tmp_path / "dist"), "--vq", str(vq_ckpt),
           "--vq-model", "VQ-debug", "--image-size", "32", "--no-ten-crop", "--num-workers", "0",
           "--batch-size", "2", "--device", "cpu", "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    one = main(["--images", str(imgs), "--out", str(tmp_path / "single"), "--vq", str(vq_ckpt),
                "--vq-model", "VQ-debug", "--image-size", "32", "--no-ten-crop", "--num-workers", "0",
                "--device", "cpu", "--no-progress"])
    assert one == 0
    a, b = CodeStore(tmp_path / "dist"), CodeStore(tmp_path / "single")
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.labels, b.labels)
    assert json.loads((tmp_path / "dist" / "meta.json").read_text())["skipped"] == a.meta["skipped"]
    assert len(a.meta["skipped"]) == 1


def test_grid_follows_the_image_size_384(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (420, 500, 3), dtype=np.uint8)).save(root / "a" / "x.png")
    tok = PatchKMeansTokenizer.fit(torch.rand(2, 3, 32, 32) * 2 - 1, codebook_size=4, patch=16, iters=1)
    prepare(root, tmp_path / "s", tok, image_size=384, ten_crop=False, num_workers=0, progress=False)
    store = CodeStore(tmp_path / "s")
    assert store.grid_size == 24 and store.codes.shape == (1, 2, 576) and store.meta["image_size"] == 384
