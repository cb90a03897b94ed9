"""PAR under the trainer: the shipped par-b_* configs at debug size (PAR-debug, 4x4 tokens,
4 regions) train one step as baseline, Mirai-E and Mirai-I (precomputed features); the foresight
neighbours are 2D-grid neighbours mapped through PAR's order; export + load_gpt rebuild PAR and
``mirai sample`` decodes it group by group."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def debug_size(store: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that shrink a shipped PAR-B config to PAR-debug on the tests' 4x4 code store."""
    return ["model.name=PAR-debug", "model.vocab_size=64", "model.num_classes=10", "model.image_size=64",
            f"data.codes={store}", f"out_dir={out}", "data.num_workers=0", "data.pin_memory=false",
            "train.global_batch=8", "train.micro_batch=4", "train.max_steps=1", "train.precision=fp32",
            "train.zero_stage=0", "train.backend=single", "train.compile=false", "train.progress=false",
            "train.tensorboard=false", "train.log_every=1", "optim.lr=1e-2", "foresight.head_hidden=64",
            "foresight.layer=1", "foresight.warmup_epochs=0", "ema.decay=0.99",
            *extra]


def _cfg(name: str, store: Path, out: Path, *extra: str):
    from mirai.config import load_config, validate
    cfg = load_config(CONFIGS / f"{name}.yaml", debug_size(store, out, *extra))
    validate(cfg)
    return cfg


def _first_batch(run):
    run.loader.start(0)
    return next(iter(run.loader))


def _grid_neighbour_positions(cells_in: torch.Tensor, grid: int, offsets) -> torch.Tensor:
    """[K, T] by a direct loop: the position holding cell (r+dr, c+dc) for the cell (r, c) held at t."""
    holder = {int(c): t for t, c in enumerate(cells_in.tolist()) if c >= 0}
    out = torch.full((len(offsets), len(cells_in)), -1, dtype=torch.long)
    for t, g in enumerate(cells_in.tolist()):
        if g < 0:
            continue
        r, c = divmod(g, grid)
        for j, (dr, dc) in enumerate(offsets):
            if 0 <= r + dr < grid and 0 <= c + dc < grid:
                out[j, t] = holder.get((r + dr) * grid + c + dc, -1)
    return out


def test_par_configs_ship_pa4x_and_accept_16_regions():
    from mirai.config import load_config, model_gpt_config, validate
    for name in ("par-b_baseline", "par-b_mirai_e", "par-b_mirai_i"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        validate(cfg, world_size=8, check_data=False)
        assert (cfg.model.name, cfg.model.num_regions) == ("PAR-B", 4)
        assert "model.num_regions=16" in (CONFIGS / f"{name}.yaml").read_text()
    sixteen = load_config(CONFIGS / "par-b_mirai_e.yaml", ["model.num_regions=16"])
    validate(sixteen, world_size=8, check_data=False)
    assert model_gpt_config(sixteen.model).num_regions == 16
    from mirai.config import ConfigError
    with pytest.raises(ConfigError, match=r"^model\.num_regions:.*divisible"):
        validate(load_config(CONFIGS / "par-b_baseline.yaml", ["model.num_regions=9"]), 8, check_data=False)
    with pytest.raises(ConfigError, match=r"^model\.num_regions:.*PAR"):
        validate(load_config(CONFIGS / "gpt-b_baseline.yaml", ["model.num_regions=4"]), 8, check_data=False)
    with pytest.raises(ConfigError, match=r"^foresight\.head_out:.*768"):     # the EMA teacher is model-wide
        validate(load_config(CONFIGS / "par-b_mirai_e.yaml", ["foresight.head_out=32"]), 8, check_data=False)


def test_par_baseline_one_step(code_store, tmp_path):
    from mirai.foresight.sources import NoTargets
    from mirai.models.par import PARTransformer
    from mirai.trainer.run import build_run, train
    cfg = _cfg("par-b_baseline", code_store, tmp_path / "base")
    run = build_run(cfg)
    assert isinstance(run.gpt, PARTransformer) and run.gpt.num_regions == 4 and isinstance(run.source, NoTargets)
    res = train(cfg)
    (m,) = res.metrics
    assert math.isfinite(m["loss"]) and m["loss"] == m["ntp_loss"] and m["loss"] > 0


def test_par_mirai_e_teacher_runs_on_the_par_sequence_with_grid_neighbours(code_store, tmp_path):
    from mirai.foresight.neighbours import offsets_2d
    from mirai.models.par import PARTransformer, par_order
    from mirai.trainer.run import build_run, train
    cfg = _cfg("par-b_mirai_e", code_store, tmp_path / "e")
    run = build_run(cfg)
    gpt, teacher = run.gpt, run.source
    assert isinstance(teacher.module, PARTransformer) and teacher.module.config.n_layer == 1
    assert "transition_tokens" in teacher.teacher_names                 # refreshed by the EMA too
    # the heads' targets: teacher positions holding the 2D-grid neighbours of the cell each position holds
    cells_in = gpt.position_to_cell("input")
    want = _grid_neighbour_positions(cells_in, 4, offsets_2d(3, 4))
    prefix = cells_in < 0                                                # class + transition positions
    want[:, prefix] = torch.nonzero(prefix).flatten()                    # paired with their own teacher row
    assert torch.equal(run.runner.engine.module.objective.table.cpu(), want)
    assert not torch.equal(want, _grid_neighbour_positions(torch.arange(16) - 1, 4, offsets_2d(3, 4)))
    # the teacher reads the model-ordered (PAR) sequence of the raster codes in the store
    batch = _first_batch(run)
    order = par_order(4, 4)
    idx = batch["codes"][:, order][:, :16 - 4]                           # [B, N - n] PAR inputs
    got = run.runner.teacher_targets(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):                   # as the teacher pass runs
        ref = teacher.module(idx, batch["labels"], upto_layer=1).hidden[1]
    assert got.shape == (4, 16, 64)
    torch.testing.assert_close(got.float(), ref.float())
    res = train(cfg)
    (m,) = res.metrics
    assert math.isfinite(m["loss"]) and all(math.isfinite(h) and h != 0.0 for h in m["head_loss"])
    assert m["loss"] != m["ntp_loss"] and m["lambdas"] == [2.0, 2.0, 2.0]


def test_par_mirai_i_precomputed_features_in_raster_cells(code_store, tmp_path):
    from mirai.trainer.run import build_run, train
    cfg = _cfg("par-b_mirai_i", code_store, tmp_path / "i", "foresight.head_out=32")
    run = build_run(cfg)
    table = run.runner.engine.module.objective.table.cpu()               # [1, 16]: encoder rows are cells
    assert torch.equal(table[0], run.gpt.position_to_cell("input"))      # head 0: the cell each position holds
    res = train(cfg)
    (m,) = res.metrics
    assert math.isfinite(m["loss"]) and math.isfinite(m["head_loss"][0]) and m["head_loss"][0] != 0.0


def test_par_export_load_and_sample_in_parallel_groups(code_store, tmp_path):
    from mirai.checkpoint import export, load_gpt
    from mirai.io.torch_files import load_file
    from mirai.models.par import PARTransformer
    from mirai.models.vq import build_vq
    from mirai.commands.sample import main as sample_main
    from mirai.trainer.run import train
    res = train(_cfg("par-b_mirai_e", code_store, tmp_path / "run", "train.max_steps=2"))
    path = export(res.checkpoint, tmp_path / "par.pt")
    assert load_file(path)["model_name"] == "PAR-debug"
    model = load_gpt(path)
    assert isinstance(model, PARTransformer) and model.num_regions == 4
    ema = load_file(res.checkpoint / "ema.pt")["ema"]
    assert torch.equal(model.transition_tokens, ema["transition_tokens"])
    # generation: one decode step per group (4 sequential + 3 parallel = 7, not 16), raster token grids out
    calls = []
    real = model.decode_step
    model.decode_step = lambda x, start: calls.append((start, x.shape[1])) or real(x, start)
    tokens = model.generate(torch.tensor([1, 2, 3]), cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long and 0 <= int(tokens.min()) <= int(tokens.max()) < 64
    assert [s for _, s in calls] == [1, 1, 1, 1, 4, 4, 4]
    # the CLI on the exported file
    torch.manual_seed(1)
    vq = tmp_path / "vq.pt"
    torch.save({"model": build_vq("VQ-debug").state_dict()}, vq)
    rc = sample_main(["--ckpt", str(path), "--vq", str(vq), "--vq-model", "VQ-debug", "--num", "3", "--batch-size",
                      "3", "--out", str(tmp_path / "samples"), "--no-progress", "--no-png"])
    assert rc == 0
    with np.load(tmp_path / "samples" / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 64, 64, 3) and z["arr_0"].dtype == np.uint8


@pytest.mark.slow
@pytest.mark.distributed
def test_par_mirai_e_under_zero3_on_two_ranks_matches_one_process(code_store, tmp_path):
    """PAR's transition tokens are a direct parameter of the model's root module: ZeRO-3 must gather them
    for the backward pass too (see DeepSpeedEngine); two gloo ranks match one plain process."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from mirai.checkpoint import read_latest
    from mirai.io.torch_files import load_file
    from mirai.trainer.run import train
    same = ["model.token_dropout_p=0", "model.resid_dropout_p=0", "model.ffn_dropout_p=0",
            "model.class_dropout_prob=0", "train.max_steps=2", "optim.warmup_steps=2"]
    dist_dir, ref_dir = tmp_path / "zero3", tmp_path / "single"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = debug_size(code_store, dist_dir, *same, "train.backend=deepspeed", "train.zero_stage=3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "mirai", "train", "--config", str(CONFIGS / "par-b_mirai_e.yaml"),
           "--set", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    train(_cfg("par-b_mirai_e", code_store, ref_dir, *same))
    metrics = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(metrics(dist_dir), metrics(ref_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["ntp_loss"] == pytest.approx(b["ntp_loss"], rel=1e-4)
    wa = load_file(read_latest(dist_dir) / "model.pt")["model"]
    wb = load_file(read_latest(ref_dir) / "model.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
