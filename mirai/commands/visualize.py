"""``mirai visualize tsne``: the paper's picture of layer-l token representations, for one or two checkpoints.

    mirai visualize tsne --ckpt runs/gpt-b_baseline --ckpt-b runs/gpt-b_mirai_e --codes data/imagenet256 \
        --index 0 --layer 8 --vq vq_ds16_c2i.pt --out tsne.png

How the features are taken and coloured: ``mirai.figures``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mirai.commands import HelpFormatter


def _load_codes(args, tokenizer, grid: int) -> tuple[torch.Tensor, int, str]:
    if args.codes:
        from mirai.data.format import CodeStore
        store = CodeStore(args.codes)
        if not 0 <= args.index < len(store):
            raise ValueError(f"--index {args.index} out of range: {args.codes} holds {len(store)} images")
        if store.grid_size != grid:
            raise ValueError(f"{args.codes}: grid {store.grid_size} but the model's grid is {grid}")
        codes, label, _ = store.get(args.index, args.aug)
        name = f"{Path(args.codes).name}[{args.index}]"
        return codes, label if args.label is None else args.label, name
    from mirai.data.images import center_crop_arr, read_rgb
    if tokenizer is None:
        raise ValueError("--image needs --vq or --tokenizer to encode it")
    if args.label is None:
        raise ValueError("--image needs --label (the class to condition on)")
    size = grid * tokenizer.downsample
    img = center_crop_arr(read_rgb(args.image), size)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    codes = tokenizer.encode(x.to(args.device))[0]
    return codes.cpu(), args.label, Path(args.image).name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai visualize", description="Figures of the paper from checkpoints.")
    sub = p.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    t = sub.add_parser("tsne", help="t-SNE of layer-l token features drawn on the token grid",
                       description="t-SNE of one image's layer-l token features, drawn on the token grid as RGB "
                                   "(similar colours = similar representations), for one or two checkpoints.",
                       formatter_class=HelpFormatter)
    t.add_argument("--ckpt", required=True, help="baseline checkpoint (file or run folder)")
    t.add_argument("--ckpt-b", default=None, help="second checkpoint drawn next to it (Mirai)")
    t.add_argument("--title-a", default="baseline", help="title of --ckpt's panel")
    t.add_argument("--title-b", default="Mirai", help="title of --ckpt-b's panel")
    t.add_argument("--layer", type=int, default=8, help="1-based block count l (hidden state after block l)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--codes", help="code store folder (mirai prepare output)")
    src.add_argument("--image", help="an image file (needs --vq/--tokenizer and --label)")
    t.add_argument("--index", type=int, default=0, help="row of the code store")
    t.add_argument("--aug", type=int, default=0, help="augmentation of that row (0 = first crop)")
    t.add_argument("--label", type=int, default=None, help="class label (default: the store's)")
    t.add_argument("--vq", default=None, help="VQ checkpoint: also show the (decoded) image")
    t.add_argument("--tokenizer", default=None, help="PatchKMeansTokenizer file instead of --vq")
    t.add_argument("--vq-model", default="VQ-16", help="VQ architecture of --vq (VQ-16, VQ-8)")
    t.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")
    t.add_argument("--seed", type=int, default=0, help="t-SNE random state")
    t.add_argument("--device", default="cpu", help="device of the models and the tokenizer")
    t.add_argument("--out", required=True, help="output PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mirai.checkpoint import CheckpointError, load_gpt
    from mirai.data.images import to_uint8
    from mirai.figures import tsne_figure, tsne_grid
    from mirai.models.vq import VQCheckpointError, load_tokenizer
    try:
        device = torch.device(args.device)
        model_a = load_gpt(args.ckpt, use_ema=not args.no_ema, device=device).float().eval()
        model_b = None
        if args.ckpt_b:
            model_b = load_gpt(args.ckpt_b, use_ema=not args.no_ema, device=device).float().eval()
            if model_b.config.grid_size != model_a.config.grid_size:
                raise ValueError(f"{args.ckpt} and {args.ckpt_b} have different token grids")
        for m, path in ((model_a, args.ckpt), (model_b, args.ckpt_b)):
            if m is not None and not 1 <= args.layer <= m.config.n_layer:
                raise ValueError(f"--layer {args.layer}: {path} has {m.config.n_layer} blocks")
        tok_path = args.tokenizer or args.vq
        tokenizer = load_tokenizer(tok_path, args.vq_model, device=device) if tok_path else None
        g = model_a.config.grid_size
        codes, label, name = _load_codes(args, tokenizer, g)
        panels = []
        if tokenizer is not None:
            panels.append((f"{name} (class {label})", to_uint8(tokenizer.decode_code(codes[None].to(device), (g, g)))[0]))
        panels.append((f"{args.title_a}, layer {args.layer}", tsne_grid(model_a, codes, label, args.layer, args.seed)))
        if model_b is not None:
            panels.append((f"{args.title_b}, layer {args.layer}",
                           tsne_grid(model_b, codes, label, args.layer, args.seed)))
        out = tsne_figure(panels, args.out, suptitle=f"t-SNE of layer-{args.layer} token features ({g}x{g} grid)")
    except (VQCheckpointError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"mirai visualize: error: {err}", file=sys.stderr)
        return 2
    print(f"visualize: wrote {out}")
    return 0
