"""``mirai sample``: class-conditional sampling with classifier-free guidance -> PNGs, grid, .npz.

Loads only the AR model (``mirai.checkpoint.load_gpt``: EMA weights by default; foresight heads
and teachers are never loaded) and the tokenizer, then for each batch draws token grids with the
model's KV-cache decoding (CFG ``u + s (c - u)`` for s > 1, as LlamaGen; s < 1 is refused; optional CFG
interval, temperature, top-k, top-p), decodes them with the tokenizer in fp32 and converts to uint8
exactly as LlamaGen does (clamp(127.5 x + 128)), optionally bicubic-resized to ``--image-size-eval``
(384 px -> 256 for the ImageNet-256 reference batch). On GPU the model runs in bf16 (``--precision``).
``--compile`` decodes with ``mirai.models.static_decode.StaticDecoder``: fixed-shape steps on a
preallocated full-length KV cache, compiled with ``torch.compile(fullgraph=True)`` and replayed as CUDA
graphs on a GPU; same random numbers as the eager decoder, so the same tokens up to float rounding.

Labels (``--labels``, see ``LABEL_PROTOCOLS``):
  * ``random`` (default): LlamaGen's ``sample_c2i_ddp.py`` protocol, the one behind LlamaGen's and the
    released Mirai code's published FID / IS: rank r of W seeds one generator with ``seed * W + r`` and,
    for each of ceil(num / (batch * W)) rounds, draws ``batch`` labels uniformly
    (``torch.randint(0, C, (batch,))``, C = number of classes in ``--classes``) and then the batch's tokens
    from the same generator; sample ``i`` of rank r in round k is image ``k * batch * W + i * W + r``, and
    images from ``num`` on are dropped. The images depend on the number of processes, as LlamaGen's do.
  * ``balanced``: sample i gets ``classes[i % len(classes)]`` (exactly 50 per class for 50,000 samples);
    batch b (of ``--batch-size`` samples) is drawn with a generator seeded from (seed, b) and rank r draws
    the batches b with b % W == r, so the images do not depend on the number of processes.
The protocol and the other settings are recorded in the .npz (``sample_settings``, a JSON string) and in
``sample_stats.json``.

Multi-GPU (torchrun): each rank writes its images into its own shard (``OUT/.shards/rank{r}.npy``, labels
beside it); rank 0 then streams the shards, in sample order, into ``OUT/samples.npz`` (``arr_0`` uint8
[N, H, W, 3] as the ADM evaluator reads it, ``arr_1`` int64 labels, ``sample_settings``) without holding
all images in memory. Also written: ``OUT/images/{i:06d}.png`` (unless ``--no-png``), ``OUT/grid.png``
(the first ``--grid`` samples) and ``OUT/sample_stats.json`` (images/s end to end, and of the AR token
generation alone, plus the settings).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mirai.images import save_grid, to_uint8
from mirai.prepare import barrier, setup_distributed


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


LABEL_PROTOCOLS = {
    "random": "uniform labels drawn per batch from a per-rank generator seeded seed * world + rank (LlamaGen's "
              "sample_c2i_ddp.py; the protocol of LlamaGen's and the released Mirai code's FID)",
    "balanced": "sample i gets classes[i % len(classes)] (50 per class for 50,000); independent of the world size",
}
DEFAULT_LABELS = "random"     # the published numbers were measured this way: FID / IS comparable with them


def batch_plan(labels: str, num: int, batch_size: int, world: int, rank: int) -> list[np.ndarray]:
    """Global sample indices of each batch rank ``rank`` draws, in drawing order (int64 arrays). ``random``
    batches are always full; their entries >= num are drawn (the random numbers stay LlamaGen's) and dropped."""
    if labels == "balanced":
        n_batches = math.ceil(num / batch_size)
        return [np.arange(b * batch_size, min(num, (b + 1) * batch_size))
                for b in range(n_batches) if b % world == rank]
    if labels == "random":
        per_round = batch_size * world
        return [k * per_round + np.arange(batch_size) * world + rank for k in range(math.ceil(num / per_round))]
    raise ValueError(f"--labels must be one of {sorted(LABEL_PROTOCOLS)}, got {labels!r}")


def write_npz_streaming(path: Path, images_iter, shape: tuple[int, ...], extra: dict[str, np.ndarray]) -> Path:
    """Write ``arr_0`` (uint8 ``shape``) chunk by chunk plus small ``extra`` arrays into an .npz."""
    tmp = path.with_suffix(".npz.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": tuple(shape)}
            np.lib.format.write_array_header_1_0(f, header)
            written = 0
            for chunk in images_iter:
                f.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
                written += len(chunk)
            if written != shape[0]:
                raise RuntimeError(f"{path}: wrote {written} images, expected {shape[0]}")
        for key, arr in extra.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
    tmp.replace(path)
    return path


def sample(model, tokenizer, *, out: str | Path, num: int, batch_size: int = 32, classes: list[int] | None = None,
           labels: str = DEFAULT_LABELS, cfg_scale: float = 2.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           image_size_eval: int | None = None, png: bool = True, grid: int = 64, compile: bool | str = False,
           rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Draw ``num`` samples into ``out`` (see the module docstring); returns the stats dict (rank 0).
    ``compile``: decode with ``StaticDecoder(compile=compile)`` (True: inductor, or a torch.compile backend name)."""
    out = Path(out)
    device = model.output.weight.device
    cfg = model.config
    classes = list(range(cfg.num_classes)) if classes is None else classes
    g = cfg.grid_size
    img_size = g * tokenizer.downsample
    size = image_size_eval or img_size
    if tokenizer.codebook_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.codebook_size} codes but the model's vocab_size is "
                         f"{cfg.vocab_size}: wrong --vq/--tokenizer for this checkpoint")
    plan = batch_plan(labels, num, batch_size, world, rank)                        # global indices per batch
    my_count = sum(int((idx < num).sum()) for idx in plan)
    settings = {"labels": labels, "seed": seed, "world_size": world, "batch_size": batch_size, "num": num,
                "cfg_scale": cfg_scale, "cfg_interval": list(cfg_interval), "temperature": temperature,
                "top_k": top_k, "top_p": top_p, "classes": len(classes), "compile": compile,
                "image_size": img_size, "image_size_eval": size}
    shards = out / ".shards"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        shards.mkdir(exist_ok=True)
        if png:
            (out / "images").mkdir(exist_ok=True)
    barrier()
    shard = np.lib.format.open_memmap(shards / f"rank{rank}.npy", mode="w+", dtype=np.uint8,
                                      shape=(my_count, size, size, 3))
    shard_labels = np.zeros(my_count, dtype=np.int64)
    class_table = torch.tensor(classes, dtype=torch.long, device=device)
    generate = model.generate
    if compile:
        from mirai.models.static_decode import StaticDecoder
        generate = StaticDecoder(model, batch_size, cfg_scale=cfg_scale, cfg_interval=tuple(cfg_interval),
                                 temperature=temperature, top_k=top_k, top_p=top_p, compile=compile).generate
        sampling = {}
    else:
        sampling = dict(cfg_scale=cfg_scale, cfg_interval=tuple(cfg_interval), temperature=temperature,
                        top_k=top_k, top_p=top_p)
    rank_gen = torch.Generator(device=device).manual_seed(seed * world + rank)   # random: LlamaGen's per-rank seed

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=num, unit="img", desc="sample", dynamic_ncols=True)
    barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.time()
    pos, gen_seconds = 0, 0.0
    for b, idx in enumerate(plan):
        if labels == "random":
            gen = rank_gen
            batch_labels = class_table[torch.randint(0, len(classes), (len(idx),), generator=gen, device=device)]
        else:
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(idx[0]) // batch_size)
            batch_labels = class_table[torch.from_numpy(idx % len(classes)).to(device)]
        tg = time.time()
        codes = generate(batch_labels, generator=gen, **sampling)                  # [n, g*g]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        gen_seconds += time.time() - tg
        keep = idx < num
        n_keep = int(keep.sum())
        imgs = tokenizer.decode_code(codes[:n_keep], (g, g)).float()               # [n, 3, S, S] (fp32 tokenizer)
        arr = to_uint8(imgs, image_size_eval)                                      # [n, size, size, 3]
        shard[pos:pos + n_keep] = arr
        shard_labels[pos:pos + n_keep] = batch_labels[:n_keep].cpu().numpy()
        pos += n_keep
        if png:
            for i, a in zip(idx[:n_keep].tolist(), arr):
                Image.fromarray(a).save(out / "images" / f"{i:06d}.png")
        if bar is not None:
            bar.update(min(n_keep * world, num - bar.n))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.time() - t0
    shard.flush()
    del shard
    np.save(shards / f"rank{rank}_labels.npy", shard_labels)
    barrier()
    wall = time.time() - t0
    if bar is not None:
        bar.close()
    stats = {**settings, "seconds": round(wall, 3), "images_per_s": num / max(wall, 1e-9),
             "images_per_s_rank0": my_count / max(seconds, 1e-9),
             "tokens_only_images_per_s_rank0": my_count / max(gen_seconds, 1e-9),
             "grid_size": g, "num_classes_sampled": len(set(shard_labels.tolist())) if rank == 0 else None,
             "device": str(device), "dtype": str(model.output.weight.dtype).replace("torch.", "")}
    if rank == 0:
        all_labels = _gather(out, num, batch_size, world, size, labels, grid, settings)
        shutil.rmtree(shards, ignore_errors=True)
        stats["num_classes_sampled"] = len(set(all_labels.tolist()))
        (out / "sample_stats.json").write_text(json.dumps(stats, indent=2))
        print(f"sample: {num} images in {wall:.1f}s = {stats['images_per_s']:.2f} images/s "
              f"({world} process{'es' if world > 1 else ''}), labels {labels}: {LABEL_PROTOCOLS[labels]}; "
              f"wrote {out / 'samples.npz'}")
    barrier()
    return stats


def _gather(out: Path, num: int, batch_size: int, world: int, size: int, labels: str, grid: int,
            settings: dict) -> np.ndarray:
    """Rank 0: stream the rank shards, in sample order, into samples.npz; write grid.png; return the labels."""
    shards = [np.load(out / ".shards" / f"rank{r}.npy", mmap_mode="r") for r in range(world)]
    owner = np.zeros(num, dtype=np.int64)                  # rank that drew each sample
    row = np.zeros(num, dtype=np.int64)                    # its row in that rank's shard
    for r in range(world):
        kept = np.concatenate([idx[idx < num] for idx in batch_plan(labels, num, batch_size, world, r)] or [[]])
        owner[kept.astype(np.int64)] = r
        row[kept.astype(np.int64)] = np.arange(len(kept))
    shard_labels = [np.load(out / ".shards" / f"rank{r}_labels.npy") for r in range(world)]
    all_labels = np.array([shard_labels[o][i] for o, i in zip(owner, row)], dtype=np.int64)

    def chunks(step: int = 256):
        for lo in range(0, num, step):
            yield np.stack([shards[o][i] for o, i in zip(owner[lo:lo + step], row[lo:lo + step])])

    write_npz_streaming(out / "samples.npz", chunks(), (num, size, size, 3),
                        {"arr_1": all_labels, "sample_settings": np.array(json.dumps(settings))})
    if grid > 0:
        from mirai.evaluate import iter_npz_images
        first = next(iter(iter_npz_images(out / "samples.npz", min(grid, num))))
        save_grid(first, out / "grid.png")
    return all_labels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="exported checkpoint file or training run folder")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vq", help="local VQ tokenizer checkpoint (vq_ds16_c2i.pt)")
    tok.add_argument("--tokenizer", help="a PatchKMeansTokenizer .pt file (the demo's)")
    p.add_argument("--vq-model", default="VQ-16")
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
    p.add_argument("--temperature", type=float, default=1.0)
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
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist
    from mirai.checkpoint import CheckpointError, load_gpt
    from mirai.models.vq import VQCheckpointError, load_tokenizer
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
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
