"""ImageNet-style class folders -> a code store (``mirai.data.format``): the work of ``mirai prepare``.

For every image: LlamaGen's extract_codes_c2i.py augmentations (``mirai.data.images.code_crops``: ADM
centre crop to ``crop_range * image_size`` then ten crops = 5 crops + the 5 crops of the mirrored
image, or with ``ten_crop=False`` the ADM centre crop to ``image_size`` and its mirror), each crop
encoded by the tokenizer (VQ-16 by default, fp32 with TF32 matmuls as LlamaGen; or a
``PatchKMeansTokenizer`` file) into uint16 codes [A, T] (T = grid**2; the grid follows the image size:
16x16 at 256 px, 24x24 at 384 px). With an ``encoder`` the frozen encoder's patch features of every crop
are stored too (bf16, [A, Tf, C]); ``mirai prepare --encoder`` builds it with
``mirai.foresight.encoders.EncoderTeacher`` so its input size and normalisation are exactly those used in
training.

Labels: class folders sorted by name -> 0..C-1 (the list is stored in meta.json as "classes").
Rows follow the sorted (class, file) order (``mirai.data.image_folder``); ``files.txt`` is the index.

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

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mirai.data.format import CodeStoreWriter, FeatureSpec
from mirai.data.image_folder import ImageFolderScan, PrepareError, scan_image_folder
from mirai.data.images import UnreadableImage, code_crops, num_augs, read_rgb
from mirai.launcher import barrier

PLAN_FILE = "prepare_plan.json"


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
# the plan: what a rerun must agree with
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


def _store_settings(scan: ImageFolderScan, images, tokenizer, encoder, spec: FeatureSpec | None, grid: int,
                    image_size: int, ten_crop: bool, crop_range: float, tokenizer_desc: str) -> tuple[dict, dict]:
    """(settings a rerun must share, extra meta.json entries) of a store."""
    settings = {"image_size": image_size, "ten_crop": ten_crop, "crop_range": crop_range,
                "grid_size": grid, "vocab_size": tokenizer.codebook_size, "tokenizer": tokenizer_desc,
                "features": None if spec is None else [spec.name, spec.dim, spec.grid_size,
                                                       int(getattr(encoder, "block_causal", 0))]}
    extra = {"classes": scan.classes, "source": str(Path(images).resolve()), "ten_crop": ten_crop,
             "crop_range": crop_range, "tokenizer": tokenizer_desc}
    if encoder is not None:
        extra["encoder_block_causal"] = int(getattr(encoder, "block_causal", 0))
        extra["encoder_input_size"] = getattr(encoder, "input_size", None)
    return settings, extra


# ---------------------------------------------------------------------------------------------
# main work
# ---------------------------------------------------------------------------------------------
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
    spec = None if encoder is None else FeatureSpec(encoder.name, int(encoder.dim), int(encoder.grid_size))
    settings, extra = _store_settings(scan, images, tokenizer, encoder, spec, grid, image_size, ten_crop,
                                      crop_range, tokenizer_desc)
    if (out / "meta.json").exists():
        _check_plan(out, _plan(scan, settings))
        if rank == 0:
            print(f"prepare: {out} is already complete (meta.json present); nothing to do")
        return {"rows": None, "skipped": [], "already_complete": True}

    writer = _open_writer(out, scan, settings, spec, extra, rank)
    pending = writer.pending()
    mine = pending[pending % world == rank]                    # rank r encodes rows i with i % world == r
    loader = DataLoader(_CropDataset(scan.root, scan.files, mine, image_size, ten_crop, crop_range),
                        batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(pending), initial=0, unit="img", desc="prepare", dynamic_ncols=True)
    labels = np.asarray(scan.labels, dtype=np.int64)
    skipped_log = out / f"skipped.rank{rank}.txt"
    t0, done_here = time.time(), 0
    for step, items in enumerate(loader):
        _encode_readable(writer, items, labels, tokenizer, encoder, encode_batch, device)
        _mark_unreadable(writer, items, spec, skipped_log)
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


def _open_writer(out: Path, scan: ImageFolderScan, settings: dict, spec: FeatureSpec | None, extra: dict,
                 rank: int) -> CodeStoreWriter:
    """Rank 0 creates (or reopens) the store and records the plan; the other ranks open it after a barrier."""
    def open_store() -> CodeStoreWriter:
        _check_plan(out, _plan(scan, settings))
        return CodeStoreWriter(out, len(scan.files), num_augs(settings["ten_crop"]), settings["grid_size"],
                               settings["vocab_size"], len(scan.classes), settings["image_size"], spec, extra)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        writer = open_store()
        for cls in scan.empty_classes:
            print(f"prepare: warning: class folder {scan.root / cls} has no images (label kept)", file=sys.stderr)
        if scan.ignored:
            print(f"prepare: ignored {len(scan.ignored)} non-image files (e.g. {scan.root / scan.ignored[0]})",
                  file=sys.stderr)
    barrier()
    if rank != 0:
        writer = open_store()
    return writer


def _encode_readable(writer: CodeStoreWriter, items, labels: np.ndarray, tokenizer, encoder, encode_batch: int,
                     device: torch.device) -> None:
    """Codes (and encoder features) of the loader items whose image could be read, written to their rows."""
    good = [(r, x) for r, x, _ in items if x is not None]
    if not good:
        return
    rows = np.array([r for r, _ in good])
    x = torch.stack([x for _, x in good]).to(device, non_blocking=True)   # [n, A, 3, S, S]
    n, a = x.shape[:2]
    flat = x.flatten(0, 1)                                                 # [n*A, 3, S, S]
    codes = torch.cat([tokenizer.encode(c) for c in flat.split(encode_batch)])  # [n*A, T]
    codes = codes.view(n, a, -1)                                           # [n, A, T]
    feats = None
    if encoder is not None:
        unit = flat.add(1).mul_(0.5).clamp_(0, 1)                          # [-1, 1] -> [0, 1]
        feats = torch.cat([encoder.targets(c) for c in unit.split(encode_batch)])  # [n*A, Tf, C]
        feats = feats.view(n, a, *feats.shape[1:])                         # [n, A, Tf, C]
    writer.write(rows, codes, labels[rows], feats)


def _mark_unreadable(writer: CodeStoreWriter, items, spec: FeatureSpec | None, skipped_log: Path) -> None:
    """Rows of unreadable images: label -1 (dropped when the store is finalised), reported and logged."""
    bad = [(r, e) for r, x, e in items if x is None]
    if not bad:
        return
    rows = np.array([r for r, _ in bad])
    _, a, t = writer.codes.shape
    zeros = np.zeros((len(rows), a, t), dtype=np.uint16)
    feats = None
    if spec is not None:
        feats = torch.zeros(len(rows), a, spec.grid_size ** 2, spec.dim, dtype=torch.bfloat16)
    writer.write(rows, zeros, np.full(len(rows), -1, dtype=np.int64), feats)   # -1 marks "skipped"
    with open(skipped_log, "a") as f:
        for _, e in bad:
            print(f"prepare: skipping {e}", file=sys.stderr)
            f.write(e.replace("\n", " ") + "\n")


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
