"""Training data loader over a memory-mapped code store (``mirai.data.format.CodeStore``).

Order of the data (deterministic given seed, epoch and position, independent of the worker count):

* epoch e draws, from ``numpy.random.Generator(PCG64([seed, e]))``, a permutation ``perm`` of the N
  images and one augmentation index per permutation slot (uniform over the store's A ten-crop/flip
  variants). The tail ``N mod global_batch`` of the permutation is dropped, so an epoch has
  ``S = N // global_batch`` optimizer steps.
* optimizer step s of the epoch uses the images ``perm[s*G : (s+1)*G]`` (G = global batch) whatever
  the world size: rank r reads the slots ``r, r + W, r + 2W, ...`` of the epoch
  (DistributedSampler-style sharding, W ranks) and cuts its share into ``accum`` micro-batches of
  ``micro_batch`` images (G = W * accum * micro_batch).
* the loader position is therefore a function of the global optimizer step alone
  (epoch = step // S, micro-batch = (step % S) * accum), which is what makes resume exact mid-epoch,
  and lets a run resume with another world size / micro-batch and still see the same images per step.

Loading: a ``torch.utils.data.DataLoader`` with automatic batching off; each item is a whole
micro-batch read from the memory maps with one fancy-indexing call (no per-sample file opens).
Worker processes open the store lazily (memory maps are never pickled). They leave Ctrl-C to the
training process (SIGINT ignored) and outlive a SIGTERM (a scheduler signals every process of the job)
by ``WORKER_GRACE_S``, so a step still fetching its batches gets them; the trainer then ends the
iteration (``TrainLoader.close``), which stops them cleanly, before it writes its checkpoint (a worker
dying meanwhile would make torch raise in the training process). Codes and labels were range-checked
when the run validated the store (``CodeStore.check``); features are checked for NaN / Inf here, per
micro-batch on the host before it is copied (``mirai.data.format.check_features``): a bad one raises
``CodeStoreError`` naming features.npy and the first bad index, before any step sees it. The DataLoader gets its
own ``torch.Generator`` so creating one never consumes the global RNG (dropout stays reproducible).

A batch is a dict: ``codes`` int64 [B, T] (raster order, as stored; the model reorders them, e.g.
PAR's ``prepare_inputs``), ``labels`` int64 [B], ``index`` int64 [B], ``aug`` int64 [B], ``features``
bf16 [B, Tf, C] when features are read, and ``images`` uint8 [B, 3, S, S] when an image folder is given
(Mirai-I with an online encoder: each sample's crop re-created from its original file by
``mirai.data.store_images.StoreImages``, the only per-sample file reads, done in the worker processes).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mirai.data.format import CodeStore, CodeStoreError, check_features
from mirai.data.store_images import StoreImages

WORKER_GRACE_S = 10       # seconds a loader worker keeps serving after a SIGTERM, then it exits


@dataclass(frozen=True)
class Shard:
    """Which part of each global batch this process reads."""

    rank: int = 0
    world_size: int = 1
    micro_batch: int = 32
    accum: int = 1          # micro-batches per optimizer step on this rank

    @property
    def global_batch(self) -> int:
        return self.world_size * self.accum * self.micro_batch


def epoch_order(num_images: int, num_aug: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm int64 [N], aug int64 [N]) of one epoch: slot j reads image perm[j], augmentation aug[j]."""
    rng = np.random.Generator(np.random.PCG64([int(seed), int(epoch)]))
    perm = rng.permutation(num_images).astype(np.int64)
    aug = rng.integers(0, num_aug, size=num_images, dtype=np.int64)
    return perm, aug


class CodeBatches(Dataset):
    """Map-style dataset whose key is a whole micro-batch: (indices [B], augs [B]) -> dict of tensors."""

    def __init__(self, root: str, features: bool, images: str | None = None):
        self.root = str(root)
        self.with_features = features
        self.images_root = None if images is None else str(images)
        self._store: CodeStore | None = None
        self._images: StoreImages | None = None

    @property
    def store(self) -> CodeStore:
        if self._store is None:  # opened lazily in each process (memory maps are not pickled)
            self._store = CodeStore(self.root)
        return self._store

    @property
    def images(self) -> StoreImages | None:
        if self._images is None and self.images_root is not None:
            self._images = StoreImages(self.images_root, self.store)
        return self._images

    def __getstate__(self):
        return {"root": self.root, "with_features": self.with_features, "images_root": self.images_root,
                "_store": None, "_images": None}

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
        idx, aug = key
        store = self.store
        # sorted reads are kinder to the page cache; undo the sort afterwards
        order = np.argsort(idx, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        codes = store.codes[idx[order], aug[order]][inv]                      # uint16 [B, T]
        out = {
            "codes": torch.from_numpy(codes.astype(np.int64)),                 # [B, T]
            "labels": torch.from_numpy(np.asarray(store.labels[idx], dtype=np.int64)),  # [B]
            "index": torch.from_numpy(idx.copy()),
            "aug": torch.from_numpy(aug.copy()),
        }
        if self.with_features:
            feats = store.features[idx[order], aug[order]][inv]               # uint16 [B, Tf, C]
            check_features(feats, idx, aug, store.root / "features.npy")
            out["features"] = torch.from_numpy(np.ascontiguousarray(feats)).view(torch.bfloat16)
        if self.images is not None:
            out["images"] = self.images.load(idx, aug)                         # uint8 [B, 3, S, S]
        return out


class TrainLoader:
    """Infinite iterator of this rank's micro-batches, positioned by the global optimizer step.

    ``loader.start(step)`` positions it (fresh run: 0; resume: the checkpoint's step); iterating
    then yields micro-batches in order, ``accum`` per optimizer step, across epoch boundaries.
    """

    def __init__(self, root: str, shard: Shard, seed: int, features: bool = False, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 4, images: str | None = None):
        self.dataset = CodeBatches(root, features, images)
        store = self.dataset.store
        if self.dataset.images is not None:
            self.dataset.images.check()          # a wrong folder fails now, not inside a worker
        self.num_images = len(store)
        self.num_aug = store.num_aug
        self.shard = shard
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = int(prefetch_factor)
        self.steps_per_epoch = self.num_images // shard.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"data.codes: the store holds {self.num_images} images, fewer than one global "
                             f"batch of {shard.global_batch}")
        self._step = 0
        self._active: Iterator[dict[str, torch.Tensor]] | None = None
        if num_workers == 0:  # the main process reads the maps; keep the store for the loop
            self.dataset._store = store
        else:                 # workers open their own maps; do not hold them here
            self.dataset._store = None
            self.dataset._images = None

    # ------------------------------------------------------------------ positions
    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batch index within the epoch on this rank) at the start of optimizer step `step`."""
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.shard.accum

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def start(self, step: int) -> None:
        self._step = int(step)

    def state_dict(self, step: int) -> dict[str, int]:
        epoch, micro = self.position(step)
        return {"step": int(step), "epoch": epoch, "micro_batch_in_epoch": micro, "seed": self.seed,
                "num_images": self.num_images, "global_batch": self.shard.global_batch}

    # ------------------------------------------------------------------ batches
    def epoch_keys(self, epoch: int, first_micro: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's micro-batch keys of `epoch`, from micro-batch `first_micro` on."""
        perm, aug = epoch_order(self.num_images, self.num_aug, self.seed, epoch)
        used = self.steps_per_epoch * self.shard.global_batch
        slots = np.arange(self.shard.rank, used, self.shard.world_size)      # this rank's slots, in order
        mb = self.shard.micro_batch
        n_micro = len(slots) // mb
        keys = []
        for m in range(first_micro, n_micro):
            s = slots[m * mb:(m + 1) * mb]
            keys.append((perm[s], aug[s]))
        return keys

    def _loader(self, keys) -> Iterator[dict[str, torch.Tensor]]:
        if self.num_workers == 0:
            for key in keys:
                batch = self.dataset[key]
                yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch
            return
        loader = DataLoader(self.dataset, sampler=keys, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                            generator=torch.Generator().manual_seed(self.seed), worker_init_fn=_worker_signals)
        workers = iter(loader)
        try:
            yield from workers
            return
        except CodeStoreError as err:       # re-raised from a worker with its traceback text: keep the message
            message = str(err).rstrip().splitlines()[-1].split("CodeStoreError: ", 1)[-1]
        finally:
            del workers                     # stops them now, not when a traceback holding them is collected
        raise CodeStoreError(message)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.close()
        self._active = self._batches()
        return self._active

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, micro = self.position(self._step)
        while True:
            for batch in self._loader(self.epoch_keys(epoch, micro)):
                yield batch
            epoch, micro = epoch + 1, 0

    def close(self) -> None:
        """End the current iteration: its worker processes exit now."""
        if self._active is not None:
            self._active.close()
            self._active = None


def _worker_signals(worker_id: int) -> None:
    """A DataLoader worker leaves Ctrl-C to the training process and outlives a SIGTERM by WORKER_GRACE_S."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def _worker_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
    signal.alarm(WORKER_GRACE_S)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Asynchronous host-to-device copy of a (pinned) batch."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
