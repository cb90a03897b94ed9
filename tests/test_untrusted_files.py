"""No code runs from a file a user points at: a file whose unpickling would create a marker file is
offered to every path a user can name; each refuses it with an error naming the file (non-zero exit
for commands), and the marker never appears.

Paths: ``mirai sample --ckpt / --vq / --tokenizer``, ``mirai prepare --vq / --tokenizer /
--encoder-weights``, ``mirai eval --inception-weights``, ``mirai visualize --ckpt / --vq``, ``mirai
export``, ``train.resume``, ``foresight.static_teacher_ckpt``, a planted demo ``tokenizer.pt``, and
every file of a run folder under the plain engine (model.pt, ema.pt, rank_*.pt, engine/state.pt) and
under DeepSpeed (its engine/*.pt files; one single-process run in a subprocess, which is also this
file's worker: ``python tests/test_untrusted_files.py --deepspeed-worker DIR``). Planted run-folder
files come with a matching meta.json (sizes and hashes), so the loader itself must refuse them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import Payload, plant, rehash, tokenizer_file as make_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEBUG_YAML = REPO / "configs" / "debug.yaml"
RUN = ["foresight.mode=ema", "foresight.warmup_epochs=0", "train.backend=single", "train.max_steps=2",
       "train.ckpt_every=2"]


def plant_in_run(ckpt: Path, rel: str, marker: Path) -> Path:
    """Replace ``ckpt / rel`` by a payload file that meta.json records (a planted folder that passes every
    integrity check)."""
    plant(ckpt / rel, marker)
    return rehash(ckpt, rel)


def overrides(store: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.codes={store}", f"out_dir={out}", "train.progress=false", "train.tensorboard=false", *RUN, *extra]


def train_main(store: Path, out: Path, *extra: str) -> int:
    from mirai.commands.train import main
    return main(["--config", str(DEBUG_YAML), "--set", *overrides(store, out, *extra)])


@pytest.fixture(scope="module")
def plain_run(code_store, tmp_path_factory) -> Path:
    from mirai.config import load_config
    from mirai.trainer.run import train
    out = tmp_path_factory.mktemp("plain") / "run"
    train(load_config(DEBUG_YAML, overrides(code_store, out)))
    return out


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def refused(rc: int, err: str, path: Path, marker: Path) -> None:
    assert rc != 0, err
    assert str(path) in err and "refused" in err, err
    assert "io.open" in err, err                                            # names the type
    assert not marker.exists(), f"{marker} appeared: the payload ran"


def test_the_payload_is_live(tmp_path):
    """Guard: a full unpickling of the planted file does run it (so the other tests test something)."""
    marker = tmp_path / "marker"
    path = plant(tmp_path / "p.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_file_refuses_naming_the_type_and_tells_unreadable_apart(tmp_path):
    from mirai.io.torch_files import FileLoadError, UnsafeFileError, load_file
    marker = tmp_path / "marker"
    path = plant(tmp_path / "p.pt", marker)
    with pytest.raises(UnsafeFileError, match=r"p\.pt: refused: .*io\.open") as info:
        load_file(path)
    assert info.value.types == ["io.open"] and not marker.exists()
    torch.save({"w": torch.zeros(3)}, tmp_path / "t.pt")
    (tmp_path / "t.pt").write_bytes((tmp_path / "t.pt").read_bytes()[:200])
    with pytest.raises(FileLoadError, match=r"t\.pt: unreadable or truncated") as info:
        load_file(tmp_path / "t.pt")
    assert not isinstance(info.value, UnsafeFileError)
    import pickle
    with open(tmp_path / "raw.pkl", "wb") as fh:                    # a plain pickle, not a torch file
        pickle.dump(Payload(marker), fh)
    with pytest.raises(UnsafeFileError, match=r"raw\.pkl: refused"):
        load_file(tmp_path / "raw.pkl")
    assert not marker.exists()


def test_sample_refuses_ckpt_vq_and_tokenizer(plain_run, tokenizer_file, tmp_path, capsys):
    from mirai.commands.sample import main
    common = ["--num", "1", "--batch-size", "1", "--no-png", "--no-progress", "--out", str(tmp_path / "s")]
    cases = [("ckpt", ["--tokenizer", str(tokenizer_file), "--gpt-model", "GPT-debug"]),
             ("vq", ["--ckpt", str(plain_run), "--vq-model", "VQ-debug"]),
             ("tokenizer", ["--ckpt", str(plain_run)])]
    for flag, rest in cases:
        marker = tmp_path / f"marker_{flag}"
        bad = plant(tmp_path / f"{flag}.pt", marker)
        rc = main([f"--{flag}", str(bad), *rest, *common])
        refused(rc, capsys.readouterr().err, bad, marker)


def test_prepare_refuses_vq_tokenizer_and_encoder_weights(tokenizer_file, tmp_path, capsys):
    from PIL import Image

    from mirai.commands.prepare import main
    images = tmp_path / "images" / "cls0"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(images / "a.png")
    common = ["--images", str(tmp_path / "images"), "--num-workers", "0", "--no-progress", "--image-size", "32"]
    cases = [("vq", []), ("tokenizer", []),
             ("encoder-weights", ["--tokenizer", str(tokenizer_file), "--encoder", "vit_tiny_patch16_224"])]
    for flag, rest in cases:
        marker = tmp_path / f"marker_{flag}"
        bad = plant(tmp_path / f"{flag}.pt", marker)
        rc = main([f"--{flag}", str(bad), *rest, *common, "--out", str(tmp_path / f"out_{flag}")])
        refused(rc, capsys.readouterr().err, bad, marker)


def test_eval_refuses_inception_weights(tmp_path, capsys):
    from mirai.commands.evaluate import main
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images)
    np.savez(tmp_path / "r.npz", arr_0=images)
    marker = tmp_path / "marker"
    bad = plant(tmp_path / "inception.pth", marker)
    rc = main(["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--inception-weights",
               str(bad), "--no-progress", "--device", "cpu"])
    refused(rc, capsys.readouterr().err, bad, marker)


def test_visualize_refuses_ckpt_and_vq(plain_run, code_store, tmp_path, capsys):
    from mirai.commands.visualize import main
    common = ["tsne", "--codes", str(code_store), "--layer", "1", "--out", str(tmp_path / "t.png")]
    marker = tmp_path / "marker_ckpt"
    bad = plant(tmp_path / "ckpt.pt", marker)
    refused(main([*common, "--ckpt", str(bad)]), capsys.readouterr().err, bad, marker)
    marker = tmp_path / "marker_vq"
    bad = plant(tmp_path / "vq.pt", marker)
    refused(main([*common, "--ckpt", str(plain_run), "--vq", str(bad), "--vq-model", "VQ-debug"]),
            capsys.readouterr().err, bad, marker)


def test_static_teacher_is_refused(code_store, tmp_path, capsys):
    marker = tmp_path / "marker"
    bad = plant(tmp_path / "teacher.pt", marker)
    rc = train_main(code_store, tmp_path / "run", "foresight.teacher=static", f"foresight.static_teacher_ckpt={bad}")
    refused(rc, capsys.readouterr().err, bad, marker)


def test_demo_refuses_a_planted_tokenizer(tmp_path):
    """A payload planted over the demo's cached tokenizer, next to the genuine sidecar that makes the demo reuse
    it: refused naming the file, never run, never silently refitted over."""
    from mirai.commands.demo.tokenizer import fit_or_load_tokenizer
    from mirai.io.torch_files import UnsafeFileError
    x = torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = tmp_path / "demo" / "tokenizer.pt"
    path.parent.mkdir()
    fit = dict(codebook_size=8, iters=2, max_patches=256, seed=0)
    assert fit_or_load_tokenizer(path, x, x, **fit)[2] is False                 # fitted and cached
    assert fit_or_load_tokenizer(path, x, x, **fit)[2] is True                  # reused
    marker = tmp_path / "marker"
    bad = plant(path, marker)
    with pytest.raises(UnsafeFileError, match="tokenizer.pt"):
        fit_or_load_tokenizer(path, x, x, **fit)
    assert not marker.exists()
    assert bad.read_bytes()[:2] == b"PK"                                         # not refitted over


@pytest.mark.parametrize("rel", ["model.pt", "ema.pt", "rank_00000.pt", "engine/state.pt"])
def test_plain_run_folder_files_are_refused_on_resume(plain_run, code_store, tmp_path, capsys, rel):
    from mirai.checkpoint import read_latest
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    marker = tmp_path / "marker"
    bad = plant_in_run(read_latest(run), rel, marker)
    rc = train_main(code_store, run, "train.max_steps=4")                   # train.resume=auto
    refused(rc, capsys.readouterr().err, bad, marker)
    rc = train_main(code_store, tmp_path / "other", "train.max_steps=4", f"train.resume={bad.parent}"
                    if rel != "engine/state.pt" else f"train.resume={bad.parent.parent}")
    refused(rc, capsys.readouterr().err, bad, marker)


@pytest.mark.parametrize("rel", ["model.pt", "ema.pt"])
def test_export_and_sample_refuse_planted_run_files(plain_run, tokenizer_file, tmp_path, capsys, rel):
    from mirai.checkpoint import read_latest
    from mirai.commands.export import main as export_main
    from mirai.commands.sample import main as sample_main
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    marker = tmp_path / "marker"
    bad = plant_in_run(read_latest(run), rel, marker)
    refused(export_main(["--run", str(run), "--out", str(tmp_path / "e.pt")]), capsys.readouterr().err, bad, marker)
    rc = sample_main(["--ckpt", str(run), "--tokenizer", str(tokenizer_file), "--num", "1", "--no-png",
                      "--no-progress", "--out", str(tmp_path / "s")])
    refused(rc, capsys.readouterr().err, bad, marker)


# --------------------------------------------------------------------------- DeepSpeed (subprocess)
@pytest.fixture(scope="module")
def deepspeed_results(code_store, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ds")
    (root / "store").write_text(str(code_store))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--deepspeed-worker", str(root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"deepspeed worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads((root / "results.json").read_text())


@pytest.mark.distributed
def test_deepspeed_engine_files_are_refused_before_deepspeed_opens_them(deepspeed_results):
    """ZeRO-1 bf16 (model states + the optimizer file with DeepSpeed's own types): a clean resume works
    (those types are allowed), every planted engine file is refused naming it."""
    assert deepspeed_results["clean"]["rc"] == 0, deepspeed_results["clean"]
    planted = {k: v for k, v in deepspeed_results.items() if k != "clean"}
    assert any("optim_states" in k for k in planted) and any("model_states" in k for k in planted), planted
    for rel, r in planted.items():
        refused(r["rc"], r["err"], Path(r["file"]), Path(r["marker"]))


def _deepspeed_worker(root: Path) -> None:
    """Train ZeRO-1 for 2 steps, then resume a clean copy and copies with each engine file planted."""
    import contextlib
    import io

    import mirai.trainer.distributed as distributed
    from mirai.checkpoint import read_latest
    distributed.teardown = lambda **_: None    # DeepSpeed's groups cannot be rebuilt in one process: keep them
    store = Path((root / "store").read_text())
    ds = ["train.backend=deepspeed", "train.zero_stage=1", "train.precision=bf16"]
    assert train_main(store, root / "run", *ds) == 0
    ckpt = read_latest(root / "run")
    results = {}
    names = ["clean"] + sorted(str(p.relative_to(ckpt)) for p in (ckpt / "engine").glob("*.pt"))
    for i, name in enumerate(names):
        run = root / f"copy{i}"
        shutil.copytree(root / "run", run)
        marker, bad = root / f"marker{i}", None
        if name != "clean":
            bad = plant_in_run(read_latest(run), name, marker)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = train_main(store, run, *ds, "train.max_steps=4")
        results[name] = {"rc": rc, "err": err.getvalue(), "file": str(bad), "marker": str(marker)}
    (root / "results.json").write_text(json.dumps(results))


if __name__ == "__main__" and "--deepspeed-worker" in sys.argv:
    _deepspeed_worker(Path(sys.argv[sys.argv.index("--deepspeed-worker") + 1]))
