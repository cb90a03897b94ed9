"""The ``mirai`` command: one entry point, one module per command (``mirai.commands``).

    mirai <command> [options]                    (the console script)
    python -m mirai <command> [options]          (the same program; what the launchers run)
    torchrun --nproc_per_node 8 -m mirai train --config X
    deepspeed --num_gpus 8 --module mirai train --config X

Each command's module has its own argparse parser and ``main(argv: list[str] | None) -> int``; it is imported
only when it runs, so ``mirai --help`` (and an unknown command) loads neither torch nor any command. The
deepspeed launcher runs ``python -u -m mirai --local_rank=N train ...``: a ``--local_rank`` /
``--local-rank`` argument before the command name is accepted and dropped (the environment's LOCAL_RANK,
which the launchers also set, is what the commands read).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("mirai.commands.train", "train a model (single process, deepspeed or torchrun launcher)"),
    "prepare": ("mirai.commands.prepare", "image folders -> VQ codes (+ encoder features) for training"),
    "synthetic": ("mirai.commands.synthetic", "a small synthetic code store (debug config, tests, benchmarks)"),
    "sample": ("mirai.commands.sample", "class-conditional sampling with CFG: PNGs, grid and .npz"),
    "eval": ("mirai.commands.evaluate", "FID, sFID, IS, precision and recall of a sample .npz"),
    "visualize": ("mirai.commands.visualize", "figures from the paper (t-SNE of layer-l features)"),
    "flops": ("mirai.commands.flops", "per-image training FLOPs of a model and mode"),
    "export": ("mirai.commands.export", "training checkpoint -> single-file LlamaGen-style checkpoint"),
    "demo": ("mirai.commands.demo", "the embedded demo: digits, baseline vs Mirai-E vs Mirai-I, several seeds, report"),
}
LAUNCHER_OPTIONS = ("--local_rank", "--local-rank")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mirai <command> [options]", "       python -m mirai <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {helptext}" for name, (_, helptext) in COMMANDS.items()]
    lines += ["", "'mirai <command> --help' for a command's options."]
    return "\n".join(lines)


def drop_launcher_options(argv: list[str]) -> list[str]:
    """``argv`` without the launcher's ``--local_rank=N`` / ``--local-rank=N`` / ``--local_rank N`` arguments
    before the command name (the deepspeed launcher puts them between ``-m mirai`` and the command)."""
    argv = list(argv)
    while argv:
        head = argv[0]
        if head.split("=", 1)[0] in LAUNCHER_OPTIONS and "=" in head:
            argv = argv[1:]
        elif head in LAUNCHER_OPTIONS:
            argv = argv[2:] if len(argv) > 1 and argv[1].lstrip("-").isdigit() else argv[1:]
        else:
            break
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = drop_launcher_options(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mirai: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)
