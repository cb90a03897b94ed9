"""The package's layering (docs/architecture.md): imports only go downward.

Every ``import mirai...`` in the package, at module level or inside a function, is read from the source (AST), and
each importing unit must sit above the unit it imports in ``LAYERS``. Commands (``mirai.commands.<name>``) import
the library and the ``mirai.commands`` package itself, never another command; the library never imports a
command. ``mirai --help`` loads neither torch nor any command.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mirai"

# Bottom first. A unit may import itself and any unit listed before it.
LAYERS = [
    "mirai",                # the package: version, lazy access to the extension
    "mirai._C",             # the compiled extension (csrc/)
    "mirai._ext",           # loader of the compiled extension (mirai._C)
    "mirai.io",             # weights-only torch files, state-dict helpers, .npz writing
    "mirai.launcher",       # rank / world / device of a data-parallel command
    "mirai.ops",            # kernels: raw op -> autograd function -> documented function
    "mirai.models",         # GPT, PAR, VQ tokenizers, decoding
    "mirai.optim",          # AdamW + EMA, the model EMA
    "mirai.data",           # code stores, loaders, images, prepare
    "mirai.checkpoint",     # training and weights checkpoints
    "mirai.metrics",        # FID / IS / precision / recall, FLOPs
    "mirai.sampling",       # class-conditional sampling to PNGs and .npz
    "mirai.figures",        # t-SNE figures
    "mirai.foresight",      # the Mirai objective: heads, neighbours, sources
    "mirai.config",         # the run config: sections, loading, validation
    "mirai.trainer",        # engines, the step, the run
    "mirai.commands",       # the commands of `mirai <command>`
    "mirai.cli",            # the `mirai` entry point
    "mirai.__main__",       # python -m mirai
]


def unit_of(module: str) -> str:
    """The layer unit of a dotted module name: ``mirai.trainer.step`` -> ``mirai.trainer``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of a ``mirai`` module in the file, functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mirai"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; the package uses absolute imports"
            if node.module and node.module.split(".")[0] == "mirai":
                # `from mirai import _ext` imports the module mirai._ext; `from mirai.x import name` imports mirai.x
                found += [(node.lineno, f"{node.module}.{a.name}" if node.module == "mirai" else node.module)
                          for a in node.names]
    return found


def violations(edges: list[tuple[str, int, str, str]]) -> list[str]:
    """The edges (file, line, importer module, imported module) that break the layering, as messages."""
    rank = {u: i for i, u in enumerate(LAYERS)}
    bad = []
    for file, line, src, dst in edges:
        su, du = unit_of(src), unit_of(dst)
        if su not in rank or du not in rank:
            bad.append(f"{file}:{line}: {src} -> {dst}: unit {su if su not in rank else du} is not in LAYERS")
        elif su == "mirai.commands" and du == "mirai.commands":
            own = ".".join(src.split(".")[:3])                 # mirai.commands.<name>
            if dst not in ("mirai.commands", own) and not dst.startswith(own + "."):
                bad.append(f"{file}:{line}: command {src} imports another command ({dst})")
        elif rank[du] > rank[su]:
            bad.append(f"{file}:{line}: {src} -> {dst} imports upward ({su} is below {du})")
    return bad


def package_edges() -> list[tuple[str, int, str, str]]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        edges += [(str(path.relative_to(ROOT)), line, src, dst) for line, dst in imported_modules(path)]
    return edges


def test_every_package_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units - set(LAYERS) == set(), "add new top-level modules to LAYERS (and docs/architecture.md)"
    assert set(LAYERS) - units - {"mirai._C"} == set(), "LAYERS names a unit that no longer exists"


def test_imports_only_go_downward():
    edges = package_edges()
    assert len(edges) > 100                                     # the walk did find the package's imports
    assert violations(edges) == []


def test_the_checker_sees_upward_imports_and_commands_importing_commands():
    assert violations([("f.py", 1, "mirai.models.gpt", "mirai.trainer.step")])          # upward
    assert violations([("f.py", 1, "mirai.commands.sample", "mirai.commands.prepare")])  # command -> command
    assert violations([("f.py", 1, "mirai.ops.foresight", "mirai.foresight.heads")])     # a former cycle
    assert not violations([("f.py", 1, "mirai.commands.demo.runs", "mirai.commands.demo.data")])
    assert not violations([("f.py", 1, "mirai.commands.train", "mirai.commands")])
    assert not violations([("f.py", 1, "mirai.trainer.step", "mirai.models.gpt")])


def test_benchmarks_import_the_library_never_a_command():
    paths = sorted((ROOT / "benchmarks").rglob("*.py"))
    assert paths
    for path in paths:
        for line, dst in imported_modules(path):
            assert not dst.startswith("mirai.commands"), f"{path}:{line}: a benchmark imports a command ({dst})"


def test_mirai_help_loads_neither_torch_nor_a_command():
    code = ("import sys, mirai.cli; rc = mirai.cli.main(['--help']); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('mirai.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: mirai <command>" in out.stdout and "train" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["--local_rank=3", "train", "--help"], ["--local-rank", "1", "train", "--help"]])
def test_the_deepspeed_launchers_local_rank_argument_is_dropped(argv):
    from mirai.cli import drop_launcher_options
    assert drop_launcher_options(argv) == ["train", "--help"]
