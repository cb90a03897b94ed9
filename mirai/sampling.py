"""Class-conditional sampling with classifier-free guidance -> PNGs, grid, .npz: ``sample``, the work of
``mirai sample``.

The command loads only the AR model (``mirai.checkpoint.load_gpt``: EMA weights by default; foresight heads
and teachers are never loaded) and the tokenizer; ``sample`` then, for each batch, draws token grids with the
model's KV-cache decoding (CFG ``u + s (c - u)`` for s > 1, as LlamaGen; s < 1 is refused; optional CFG
interval, temperature, top-k, top-p), decodes them with the tokenizer in fp32 and converts to uint8
exactly as LlamaGen does (clamp(127.5 x + 128)), optionally bicubic-resized to ``image_size_eval``
(384 px -> 256 for the ImageNet-256 reference batch). On GPU the command runs the model in bf16
(``--precision``). ``compile`` decodes with ``mirai.models.static_decode.StaticDecoder``: fixed-shape steps on a
preallocated full-length KV cache, compiled with ``torch.compile(fullgraph=True)`` and replayed as CUDA
graphs on a GPU; same random numbers as the eager decoder, so the same tokens up to float rounding.

Labels (``labels``, see ``LABEL_PROTOCOLS``):
  * ``random`` (default): LlamaGen's ``sample_c2i_ddp.py`` protocol, the one behind LlamaGen's and the
    released Mirai code's published FID / IS: rank r of W seeds one generator with ``seed * W + r`` and,
    for each of ceil(num / (batch * W)) rounds, draws ``batch`` labels uniformly
    (``torch.randint(0, C, (batch,))``, C = ``len(classes)``) and then the batch's tokens
    from the same generator; sample ``i`` of rank r in round k is image ``k * batch * W + i * W + r``, and
    images from ``num`` on are dropped. The images depend on the number of processes, as LlamaGen's do.
  * ``balanced``: sample i gets ``classes[i % len(classes)]`` (exactly 50 per class for 50,000 samples);
    batch b (of ``batch_size`` samples) is drawn with a generator seeded from (seed, b) and rank r draws
    the batches b with b % W == r, so the images do not depend on the number of processes.
The protocol and the other settings are recorded in the .npz (``sample_settings``, a JSON string) and in
``sample_stats.json``.

Multi-GPU (torchrun): each rank writes its images into its own shard (``OUT/.shards/rank{r}.npy``, labels
beside it); rank 0 then streams the shards, in sample order, into ``OUT/samples.npz`` (``arr_0`` uint8
[N, H, W, 3] as the ADM evaluator reads it, ``arr_1`` int64 labels, ``sample_settings``) without holding
all images in memory. Also written: ``OUT/images/{i:06d}.png`` (unless ``png=False``), ``OUT/grid.png``
(the first ``grid`` samples) and ``OUT/sample_stats.json`` (images/s end to end, and of the AR token
generation alone, plus the settings).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mirai.data.images import save_grid, to_uint8
from mirai.io.npz import iter_npz_images, write_npz_streaming
from mirai.launcher import barrier

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
    shard, shard_labels = _open_shard(out, rank, my_count, size, png)
    generate, sampling = _decoder(model, batch_size, compile, cfg_scale=cfg_scale, cfg_interval=tuple(cfg_interval),
                                  temperature=temperature, top_k=top_k, top_p=top_p)
    class_table = torch.tensor(classes, dtype=torch.long, device=device)
    rank_gen = torch.Generator(device=device).manual_seed(seed * world + rank)   # random: LlamaGen's per-rank seed

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=num, unit="img", desc="sample", dynamic_ncols=True)
    barrier()
    _sync(device)
    t0 = time.time()
    pos, gen_seconds = 0, 0.0
    for idx in plan:
        if labels == "random":
            gen = rank_gen
            batch_labels = class_table[torch.randint(0, len(classes), (len(idx),), generator=gen, device=device)]
        else:
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(idx[0]) // batch_size)
            batch_labels = class_table[torch.from_numpy(idx % len(classes)).to(device)]
        tg = time.time()
        codes = generate(batch_labels, generator=gen, **sampling)                  # [n, g*g]
        _sync(device)
        gen_seconds += time.time() - tg
        n_keep = int((idx < num).sum())
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
    _sync(device)
    seconds = time.time() - t0
    shard.flush()
    del shard
    np.save(out / ".shards" / f"rank{rank}_labels.npy", shard_labels)
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
        _finish(out, stats, num, batch_size, world, size, labels, grid, settings)
    barrier()
    return stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _open_shard(out: Path, rank: int, count: int, size: int, png: bool) -> tuple[np.ndarray, np.ndarray]:
    """This rank's image shard (a memory map ``OUT/.shards/rank{r}.npy`` of uint8 [count, size, size, 3]) and its
    labels; rank 0 makes the folders first."""
    shards = out / ".shards"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        shards.mkdir(exist_ok=True)
        if png:
            (out / "images").mkdir(exist_ok=True)
    barrier()
    shard = np.lib.format.open_memmap(shards / f"rank{rank}.npy", mode="w+", dtype=np.uint8,
                                      shape=(count, size, size, 3))
    return shard, np.zeros(count, dtype=np.int64)


def _decoder(model, batch_size: int, compile: bool | str, **sampling):
    """(generate function, the keyword arguments each call passes): the model's eager KV-cache decoder, or a
    ``StaticDecoder`` built once with the sampling settings."""
    if not compile:
        return model.generate, sampling
    from mirai.models.static_decode import StaticDecoder
    return StaticDecoder(model, batch_size, compile=compile, **sampling).generate, {}


def _finish(out: Path, stats: dict, num: int, batch_size: int, world: int, size: int, labels: str, grid: int,
            settings: dict) -> None:
    """Rank 0: samples.npz and grid.png from the shards, sample_stats.json, the summary line."""
    all_labels = _gather(out, num, batch_size, world, size, labels, grid, settings)
    shutil.rmtree(out / ".shards", ignore_errors=True)
    stats["num_classes_sampled"] = len(set(all_labels.tolist()))
    (out / "sample_stats.json").write_text(json.dumps(stats, indent=2))
    print(f"sample: {num} images in {stats['seconds']:.1f}s = {stats['images_per_s']:.2f} images/s "
          f"({world} process{'es' if world > 1 else ''}), labels {labels}: {LABEL_PROTOCOLS[labels]}; "
          f"wrote {out / 'samples.npz'}")


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
        first = next(iter(iter_npz_images(out / "samples.npz", min(grid, num))))
        save_grid(first, out / "grid.png")
    return all_labels
