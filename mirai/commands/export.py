"""``mirai export``: a training run / checkpoint -> one plain file for sampling.

    mirai export --run runs/gpt-b_mirai_e --out gpt-b_mirai_e.pt
    mirai export --ckpt runs/gpt-b_mirai_e/checkpoints/step_00050000 --out step50k.pt --ema-as-model

The file is ``{"model": state dict, "ema": state dict, "model_name", "model_config", "step", "format"}``
with LlamaGen key names, plain types only and no foresight heads, teachers or optimizer state, so
LlamaGen's sampler (``torch.load(f)["model"]``, weights-only, into a GPT of the same config) and
``mirai sample`` / ``mirai.checkpoint.load_gpt`` read it; ``<out>.sha256`` beside it records its hash.
``--ema-as-model`` stores the EMA weights under "model" (the raw weights move to "raw_model") for
samplers that only read "model". The source's model.pt / ema.pt are checked against the hashes and step
its meta.json records, and weights holding NaN / Inf are refused (the error names the file and tensor).
See ``mirai.checkpoint.weights`` and docs/run-folder.md.
"""
from __future__ import annotations

import argparse
import sys

from mirai.commands import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai export", formatter_class=HelpFormatter,
                                description="Write a single-file sampling checkpoint (model + EMA, LlamaGen keys, "
                                            "no heads) from a run or a checkpoint folder.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder (its latest complete checkpoint is exported)")
    src.add_argument("--ckpt", help="checkpoint folder (runs/X/checkpoints/step_...)")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--ema-as-model", action="store_true", help="store the EMA weights under 'model' too")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the stored weights")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from mirai.checkpoint import CheckpointError, export, resolve
    try:
        ckpt = resolve(args.run or args.ckpt)
        out = export(ckpt, args.out, ema_as_model=args.ema_as_model,
                     dtype=torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    except CheckpointError as err:
        print(f"mirai export: {err}", file=sys.stderr)
        return 2
    print(f"mirai export: {ckpt} -> {out}")
    return 0
