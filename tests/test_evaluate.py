"""mirai eval: metric math on injected features, the Inception port's plumbing, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mirai.commands.evaluate import main
from mirai.io.npz import NpzError, iter_npz_images
from mirai.metrics.evaluation import EvalInputError, compute_metrics
from mirai.metrics import FIDStatistics, frechet_distance, inception_score, manifold_radii, precision_recall
from mirai.metrics.inception import (ENV_VAR, WEIGHT_FILES, InceptionV3, InceptionWeightsMissing,
                                     find_inception_weights, resize_bilinear_tf1)


def _closed_form_fid(mu1, var1, mu2, var2, rot):
    """FID of N(mu1, R diag(var1) R^T) and N(mu2, R diag(var2) R^T): the covariances commute."""
    return float(((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum())


def test_fid_matches_closed_form_for_two_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.5, 2, d), rng.uniform(0.1, 3, d)
    s1, s2 = rot @ np.diag(var1) @ rot.T, rot @ np.diag(var2) @ rot.T
    want = _closed_form_fid(mu1, var1, mu2, var2, rot)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # from samples: the estimate converges to the closed form
    x1 = rng.multivariate_normal(mu1, s1, size=40000)
    x2 = rng.multivariate_normal(mu2, s2, size=40000)
    est = FIDStatistics.from_features(x1).frechet_distance(FIDStatistics.from_features(x2))
    assert est == pytest.approx(want, rel=0.03)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_extremes():
    n, c = 1000, 10
    assert inception_score(np.zeros((n, c))) == pytest.approx(1.0)            # uniform predictions
    confident = np.full((n, c), -50.0)
    confident[np.arange(n), np.arange(n) % c] = 50.0                          # sure and evenly spread
    assert inception_score(confident) == pytest.approx(c, rel=1e-6)
    assert inception_score(confident, split_size=100) == pytest.approx(c, rel=1e-6)


def test_manifold_radii_is_kth_neighbour_squared_distance():
    pts = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert manifold_radii(pts, k=1).tolist() == [1.0, 1.0, 4.0, 9.0, 16.0]
    assert manifold_radii(pts, k=2).tolist() == [9.0, 4.0, 9.0, 16.0, 49.0]
    with pytest.raises(ValueError, match="more than 3"):
        manifold_radii(pts[:3], k=3)


def test_precision_recall_on_constructed_sets():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(200, 8)).astype(np.float32)
    assert precision_recall(ref, ref.copy()) == (1.0, 1.0)
    far = ref + 100.0
    assert precision_recall(ref, far) == (0.0, 0.0)
    # samples = half the references + half far away: precision 0.5; they cover part of the references
    mixed = np.concatenate([ref[:100], far[100:]])
    p, r = precision_recall(ref, mixed)
    assert p == 0.5 and 0.4 <= r < 1.0
    assert precision_recall(ref, mixed, row_batch=7) == (p, r)               # batching does not matter


def test_compute_metrics_on_injected_features_is_deterministic_and_uses_ref_stats():
    rng = np.random.default_rng(2)
    sample = {"pool": rng.normal(size=(64, 16)), "spatial": rng.normal(size=(64, 12)),
              "logits": rng.normal(size=(64, 20))}
    ref = {"pool": rng.normal(0.5, 1, size=(80, 16)), "spatial": rng.normal(size=(80, 12))}
    m1 = compute_metrics(sample, ref)
    m2 = compute_metrics(sample, ref)
    assert m1 == m2
    assert set(m1) >= {"inception_score", "fid", "sfid", "precision", "recall", "num_samples", "num_ref"}
    assert m1["fid"] > 0 and m1["num_samples"] == 64 and m1["num_ref"] == 80
    stats = {"mu": np.asarray(sample["pool"]).mean(0), "sigma": np.cov(sample["pool"], rowvar=False)}
    m3 = compute_metrics(sample, None, stats)
    assert m3["fid"] == pytest.approx(0.0, abs=1e-6)
    assert m3["sfid"] is None and m3["precision"] is None
    with pytest.raises(EvalInputError):
        compute_metrics(sample, None, None)


def test_tf1_bilinear_resize():
    x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])
    y = resize_bilinear_tf1(x, 4)
    # TF1 (no half-pixel centres): source coords 0, .5, 1, 1.5 -> the last row/column repeat
    assert torch.equal(y[0, 0, 0], torch.tensor([1.0, 2.0, 3.0, 3.0]))
    assert torch.equal(y[0, 0, :, 0], torch.tensor([1.0, 3.0, 5.0, 5.0]))
    z = torch.rand(1, 3, 5, 5)
    assert torch.equal(resize_bilinear_tf1(z, 5), z)


def test_inception_outputs_and_torch_fidelity_names():
    torch.manual_seed(0)
    net = InceptionV3().eval()
    sd = net.state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_4a_3x3.bn.running_var", "Mixed_5b.branch_pool.conv.weight",
                "Mixed_6d.branch7x7dbl_5.bn.bias", "Mixed_7b.branch3x3_2b.conv.weight",
                "Mixed_7c.branch3x3dbl_3a.bn.weight", "fc.weight", "fc.bias"):
        assert key in sd, key
    assert tuple(sd["fc.weight"].shape) == (1008, 2048)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    models = pytest.importorskip("torchvision.models")
    tv = models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    # pytorch-fid loads pt_inception-2015-12-05 into exactly this torchvision layout (same names as torch-fidelity)
    assert {k: tuple(v.shape) for k, v in tv.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    out = net(torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8))
    assert out["pool"].shape == (1, 2048) and out["spatial"].shape == (1, 17 * 17 * 7)
    assert out["logits"].shape == (1, 1008)
    with pytest.raises(ValueError, match="uint8"):
        net(torch.rand(1, 3, 8, 8))


def test_missing_inception_weights_message(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InceptionWeightsMissing) as err:
        find_inception_weights()
    msg = str(err.value)
    assert WEIGHT_FILES[0] in msg and ENV_VAR in msg and "--inception-weights" in msg
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    assert main(["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--no-progress"]) == 2
    assert ENV_VAR in capsys.readouterr().err
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere.pth"))
    with pytest.raises(InceptionWeightsMissing, match="nowhere.pth"):
        find_inception_weights()


def test_npz_streaming_reader(tmp_path):
    arr = np.random.default_rng(3).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=arr)
    chunks = list(iter_npz_images(tmp_path / "a.npz", 3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert np.array_equal(np.concatenate(chunks), arr)
    np.savez(tmp_path / "bad.npz", arr_0=arr.astype(np.float32))
    with pytest.raises(NpzError, match="bad.npz.*uint8"):
        list(iter_npz_images(tmp_path / "bad.npz", 3))


class _TinyExtractor(torch.nn.Module):
    """Stands in for the Inception net: pooled colour statistics as features."""

    def forward(self, x):
        x = x.float() / 255
        pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)               # [N, 6]
        spatial = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # [N, 12]
        return {"pool": pool, "spatial": spatial, "logits": pool @ torch.ones(6, 4)}


def _batches(tmp_path, n_samples=6, n_ref=8):
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (n_samples, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (n_ref, 16, 16, 3), dtype=np.uint8))


def test_eval_cli_writes_metrics_json(tmp_path, monkeypatch):
    import mirai.metrics.inception as inception
    _batches(tmp_path)
    seen = {}

    def fake_load(path=None, device="cpu"):
        seen["path"] = path
        return _TinyExtractor()

    monkeypatch.setattr(inception, "load_inception", fake_load)
    rc = main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
               "--inception-weights", "w.pth", "--batch-size", "4", "--device", "cpu", "--no-progress"])
    assert rc == 0 and seen["path"] == "w.pth"
    m = json.loads((tmp_path / "samples.metrics.json").read_text())
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert isinstance(m[key], float) and np.isfinite(m[key]), key
    assert m["num_samples"] == 6 and m["num_ref"] == 8
    # a reference holding only ADM-style statistics: FID/sFID from them, no precision/recall
    feats = _TinyExtractor()(torch.from_numpy(np.load(tmp_path / "ref.npz")["arr_0"]).permute(0, 3, 1, 2))
    np.savez(tmp_path / "stats.npz", mu=feats["pool"].double().mean(0).numpy(),
             sigma=np.cov(feats["pool"].double().numpy(), rowvar=False),
             mu_s=feats["spatial"].double().mean(0).numpy(), sigma_s=np.cov(feats["spatial"].double().numpy(), rowvar=False))
    rc = main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "stats.npz"),
               "--out", str(tmp_path / "m2.json"), "--device", "cpu", "--no-progress"])
    m2 = json.loads((tmp_path / "m2.json").read_text())
    assert rc == 0 and m2["precision"] is None
    assert m2["fid"] == pytest.approx(m["fid"], rel=1e-4) and m2["sfid"] == pytest.approx(m["sfid"], rel=1e-4)


@pytest.mark.slow
def test_eval_end_to_end_with_real_network_and_weights_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    weights = tmp_path / WEIGHT_FILES[0]
    torch.save(InceptionV3().state_dict(), weights)          # random weights: plumbing, not the numbers
    _batches(tmp_path, 4, 4)
    monkeypatch.setenv(ENV_VAR, str(weights))
    rc = main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
               "--batch-size", "4", "--device", "cpu", "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "samples.metrics.json").read_text())
    assert all(np.isfinite(m[k]) for k in ("inception_score", "fid", "sfid", "precision", "recall"))
