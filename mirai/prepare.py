"""``mirai prepare``: ImageNet-style class folders -> a code store (``mirai.data.format``).

For every image: LlamaGen's extract_codes_c2i.py augmentations (``mirai.images.code_crops``: ADM
centre crop to ``crop_range * image_size`` then ten crops = 5 crops + the 5 crops of the mirrored
image, or with ``--no-ten-crop`` the ADM centre crop to ``image_size`` and its mirror), each crop
encoded by the tokenizer (VQ-16 by default, fp32 with TF32 matmuls as LlamaGen; or a
``PatchKMeansTokenizer`` file via ``--tokenizer``) into uint16 codes [A, T] (T = grid**2; the grid
follows the image size: 16x16 at 256 px, 24x24 at 384 px). With ``--encoder NAME --encoder-weights
PATH`` the frozen encoder's patch features of every crop are stored too (bf16, [A, Tf, C]), built
by ``mirai.foresight.encoders.EncoderTeacher`` so its input size and normalisation are exactly
those used in training.

Labels: class folders sorted by name -> 0..C-1 (the list is stored in meta.json as "classes").
Rows follow the sorted (class, file) order; ``files.txt`` is the index.

Resumable: the store's ``done`` flags record finished rows; a rerun skips them (and refuses if the
folder contents or settings changed, see ``prepare_plan.json``). Multi-GPU: under ``torchrun``
rank r encodes pending rows i with i % world == r into the shared memory-mapped arrays (one
machine, or a filesystem with coherent shared mmap writes); rank 0 finalises after a barrier.

Bad inputs: an unreadable image is reported (file and error), its row marked with label -1 and,
at the end, dropped by compacting the store (rare: ImageNet has none); the summary lists every
skipped file, and meta.json keeps the list ("skipped"). An empty or class-less folder, or a wrong
tokenizer checkpoint, is refused before any work with a message naming the folder or file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from mirai.data.format import CodeStoreWriter, FeatureSpec
from mirai.images import IMG_EXTENSIONS, UnreadableImage, code_crops, num_augs, read_rgb

PLAN_FILE = "prepare_plan.json"


class PrepareError(ValueError):
    """Refused input (names the folder or file)."""


# ---------------------------------------------------------------------------------------------
# folder scan
# ---------------------------------------------------------------------------------------------
@dataclass
class ImageFolderScan:
    root: Path
    classes: list[str]                      # sorted class folder names; label = index
    files: list[str]                        # image paths relative to root, in row order
    labels: list[int]                       # label of each file
    ignored: list[str] = field(default_factory=list)       # non-image files (by extension)
    empty_classes: list[str] = field(default_factory=list)  # class folders without images


def scan_image_folder(root: str | os.PathLike, limit_per_class: int | None = None) -> ImageFolderScan:
    """Class folders (sorted) -> sorted image files of each; refuses empty / class-less folders."""
    root = Path(root)
    if not root.is_dir():
        raise PrepareError(f"{root}: no such image folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise PrepareError(f"{root}: no class folders (expected ImageNet layout ROOT/<class>/<image>)")
    scan = ImageFolderScan(root, classes, [], [])
    for label, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                (found if name.lower().endswith(IMG_EXTENSIONS) else scan.ignored).append(rel)
        found.sort()
        if limit_per_class is not None:
            found = found[:limit_per_class]
        if not found:
            scan.empty_classes.append(cls)
        scan.files += found
        scan.labels += [label] * len(found)
    if not scan.files:
        raise PrepareError(f"{root}: {len(classes)} class folders but no images "
                           f"(extensions {', '.join(IMG_EXTENSIONS)})")
    return scan


# ---------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------
class _CropDataset(Dataset):
    """Row index -> (row, crops [A, 3, S, S] in [-1, 1] or None, error message)."""

    def __init__(self, root: Path, files: list[str], rows: np.ndarray, image_size: int, ten_crop: bool,
                 crop_range: float):
        self.root, self.files, self.rows = root, files, rows
        self.image_size, self.ten_crop, self.crop_range = image_size, ten_crop, crop_range

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        row = int(self.rows[j])
        try:
            img = read_rgb(self.root / self.files[row])
            return row, code_crops(img, self.image_size, self.ten_crop, self.crop_range), ""
        except UnreadableImage as err:
            return row, None, str(err)
        except Exception as err:  # noqa: BLE001 - e.g. a degenerate image size; reported, not fatal
            return row, None, f"{self.root / self.files[row]}: {type(err).__name__}: {err}"


def _collate(items):
    return items


# ---------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------
def setup_distributed(device_arg: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world, device) from the torchrun environment; creates the process group when world > 1
    (nccl on CUDA, gloo on CPU). Also used by ``mirai sample``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# main work
# ---------------------------------------------------------------------------------------------
def _plan(scan: ImageFolderScan, settings: dict) -> dict:
    digest = hashlib.sha256()
    for f, y in zip(scan.files, scan.labels):
        digest.update(f"{y}\t{f}\n".encode())
    return {"num_files": len(scan.files), "files_sha256": digest.hexdigest(), **settings}


def _check_plan(out: Path, plan: dict) -> None:
    path = out / PLAN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if diff:
            raise PrepareError(f"{path}: an earlier run into {out} used different inputs or settings "
                               f"({', '.join(diff)}); remove {out} to start over")
    else:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan, indent=2))
        os.replace(tmp, path)


def prepare(images: str | os.PathLike, out: str | os.PathLike, tokenizer, *, image_size: int = 256,
            ten_crop: bool = True, crop_range: float = 1.1, batch_size: int = 32, num_workers: int = 4,
            encoder=None, limit_per_class: int | None = None, encode_batch: int = 64,
            device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
            tokenizer_desc: str = "", progress: bool = True) -> dict:
    """Encode an image folder into a code store at ``out``; returns a summary dict (rank 0: final).

    ``tokenizer``: a ``mirai.models.vq.Tokenizer`` already on ``device``; ``encoder``: an
    ``EncoderTeacher`` (or anything with ``targets(images in [0, 1]) -> [B, Tf, C]``, ``name``,
    ``dim``, ``grid_size``) or None.
    """
    device = torch.device(device)
    out = Path(out)
    scan = scan_image_folder(images, limit_per_class)
    grid = tokenizer.grid(image_size)
    if tokenizer.codebook_size > 65536:
        raise PrepareError(f"tokenizer codebook of {tokenizer.codebook_size} codes does not fit uint16 codes")
    a = num_augs(ten_crop)
    spec = None if encoder is None else FeatureSpec(encoder.name, int(encoder.dim), int(encoder.grid_size))
    settings = {"image_size": image_size, "ten_crop": ten_crop, "crop_range": crop_range,
                "grid_size": grid, "vocab_size": tokenizer.codebook_size, "tokenizer": tokenizer_desc,
                "features": None if spec is None else [spec.name, spec.dim, spec.grid_size,
                                                       int(getattr(encoder, "block_causal", 0))]}
    extra = {"classes": scan.classes, "source": str(Path(images).resolve()), "ten_crop": ten_crop,
             "crop_range": crop_range, "tokenizer": tokenizer_desc}
    if encoder is not None:
        extra["encoder_block_causal"] = int(getattr(encoder, "block_causal", 0))
        extra["encoder_input_size"] = getattr(encoder, "input_size", None)

    if (out / "meta.json").exists():
        _check_plan(out, _plan(scan, settings))
        if rank == 0:
            print(f"prepare: {out} is already complete (meta.json present); nothing to do")
        return {"rows": None, "skipped": [], "already_complete": True}

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _check_plan(out, _plan(scan, settings))
        writer = CodeStoreWriter(out, len(scan.files), a, grid, tokenizer.codebook_size, len(scan.classes),
                                 image_size, spec, extra)
        for cls in scan.empty_classes:
            print(f"prepare: warning: class folder {scan.root / cls} has no images (label kept)", file=sys.stderr)
        if scan.ignored:
            print(f"prepare: ignored {len(scan.ignored)} non-image files (e.g. {scan.root / scan.ignored[0]})",
                  file=sys.stderr)
    barrier()
    if rank != 0:
        _check_plan(out, _plan(scan, settings))
        writer = CodeStoreWriter(out, len(scan.files), a, grid, tokenizer.codebook_size, len(scan.classes),
                                 image_size, spec, extra)

    pending = writer.pending()
    mine = pending[pending % world == rank]
    labels = np.asarray(scan.labels, dtype=np.int64)
    skipped_log = out / f"skipped.rank{rank}.txt"
    loader = DataLoader(_CropDataset(scan.root, scan.files, mine, image_size, ten_crop, crop_range),
                        batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(pending), initial=0, unit="img", desc="prepare", dynamic_ncols=True)
    t0, done_here = time.time(), 0
    for step, items in enumerate(loader):
        good = [(r, x) for r, x, e in items if x is not None]
        bad = [(r, e) for r, x, e in items if x is None]
        if good:
            rows = np.array([r for r, _ in good])
            x = torch.stack([x for _, x in good]).to(device, non_blocking=True)   # [n, A, 3, S, S]
            n = x.shape[0]
            flat = x.flatten(0, 1)                                                 # [n*A, 3, S, S]
            codes = torch.cat([tokenizer.encode(c) for c in flat.split(encode_batch)])  # [n*A, T]
            codes = codes.view(n, a, grid * grid)                                  # [n, A, T]
            feats = None
            if encoder is not None:
                unit = flat.add(1).mul_(0.5).clamp_(0, 1)                          # [-1, 1] -> [0, 1]
                feats = torch.cat([encoder.targets(c) for c in unit.split(encode_batch)])  # [n*A, Tf, C]
                feats = feats.view(n, a, *feats.shape[1:])                         # [n, A, Tf, C]
            writer.write(rows, codes, labels[rows], feats)
        if bad:
            rows = np.array([r for r, _ in bad])
            zeros = np.zeros((len(rows), a, grid * grid), dtype=np.uint16)
            feats = None
            if spec is not None:
                feats = torch.zeros(len(rows), a, spec.grid_size ** 2, spec.dim, dtype=torch.bfloat16)
            writer.write(rows, zeros, np.full(len(rows), -1, dtype=np.int64), feats)   # -1 marks "skipped"
            with open(skipped_log, "a") as f:
                for _, e in bad:
                    print(f"prepare: skipping {e}", file=sys.stderr)
                    f.write(e.replace("\n", " ") + "\n")
        done_here += len(items)
        if step % 50 == 49:
            _flush(writer)
        if bar is not None:
            bar.update(len(items) * world)
    _flush(writer)
    if bar is not None:
        bar.close()
    elapsed = time.time() - t0
    barrier()
    summary = {"rows": None, "skipped": [], "images_per_s_rank": done_here / max(elapsed, 1e-9)}
    if rank == 0:
        summary.update(_finalize(out, writer, scan, spec, extra))
    barrier()
    return summary


def _flush(writer: CodeStoreWriter) -> None:
    for arr in (writer.codes, writer.labels, writer.done, writer.features):
        if arr is not None:
            arr.flush()


def _finalize(out: Path, writer: CodeStoreWriter, scan: ImageFolderScan, spec, extra: dict) -> dict:
    """Rank 0: collect the skip logs, compact away skipped rows if any, write meta.json."""
    skipped = []
    for log in sorted(out.glob("skipped.rank*.txt")):
        skipped += [line for line in log.read_text().splitlines() if line.strip()]
    labels = np.asarray(writer.labels)
    bad = np.flatnonzero(labels < 0)
    keep = np.flatnonzero(labels >= 0)
    files = [scan.files[i] for i in keep]
    if len(keep) == 0:
        raise PrepareError(f"{scan.root}: none of the {len(scan.files)} images could be read "
                           f"(first error: {skipped[0] if skipped else '?'})")
    if len(bad):
        _compact(out, writer, keep, spec, {**extra, "skipped": skipped}, files)
    else:
        writer.meta["skipped"] = skipped
        writer.finalize(files)
    (out / "skipped.txt").write_text("".join(s + "\n" for s in skipped))
    for log in out.glob("skipped.rank*.txt"):
        log.unlink()
    print(f"prepare: wrote {len(keep)} images x {writer.codes.shape[1]} augs x {writer.codes.shape[2]} tokens "
          f"to {out}" + (f"; skipped {len(skipped)} unreadable images:" if skipped else ""))
    for s in skipped:
        print(f"  skipped {s}")
    return {"rows": int(len(keep)), "skipped": skipped}


def _compact(out: Path, writer: CodeStoreWriter, keep: np.ndarray, spec, extra: dict, files: list[str]) -> None:
    """Rewrite the store without the skipped rows (into out/.compact, then moved over)."""
    tmp = out / ".compact"
    if tmp.exists():
        for f in tmp.iterdir():
            f.unlink()
    m = writer.meta
    new = CodeStoreWriter(tmp, len(keep), m["num_aug"], m["grid_size"], m["vocab_size"], m["num_classes"],
                          m["image_size"], spec, extra)
    for lo in range(0, len(keep), 4096):
        rows = keep[lo:lo + 4096]
        dst = np.arange(lo, lo + len(rows))
        new.codes[dst] = writer.codes[rows]
        new.labels[dst] = writer.labels[rows]
        if spec is not None:
            new.features[dst] = writer.features[rows]
        new.done[dst] = True
    new.finalize(files)
    for name in ("codes.npy", "labels.npy", "done.npy", "features.npy", "files.txt", "meta.json"):
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    tmp.rmdir()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0 if summary is not None else 1


if __name__ == "__main__":
    sys.exit(main())
