"""The embedded demo (mirai.commands.demo): splits, encoder, features path, statistics, warm-up guard, run reuse, report.

The end-to-end tests share one tiny demo call (16 codes, a 3-layer width-32 GPT, 4 steps per run, one seed, two
runs at a time) that goes through every stage - digits, tokenizer, encoder, classifier, code stores, the three
`python -m mirai train` runs, evaluation, figures, report - and then a second call that must reuse everything.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mirai.data.format import CodeStore
from mirai.commands.demo import data as D
from mirai.commands.demo import pipeline, runs, stats
from mirai.commands.demo.encoder import DigitEncoder, EncoderSettings, GridTransformer, fit_or_load_encoder, \
    mask_tokens, masked_accuracy, train_grid_transformer
from mirai.commands.demo.evaluate import fd_steps, organisation
from mirai.commands.demo.options import DemoOptions, Parallelism, check_options, pick_parallelism
from mirai.commands.demo.report import reach_step
from mirai.models.vq import PatchKMeansTokenizer

TINY_SETS = ["model.dim=32", "model.n_layer=3", "model.n_head=2", "foresight.head_hidden=32", "train.log_every=2"]


def tiny_options(out: Path, **kw) -> DemoOptions:
    base = dict(out=out, seeds=1, steps=4, device="cpu", overrides=list(TINY_SETS), codebook_size=16,
                kmeans_iters=2, kmeans_patches=2000, encoder_steps=10, classifier_epochs=1, samples_per_class=2,
                eval_points=2, fd_points=1, tsne_images=2, jobs=2, threads=1, progress=False)
    base.update(kw)
    return DemoOptions(**base)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    d = D.load_splits("validation")
    return PatchKMeansTokenizer.fit(d.fit_x[:200], codebook_size=16, patch=D.PATCH, iters=2, seed=0), d


# ------------------------------------------------------------------------------------------------ data
def test_splits_are_stratified_and_validation_never_reads_heldout():
    held = D.load_splits("heldout")
    val = D.load_splits("validation")
    assert held.fit_x.shape == (1437, 1, 32, 32) and held.eval_x.shape == (360, 1, 32, 32)
    assert val.fit_x.shape == (1149, 1, 32, 32) and val.eval_x.shape == (288, 1, 32, 32)
    assert D.fit_size("heldout") == 1437 and D.fit_size("validation") == 1149
    for y in (held.eval_y, val.eval_y):
        counts = np.bincount(y, minlength=10)
        assert counts.max() - counts.min() <= 2                                 # stratified
    train = {x.numpy().tobytes() for x in held.fit_x}
    heldout = {x.numpy().tobytes() for x in held.eval_x}
    for x in torch.cat([val.fit_x, val.eval_x]):                               # validation mode: training digits only
        assert x.numpy().tobytes() in train and x.numpy().tobytes() not in heldout
    assert float(held.fit_x.min()) == -1.0 and float(held.fit_x.max()) <= 1.0


# ------------------------------------------------------------------------------------------------ encoder
def test_encoder_learns_sees_the_whole_image_and_is_frozen(tiny_tokenizer):
    tok, d = tiny_tokenizer
    codes = tok.encode(d.fit_x[:256])                                           # [N, 64]
    s = EncoderSettings(dim=32, depth=2, heads=2, batch=64, steps=160, lr=5e-3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        untrained = GridTransformer(16, D.GRID, s)
    net, _ = train_grid_transformer(codes, 16, s, seed=0)
    acc = masked_accuracy(net, codes, 0.5)
    _, masked = mask_tokens(codes, 0.5, net.mask_id, torch.Generator().manual_seed(0))   # masked_accuracy's mask
    position_prior = (codes.mode(0).values.expand_as(codes) == codes)[masked].float().mean()  # each cell's commonest code
    assert acc > masked_accuracy(untrained, codes, 0.5) + 0.1
    assert acc > float(position_prior) + 0.02                                   # it uses the visible tokens
    enc = DigitEncoder(tok, net, s)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    x = d.fit_x[:2].add(1).mul(0.5)                                             # [0, 1] pixels
    feats = enc.targets(x)
    assert feats.shape == (2, 64, 32)
    y = x.clone()
    y[:, :, 28:, 28:] = 1.0 - y[:, :, 28:, 28:]                                  # change the last cell only
    assert not torch.equal(tok.encode(x * 2 - 1)[:, -1], tok.encode(y * 2 - 1)[:, -1])
    changed = (enc.targets(y) - feats).abs().amax(-1)                           # [2, 64]
    assert bool((changed[:, 0] > 1e-4).all())                                   # the FIRST cell's feature moved too


def test_encoder_is_cached_while_its_inputs_are_unchanged(tmp_path, tiny_tokenizer):
    tok, d = tiny_tokenizer
    s = EncoderSettings(dim=16, depth=1, heads=2, steps=3)
    path = tmp_path / "encoder.pt"
    first, facts, reused = fit_or_load_encoder(path, tok, "tok", d.fit_x[:64], d.eval_x[:32], s, 0)
    assert not reused and 0.0 <= facts["eval_masked_accuracy"] <= 1.0
    mtime = path.stat().st_mtime_ns
    again, _, reused = fit_or_load_encoder(path, tok, "tok", d.fit_x[:64], d.eval_x[:32], s, 0)
    assert reused and path.stat().st_mtime_ns == mtime
    assert torch.equal(first.targets(d.fit_x[:3] * 0.5 + 0.5), again.targets(d.fit_x[:3] * 0.5 + 0.5))
    _, _, reused = fit_or_load_encoder(path, tok, "tok", d.fit_x[:65], d.eval_x[:32], s, 0)   # other data
    assert not reused


# ------------------------------------------------------------------------------------------------ features
def test_store_features_are_written_exactly_as_mirai_prepare_writes_them(tmp_path, tiny_tokenizer):
    """The demo's training store and `mirai prepare --encoder` on the same digits hold the same codes, the same
    bf16 features and the same feature metadata."""
    from mirai.data.prepare import prepare
    tok, d = tiny_tokenizer
    s = EncoderSettings(dim=16, depth=1, heads=2, steps=3)
    net, _ = train_grid_transformer(tok.encode(d.fit_x[:64]), 16, s, seed=0)
    enc = DigitEncoder(tok, net, s)
    u8 = ((d.fit_x[:20, 0] + 1) * 127.5).round().to(torch.uint8)                # [20, 32, 32], exact in PNG
    labels = d.fit_y[:20]
    for i, (img, y) in enumerate(zip(u8, labels)):
        (tmp_path / "imgs" / f"c{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.numpy()).convert("RGB").save(tmp_path / "imgs" / f"c{y}" / f"{i:03d}.png")
    prepare(tmp_path / "imgs", tmp_path / "prepared", tok, image_size=32, ten_crop=False, num_workers=0,
            encoder=enc, progress=False)
    ref = CodeStore(tmp_path / "prepared")
    files = (tmp_path / "prepared" / "files.txt").read_text().split()
    order = [int(Path(f).stem) for f in files]                                  # prepare's (class, file) order
    x = u8[order][:, None].float().div(255).sub(0.5).div(0.5)                   # as prepare reads a PNG
    D.write_store(tmp_path / "demo", tok, x, labels[order], key="k", split="fit", encoder=enc)
    mine = CodeStore(tmp_path / "demo")
    assert mine.meta["features"] == ref.meta["features"] == {"name": "features", "dim": 16, "grid_size": 8}
    for field in ("encoder_block_causal", "encoder_input_size", "seq_len", "grid_size", "vocab_size"):
        assert mine.meta[field] == ref.meta[field], field
    assert mine.features.dtype == ref.features.dtype == np.uint16               # bf16 bits
    np.testing.assert_array_equal(mine.codes[:, 0], ref.codes[:, 0])           # aug 0 = the uncropped image
    np.testing.assert_array_equal(mine.features[:, 0], ref.features[:, 0])
    assert D.write_store(tmp_path / "demo", tok, x, labels[order], key="k", split="fit", encoder=enc)  # reused


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_statistics_match_scipy_and_hand_values():
    from scipy import stats as sps
    method, base = [1.0, 2.5, 2.0, 4.0], [0.0, 0.5, -1.0, 0.0]                  # differences 1, 2, 3, 4
    r = stats.paired(method, base)
    assert r["n"] == 4 and r["mean"] == pytest.approx(2.5) and r["std"] == pytest.approx(1.2909944, rel=1e-6)
    half = 3.182446305 * 1.2909944 / 2                                          # t_{0.975, 3} * sd / sqrt(4)
    assert r["ci_low"] == pytest.approx(2.5 - half, rel=1e-6) and r["ci_high"] == pytest.approx(2.5 + half, rel=1e-6)
    ref = sps.ttest_rel(method, base)
    assert r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
    one = stats.paired([1.0], [0.5])
    assert one["mean"] == 0.5 and one["ci_low"] is None and one["p"] is None and one["std"] is None
    assert stats.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    with pytest.raises(ValueError, match="baseline"):
        stats.paired([1.0, 2.0], [1.0])


def test_reach_step_interpolates_and_fd_steps_end_at_the_final_step():
    curve = [{"step": 10, "ntp": 3.0}, {"step": 20, "ntp": 2.0}, {"step": 30, "ntp": 1.0}]
    assert reach_step(curve, 1.5) == pytest.approx(25.0)
    assert reach_step(curve, 3.5) == 10.0 and reach_step(curve, 0.5) is None
    assert fd_steps([10, 20, 30, 40, 50, 60], 2) == [30, 60] and fd_steps([5], 3) == [5]


def test_organisation_is_high_for_smooth_feature_maps_and_zero_for_noise():
    g = 8
    rc = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(-1, 2).float()
    freqs = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    smooth = torch.cos(rc @ freqs + torch.rand(20, 1, 16))                     # [20, 64, 16] smooth on the grid
    noise = torch.randn(20, 64, 16, generator=torch.Generator().manual_seed(1))
    s, n = organisation(smooth, g), organisation(noise, g)
    assert s["org"] > 0.2 and abs(n["org"]) < 0.02
    assert len(s["sim_by_distance"]) == 2 * g - 2 and s["sim_by_distance"][0] > s["sim_by_distance"][-1]


# ------------------------------------------------------------------------------------------------ options, guard
def test_bad_options_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--seeds"):
        check_options(tiny_options(tmp_path, seeds=0))
    with pytest.raises(ValueError, match="--fd-points"):
        check_options(tiny_options(tmp_path, fd_points=3, eval_points=2))
    assert pipeline.main(["--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert not (tmp_path / "x").exists()


def test_warmup_guard_refuses_a_mirai_run_without_foresight(tmp_path, capsys):
    opts = tiny_options(tmp_path / "a", steps=40, overrides=TINY_SETS + ["foresight.warmup_epochs=2"])
    with pytest.raises(ValueError, match=r"Mirai-E \(seed 0\): the foresight term would be zero for the whole "
                                         r"run: its warm-up of 2 epochs \(88 steps.*covers all 40 steps"):
        runs.plan_runs(opts, "cpu", progress=False)
    opts = tiny_options(tmp_path / "b", steps=40, overrides=TINY_SETS + ["foresight.lambdas=0.0",
                                                                        "foresight.lambda_end=0.0"])
    with pytest.raises(ValueError, match="Mirai-E.*its lambda is 0 at every step"):
        runs.plan_runs(opts, "cpu", progress=False)
    # the command line refuses before any work
    code = pipeline.main(["--out", str(tmp_path / "c"), "--steps", "40", "--set", "foresight.warmup_epochs=2"])
    assert code == 2 and "would train the baseline under the name Mirai-E" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_warmup_keeps_its_fraction_of_the_run(tmp_path):
    def warm(steps, split="heldout"):
        plan = runs.plan_runs(tiny_options(tmp_path, steps=steps, split=split), "cpu", progress=False)
        cfg = next(s for s in plan.specs if s.method == "mirai_e").load_config()
        return cfg.foresight.warmup_epochs
    assert warm(None) == 1                                   # the config: 1 epoch of 44 steps of 480
    assert warm(40) == 0                                     # 9 % of 40 steps is under one epoch: no warm-up
    assert warm(960) == 2 and warm(960, "validation") == 3   # 35 steps per epoch on the 1,149 fit digits


def test_three_runs_per_seed_share_everything_but_the_method(tmp_path):
    plan = runs.plan_runs(tiny_options(tmp_path, seeds=2), "cpu", progress=False)
    assert [s.key for s in plan.specs] == ["baseline_s0", "mirai_e_s0", "mirai_i_s0",
                                           "baseline_s1", "mirai_e_s1", "mirai_i_s1"]
    cfgs = [s.load_config() for s in plan.specs[3:]]
    assert [c.foresight.mode for c in cfgs] == ["none", "ema", "encoder"]
    assert [c.foresight.k for c in cfgs[1:]] == [3, 1] and {c.train.seed for c in cfgs} == {1}
    assert cfgs[2].foresight.reads_features
    assert len({c.data.codes for c in cfgs}) == 1 and len({str(c.model) for c in cfgs}) == 1
    assert {s.layer for s in plan.specs} == {2}              # round(2/3 * 3)
    with pytest.raises(ValueError, match="differ in their model section"):
        bad = tiny_options(tmp_path, overrides=TINY_SETS)
        specs = runs.make_specs(bad, "cpu", 1437, 1437, False)
        specs[1].sets.append("model.dim=48")
        runs.check_same_setup(specs)


def test_parallelism_gives_each_core_a_single_threaded_run(monkeypatch, tmp_path):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    opts = tiny_options(tmp_path, jobs=None, threads=None)
    assert pick_parallelism(opts, "cpu", 9) == Parallelism(jobs=2, threads=1, cores=2, load=0.0)
    assert pick_parallelism(tiny_options(tmp_path, jobs=1, threads=None), "cpu", 9).threads == 2
    monkeypatch.setattr("os.getloadavg", lambda: (1.6, 0.0, 0.0))              # the other core is busy
    assert pick_parallelism(tiny_options(tmp_path, jobs=1, threads=None), "cpu", 9).threads == 1


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, pipeline.run_demo(tiny_options(out))


@pytest.mark.slow
def test_demo_writes_the_report_with_all_three_methods(tiny_demo):
    out, report = tiny_demo
    for name in ("convergence.png", "samples.png", "organisation.png", "tsne.png", "tokenizer.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 100, name
    text = (out / "report.md").read_text()
    for needle in ("## Results", "### Paired difference to the baseline", "## Convergence", "## 2D organisation",
                   "baseline (LlamaGen)", "Mirai-E", "Mirai-I", "(convergence.png)", "(organisation.png)",
                   "one seed: no interval", "python -m mirai train --config configs/demo_mirai_i.yaml"):
        assert needle in text, needle
    assert json.loads((out / "report.json").read_text())["summary"]["ntp"]["values"] == \
        report["summary"]["ntp"]["values"]
    for key in ("baseline_s0", "mirai_e_s0", "mirai_i_s0"):
        ev = report["runs"][key]["eval"]
        assert [p["step"] for p in ev["curve"]] == [2, 4] and "fd" in ev["curve"][-1]
        assert 0.0 < ev["final"]["ntp_raw"] < 2 * np.log(16) and 0.0 <= ev["final"]["consistency"] <= 1.0
        assert f"| {key} | {ev['final']['ntp']:.4f} | {ev['final']['ntp_raw']:.4f} |" in text
    assert report["runs"]["mirai_e_s0"]["training"]["cpu_seconds"] > 0


@pytest.mark.slow
def test_mirai_i_run_trains_on_the_stored_encoder_features(tiny_demo):
    out, report = tiny_demo
    store = CodeStore(out / "data" / "train")
    assert store.features is not None and store.meta["features"]["dim"] == 64     # the default encoder width
    cfg = (out / "runs" / "mirai_i_s0" / "config.yaml").read_text()
    assert "use_precomputed_features: true" in cfg
    logs = [json.loads(line) for line in (out / "runs" / "mirai_i_s0" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lambdas"] == [2.0] and len(r["head_loss"]) == 1 and r["head_loss"][0] != 0.0 for r in logs)
    e_logs = [json.loads(line) for line in (out / "runs" / "mirai_e_s0" / "metrics.jsonl").read_text().splitlines()]
    assert e_logs[0]["lambdas"] == [2.0, 2.0, 2.0] and e_logs[-1]["lambdas"] == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_rerun_reuses_every_finished_piece(tiny_demo):
    out, first = tiny_demo
    watched = [out / n for n in ("tokenizer.pt", "encoder.pt", "classifier.pt")]
    watched += [out / "data" / s / "meta.json" for s in ("train", "eval")]
    watched += sorted((out / "runs").glob("*/checkpoints/step_*/meta.json")) + sorted(out.glob("runs/*/demo_eval.json"))
    assert len(watched) == 5 + 6 + 3
    before = {p: p.stat().st_mtime_ns for p in watched}
    report = pipeline.run_demo(tiny_options(out))
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert report["tokenizer"]["reused"] and report["encoder"]["reused"] and report["classifier"]["reused"]
    for key, run in report["runs"].items():
        assert run["training"]["reused"] and run["eval"]["reused"]
        assert run["training"]["cpu_seconds"] == first["runs"][key]["training"]["cpu_seconds"]
        assert run["eval"]["final"] == first["runs"][key]["eval"]["final"]
    assert report["timing"]["trained_runs"] == 0
    longer = runs.plan_runs(tiny_options(out, steps=6), "cpu", progress=False)
    states = [runs.run_state(s, check_inputs=False) for s in longer.specs]
    assert {s for s, _ in states} == {"stale"} and all("train.max_steps" in why for _, why in states)
