"""The ``mirai`` command: one entry point, one module per subcommand.

Each subcommand's module has ``main(argv: list[str] | None) -> int`` and its
own argparse parser, so ``python -m mirai.train`` and ``mirai train`` are the
same program (the deepspeed and torchrun launchers need the ``-m`` form).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("mirai.train", "train a model (single process, deepspeed or torchrun launcher)"),
    "prepare": ("mirai.prepare", "image folders -> VQ codes (+ encoder features) for training"),
    "sample": ("mirai.sample", "class-conditional sampling with CFG: PNGs, grid and .npz"),
    "eval": ("mirai.evaluate", "FID, sFID, IS, precision and recall of a sample .npz"),
    "visualize": ("mirai.visualize", "figures from the paper (t-SNE of layer-l features)"),
    "flops": ("mirai.flops", "per-image training FLOPs of a model and mode"),
    "export": ("mirai.export", "training checkpoint -> single-file LlamaGen-style checkpoint"),
    "demo": ("mirai.demo", "the embedded demo: digits, baseline vs Mirai-E, report"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mirai <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {helptext}" for name, (_, helptext) in COMMANDS.items()]
    lines += ["", "'mirai <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mirai: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
