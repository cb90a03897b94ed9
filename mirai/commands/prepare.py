"""``mirai prepare``: ImageNet-style class folders -> a code store for training.

    mirai prepare --images IMAGENET/train --out data/imagenet256 --vq vq_ds16_c2i.pt
    torchrun --nproc_per_node 8 -m mirai prepare --images ... --out ... --vq ... --encoder dinov2_vitb14 \\
        --encoder-weights dinov2_vitb14.pth

What is written, the augmentations, resuming and bad inputs: ``mirai.data.prepare``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mirai.commands import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai prepare", formatter_class=HelpFormatter,
                                description="Encode an ImageNet-style image folder (IMAGES/<class>/<image>) into a "
                                            "code store: VQ codes of every augmentation, optionally with a frozen "
                                            "encoder's patch features. Resumable; one process per GPU under "
                                            "torchrun.")
    p.add_argument("--images", required=True, help="ImageNet-style folder: IMAGES/<class>/<image>")
    p.add_argument("--out", required=True, help="code store folder to write (resumed if partly written)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vq", help="local VQ tokenizer checkpoint (LlamaGen's vq_ds16_c2i.pt)")
    tok.add_argument("--tokenizer", help="a PatchKMeansTokenizer .pt file (the demo's tokenizer)")
    p.add_argument("--vq-model", default="VQ-16", help="VQ architecture of --vq (VQ-16, VQ-8)")
    p.add_argument("--image-size", type=int, default=256, help="crop side in pixels (grid = size / downsample)")
    p.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="ten crops (10 augs) of the ADM crop to crop-range x size; else centre crop + flip (2)")
    p.add_argument("--crop-range", type=float, default=1.1, help="ADM centre crop to this x image size before ten-crop")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (x augs crops)")
    p.add_argument("--encode-batch", type=int, default=64, help="crops per tokenizer / encoder call")
    p.add_argument("--num-workers", type=int, default=4, help="data loader worker processes")
    p.add_argument("--encoder", default=None, help="also store this encoder's patch features (e.g. dinov2_vitb14)")
    p.add_argument("--encoder-weights", default=None, help="local weights of --encoder")
    p.add_argument("--encoder-block-causal", type=int, default=0,
                   help="block-causal attention mask of this block size inside the encoder (0 = off)")
    p.add_argument("--limit-per-class", type=int, default=None, help="first N images of each class only")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.encoder_weights and not args.encoder:
        print("mirai prepare: --encoder-weights given without --encoder", file=sys.stderr)
        return 2
    import torch

    from mirai.data.image_folder import PrepareError, scan_image_folder
    from mirai.data.prepare import prepare
    from mirai.launcher import close_process_group, setup_distributed
    from mirai.models.vq import VQCheckpointError, load_tokenizer
    try:
        scan_image_folder(args.images, args.limit_per_class)       # refuse bad folders before any loading
        rank, world, device = setup_distributed(args.device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True   # as LlamaGen's extraction
            torch.backends.cudnn.allow_tf32 = True
        path = args.tokenizer or args.vq
        tokenizer = load_tokenizer(path, args.vq_model, device=device)
        encoder = None
        if args.encoder:
            from mirai.foresight.encoders import EncoderTeacher
            grid = tokenizer.grid(args.image_size)
            encoder = EncoderTeacher(args.encoder, args.encoder_weights, grid,
                                     block_causal=args.encoder_block_causal).to(device)
        desc = f"{'kmeans' if args.tokenizer else args.vq_model}:{Path(path).resolve()}"
        summary = prepare(args.images, args.out, tokenizer, image_size=args.image_size, ten_crop=args.ten_crop,
                          crop_range=args.crop_range, batch_size=args.batch_size, num_workers=args.num_workers,
                          encoder=encoder, limit_per_class=args.limit_per_class, encode_batch=args.encode_batch,
                          device=device, rank=rank, world=world, tokenizer_desc=desc,
                          progress=not args.no_progress)
    except (PrepareError, VQCheckpointError, FileNotFoundError, ValueError) as err:
        print(f"mirai prepare: error: {err}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
    return 0 if summary is not None else 1
