"""``mirai sample``: class-conditional sampling with classifier-free guidance -> PNGs, grid, .npz.

    mirai sample --ckpt runs/gpt-b_mirai_e --vq vq_ds16_c2i.pt --out samples/gpt-b_mirai_e --cfg-scale 2.0
    torchrun --nproc_per_node 8 -m mirai sample --ckpt ... --vq ... --out ... --compile

The label protocols, the files written and what ``--compile`` does: ``mirai.sampling``; docs/sampling.md.
"""
from __future__ import annotations

import argparse
import sys

from mirai.commands import HelpFormatter
from mirai.sampling import DEFAULT_LABELS, LABEL_PROTOCOLS


def parse_classes(spec: str | None, num_classes: int) -> list[int]:
    """"0,5,7" / "0-9" / "0-9,20" -> label list (None = every class)."""
    if not spec:
        return list(range(num_classes))
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            out += list(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad or not out:
        raise ValueError(f"--classes {spec!r}: labels must be in [0, {num_classes}), got {bad or 'none'}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai sample", formatter_class=HelpFormatter,
                                description="Class-conditional sampling with classifier-free guidance from a "
                                            "checkpoint: PNGs, a grid and a .npz batch for mirai eval. One process "
                                            "per GPU under torchrun.")
    p.add_argument("--ckpt", required=True, help="exported checkpoint file or training run folder")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vq", help="local VQ tokenizer checkpoint (vq_ds16_c2i.pt)")
    tok.add_argument("--tokenizer", help="a PatchKMeansTokenizer .pt file (the demo's)")
    p.add_argument("--vq-model", default="VQ-16", help="VQ architecture of --vq (VQ-16, VQ-8)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--gpt-model", default=None,
                   help="model name for checkpoints that do not store one (LlamaGen-released files, e.g. GPT-B)")
    p.add_argument("--image-size", type=int, default=None,
                   help="with --gpt-model: the image size the model was trained at (sets its token grid)")
    p.add_argument("--cfg-scale", type=float, default=2.0,
                   help="classifier-free guidance scale s: u + s (c - u) for s > 1 (LlamaGen's rule); 1 = off; "
                        "below 1 is refused")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="apply CFG only for decoding steps i with LO <= i/steps < HI")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the token sampling")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--num", type=int, default=50000, help="number of samples")
    p.add_argument("--batch-size", type=int, default=32, help="samples per generate call (per GPU)")
    p.add_argument("--labels", choices=sorted(LABEL_PROTOCOLS), default=DEFAULT_LABELS,
                   help=("class labels of the samples. random: " + LABEL_PROTOCOLS["random"] + ". balanced: "
                         + LABEL_PROTOCOLS["balanced"] + ". Default random: FID / IS comparable with the published "
                         "numbers; balanced gives lower-variance comparisons between your own runs").replace("%", "%%"))
    p.add_argument("--classes", default=None,
                   help="classes to sample, e.g. '0-9' or '1,5,7' (default all): drawn from (random) or cycled "
                        "through (balanced)")
    p.add_argument("--seed", type=int, default=0, help="random seed (see --labels for how it is used)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size-eval", type=int, default=None,
                   help="bicubic-resize samples to this side before writing (e.g. 256 for 384 px models)")
    p.add_argument("--no-png", action="store_true", help="only the .npz and the grid, no per-sample PNGs")
    p.add_argument("--grid", type=int, default=64, help="samples in grid.png")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="model dtype: auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--compile", action="store_true",
                   help="decode with fixed-shape steps on a preallocated KV cache, torch.compile(fullgraph=True) "
                        "and, on a GPU, CUDA graphs (mirai.models.static_decode); compiling takes a while once")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from mirai.checkpoint import CheckpointError, load_gpt
    from mirai.launcher import close_process_group, setup_distributed
    from mirai.models.vq import VQCheckpointError, load_tokenizer
    from mirai.sampling import sample
    try:
        if not args.cfg_scale >= 1.0:
            raise ValueError(f"--cfg-scale {args.cfg_scale}: must be >= 1 (1 = no guidance; guidance runs for "
                             "scales above 1, as in LlamaGen)")
        rank, world, device = setup_distributed(args.device)
        tokenizer = load_tokenizer(args.tokenizer or args.vq, args.vq_model, device=device)
        overrides = {}
        if args.gpt_model and args.image_size:
            overrides["block_size"] = tokenizer.grid(args.image_size) ** 2
        model = load_gpt(args.ckpt, use_ema=not args.no_ema, device=device, model_name=args.gpt_model, **overrides)
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
            args.precision, torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = model.to(device=device, dtype=dtype).eval()
        classes = parse_classes(args.classes, model.config.num_classes)
        sample(model, tokenizer, out=args.out, num=args.num, batch_size=args.batch_size, classes=classes,
               labels=args.labels, cfg_scale=args.cfg_scale, cfg_interval=tuple(args.cfg_interval),
               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
               image_size_eval=args.image_size_eval, png=not args.no_png, grid=args.grid, compile=args.compile,
               rank=rank, world=world, progress=not args.no_progress)
    except (VQCheckpointError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"mirai sample: error: {err}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
    return 0
