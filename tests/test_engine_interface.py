"""The engine owns its parallelism: partitioned parameters are known to mirai/trainer/engine/ only, and one
micro-step holds DDP's gradient-sync switch for its forward and backward, whatever they raise."""
from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

PACKAGE = Path(__file__).resolve().parents[1] / "mirai"
ENGINE = PACKAGE / "trainer" / "engine"
# DeepSpeed's per-parameter partition attributes and its external-parameter calls
PARTITION_NAMES = {"ds_tensor", "ds_numel", "ds_shape", "ds_status", "ds_id", "register_external_parameter",
                   "GatheredParameters", "fp32_partitioned_groups_flat"}


def _identifiers(tree: ast.AST):
    """(line, identifier) of every name the code uses or defines (docstrings and comments are not code)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.arg):
            yield node.lineno, node.arg
        elif isinstance(node, ast.keyword) and node.arg:
            yield node.value.lineno, node.arg
        elif isinstance(node, ast.alias):
            yield getattr(node, "lineno", 0), node.asname or node.name


def _stage_three_tests(tree: ast.AST):
    """Lines testing a ``zero_stage`` for 3 (== or !=; a range check of the setting is not a test for it)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            sides = [node.left, *node.comparators]
            names = {getattr(s, "attr", getattr(s, "id", None)) for s in sides}
            if "zero_stage" in names and any(isinstance(s, ast.Constant) and s.value == 3 for s in sides):
                yield node.lineno


def test_only_the_engine_module_knows_partitioned_parameters():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ENGINE in path.parents:
            continue
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(PACKAGE.parent)
        for line, name in _identifiers(tree):
            if name in PARTITION_NAMES or "zero3" in name.lower():
                found.append(f"{rel}:{line}: {name}")
        found += [f"{rel}:{line}: zero_stage compared with 3" for line in _stage_three_tests(tree)]
    assert not found, "ZeRO-3 outside mirai/trainer/engine/:\n" + "\n".join(found)


class _Failing(nn.Module):
    """A TrainModule stand-in whose loss raises on demand (after its forward has run)."""

    k = 0
    objective = None                                  # mode none: no foresight objective

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(4, 1)
        self.fail = False

    def forward(self, codes, labels, teacher=None, coeffs=None):
        loss = self.w(codes.float()).pow(2).mean()
        if self.fail:
            raise RuntimeError("loss failed between forward and backward")
        return loss, loss.detach(), loss.new_zeros(0)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_sync_is_restored_when_the_loss_raises(one_rank_group):
    from mirai.foresight.sources.protocol import NoTargets
    from mirai.trainer.distributed import Runtime
    from mirai.trainer.engine import PlainEngine
    from mirai.trainer.step import StepRunner

    module = _Failing()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    rt = Runtime(0, 1, 0, torch.device("cpu"), "ddp")
    engine = PlainEngine(module, optimizer, rt, accum=2, grad_clip=0.0, precision="fp32")
    optim_cfg = NS(warmup_steps=0, schedule="const", min_lr_ratio=0.0)
    runner = StepRunner(engine, NS(target_dtype="fp32"), NoTargets(), None, optim_cfg, 0.1, 10)
    batch = {"codes": torch.ones(2, 4, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}
    assert engine.wrapped.require_backward_grad_sync
    module.fail = True
    with pytest.raises(RuntimeError, match="loss failed"):
        runner.run(0, 0, [batch, batch])          # the first micro-batch runs under no_sync, then raises
    assert engine.wrapped.require_backward_grad_sync, "DDP's no_sync was left entered by the failed micro-step"
    module.fail = False
    before = module.w.weight.detach().clone()
    runner.run(0, 0, [batch, batch])
    assert not torch.equal(before, module.w.weight), "the step after the failure did not update the weights"


def test_one_reader_of_the_launcher_environment(monkeypatch):
    """Every command and the trainer read rank / world / local rank the same way (LOCAL_RANK unset: the rank)."""
    from mirai.launcher import launcher_env, local_world_size
    from mirai.trainer import distributed
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_env() == (0, 1, 0) and local_world_size(1) == 1
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launcher_env() == (3, 4, 3) and local_world_size(4) == 4
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert local_world_size(4) == 2
    assert distributed.launcher_env is launcher_env
    reads = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "launcher.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            read = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("get", "getenv") and node.args)
            if read and getattr(node.args[0], "value", None) in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                 "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
                reads.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not reads, f"the launcher's environment read outside mirai/launcher.py: {reads}"


def test_the_ema_reads_the_parameter_list_without_walking_the_model_each_step():
    """``ema_params()`` runs every step: the GPT's parameters are listed once, and a second call neither walks the
    module tree again nor hands back a list its caller could change for the next step."""
    from mirai.trainer.distributed import Runtime
    from mirai.trainer.engine import PlainEngine

    module = nn.Module()
    module.gpt = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    engine = PlainEngine(module, torch.optim.SGD(module.parameters(), lr=0.1),
                         Runtime(0, 1, 0, torch.device("cpu"), "single"), accum=1, grad_clip=0.0, precision="fp32")
    params = list(module.gpt.parameters())
    first = engine.ema_params()
    assert [n for n, _ in first] == ["0.weight", "0.bias", "1.weight", "1.bias"]

    def walked(*args, **kwargs):
        raise AssertionError("the module tree was walked again")

    module.gpt.named_parameters = walked
    first.clear()
    again = engine.ema_params()
    assert [n for n, _ in again] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert all(p is q for (_, p), q in zip(again, params))
