"""``mirai eval``: FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch.

    mirai eval --samples runs/samples/samples.npz --ref VIRTUAL_imagenet256_labeled.npz

The protocol, the inputs and what is written: ``mirai.metrics.evaluation``.
"""
from __future__ import annotations

import argparse
import sys

from mirai.commands import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai eval", formatter_class=HelpFormatter,
                                description="FID, sFID, Inception Score, precision and recall of a sample batch "
                                            "against a reference batch (the ADM evaluation protocol).")
    p.add_argument("--samples", required=True, help="sample batch .npz (arr_0: uint8 [N, H, W, 3])")
    p.add_argument("--ref", required=True, help="reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    p.add_argument("--inception-weights", default=None,
                   help="local weights-inception-2015-12-05-6726825d.pth (default: $MIRAI_INCEPTION_WEIGHTS, "
                        "then the torch hub cache)")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception batch")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="metrics JSON (default: <samples>.metrics.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mirai.metrics.evaluation import evaluate
    from mirai.metrics.inception import InceptionWeightsMissing
    try:
        m = evaluate(args.samples, args.ref, args.inception_weights, args.batch_size, args.device, args.out,
                     progress=not args.no_progress)
    except (InceptionWeightsMissing, ValueError) as err:        # NpzError, EvalInputError: ValueErrors
        print(f"mirai eval: error: {err}", file=sys.stderr)
        return 2

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"
    print(f"Inception Score: {fmt(m['inception_score'])}\nFID: {fmt(m['fid'])}\nsFID: {fmt(m['sfid'])}\n"
          f"Precision: {fmt(m['precision'])}\nRecall: {fmt(m['recall'])}\nwritten to {m['json']}")
    return 0
