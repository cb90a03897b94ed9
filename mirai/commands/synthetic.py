"""``mirai synthetic``: write a small synthetic code store (random codes with a little class structure).

    mirai synthetic --out runs/debug_codes          # the store configs/debug.yaml trains on

For smoke tests of the trainer, the debug config and the benchmarks; what it holds: ``mirai.data.synthetic``.
"""
from __future__ import annotations

import argparse

from mirai.commands import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai synthetic", formatter_class=HelpFormatter,
                                description="Write a small synthetic code store (tests, configs/debug.yaml, "
                                            "benchmarks): random codes, each class drawing mostly from its own "
                                            "window of the vocabulary, optionally random encoder features.")
    p.add_argument("--out", required=True, help="code store folder to write")
    p.add_argument("--num-images", type=int, default=256, help="images (rows) in the store")
    p.add_argument("--grid-size", type=int, default=4, help="token grid side (T = grid_size**2 tokens per image)")
    p.add_argument("--vocab-size", type=int, default=64, help="codebook size")
    p.add_argument("--num-classes", type=int, default=10, help="class labels")
    p.add_argument("--num-aug", type=int, default=2, help="augmentations per image")
    p.add_argument("--features-dim", type=int, default=None, help="also write random bf16 features of this width")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from mirai.data.synthetic import write_synthetic_store
    root = write_synthetic_store(a.out, a.num_images, a.grid_size, a.vocab_size, a.num_classes, a.num_aug,
                                 a.features_dim, a.seed)
    print(f"wrote {root}")
    return 0
