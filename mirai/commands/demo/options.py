"""The demo's options (``DemoOptions``), its command line, and how it picks CPU threads and parallel runs."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mirai.commands import HelpFormatter

SPLITS = ("heldout", "validation")


@dataclass
class DemoOptions:
    """Everything one demo call depends on (the CLI fills it; tests build it directly)."""

    out: Path = Path("runs/demo")
    """Folder of every product of the demo."""
    seeds: int = 3
    """Training seeds 0 .. seeds-1; each seed trains the baseline, Mirai-E and Mirai-I."""
    split: str = "heldout"
    """"heldout": fit on the 1,437 training digits, report on the 360 held-out ones. "validation": fit on
    the training split minus a validation split carved from it (288 digits), report on that validation
    split; the held-out digits are not read at all (use it to tune settings)."""
    steps: int | None = None
    """Optimizer steps of each run (None: the configs' train.max_steps); the Mirai-E warm-up keeps its
    fraction of the run."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda: training and evaluation device."""
    fresh: bool = False
    """Delete the demo's earlier products under ``out`` first."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` config overrides applied to every run."""
    codebook_size: int = 128
    """Number of k-means codes (the GPT vocabulary)."""
    kmeans_iters: int = 20
    """Lloyd iterations of the tokenizer fit."""
    kmeans_patches: int = 40_000
    """Random training patches the k-means is fitted on."""
    encoder_steps: int = 1600
    """Optimizer steps of the Mirai-I encoder's masked-token training."""
    classifier_epochs: int = 30
    """Epochs of the digit classifier (class consistency and the Frechet distance's feature space)."""
    data_seed: int = 0
    """Seed of the splits and of the tokenizer, encoder and classifier fits (the runs use their own seeds)."""
    samples_per_class: int = 50
    """Generated samples per class, model and evaluated checkpoint (Frechet distance, class consistency)."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale of the samples (1 = off)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Top-k filter of the sampler (0 = off)."""
    eval_points: int = 6
    """Checkpoints per run evaluated for the convergence figure (evenly spaced, the last one final)."""
    fd_points: int = 2
    """How many of those checkpoints (the last ones, evenly spaced) also get samples and a Frechet distance."""
    tsne_images: int = 10
    """Held-out images (one per class) in the jointly fitted t-SNE figure (0 = no t-SNE)."""
    jobs: int | None = None
    """Runs trained (and evaluated) at the same time; None: one per CPU core on CPU, 1 on CUDA."""
    threads: int | None = None
    """Torch CPU threads of each of those processes; None: the idle cores shared out (1 when every core runs a
    job or the machine is busy with other work)."""
    progress: bool = True
    """Progress bars (the trainer's only when runs go one at a time)."""


def build_parser() -> argparse.ArgumentParser:
    d = DemoOptions()
    p = argparse.ArgumentParser(prog="mirai demo", formatter_class=HelpFormatter,
                                description="The embedded demo: LlamaGen baseline, Mirai-E and Mirai-I on "
                                            "scikit-learn's digits, several seeds, a report with statistics.")
    p.add_argument("--out", default=str(d.out), help="output folder (report.md, figures, runs, data)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="seeds 0..N-1, three runs each")
    p.add_argument("--split", choices=SPLITS, default=d.split,
                   help="heldout: report on the held-out digits; validation: fit on train minus a validation "
                        "split and report on it (for tuning; never touches the held-out digits)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the configs')")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="training / eval device")
    p.add_argument("--fresh", action="store_true", help="start over: delete the demo's earlier products in --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE",
                   help="config override for every run, e.g. --set model.dim=48 (repeatable)")
    p.add_argument("--jobs", type=int, default=None, help="runs at the same time (default: one per CPU core)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores // jobs)")
    p.add_argument("--samples-per-class", type=int, default=d.samples_per_class,
                   help="samples per class, model and evaluated checkpoint")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--eval-points", type=int, default=d.eval_points, help="checkpoints per run in the convergence figure")
    p.add_argument("--fd-points", type=int, default=d.fd_points, help="of those, how many get a Frechet distance")
    p.add_argument("--tsne-images", type=int, default=d.tsne_images, help="held-out images in tsne.png (0 = none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    opts = DemoOptions(out=Path(args.out), seeds=args.seeds, split=args.split, steps=args.steps,
                       device=args.device, fresh=args.fresh,
                       overrides=[item for group in args.overrides for item in group], jobs=args.jobs,
                       threads=args.threads, samples_per_class=args.samples_per_class, cfg_scale=args.cfg_scale,
                       eval_points=args.eval_points, fd_points=args.fd_points, tsne_images=args.tsne_images,
                       progress=not args.no_progress)
    check_options(opts)
    return opts


def check_options(opts: DemoOptions) -> None:
    """Raise ValueError naming the option on a bad value (before any work)."""
    positive = {"--seeds": opts.seeds, "--samples-per-class": opts.samples_per_class,
                "--eval-points": opts.eval_points, "--fd-points": opts.fd_points,
                "encoder_steps": opts.encoder_steps, "classifier_epochs": opts.classifier_epochs}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in {"--steps": opts.steps, "--jobs": opts.jobs, "--threads": opts.threads}.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if opts.fd_points > opts.eval_points:
        raise ValueError(f"--fd-points ({opts.fd_points}) must be <= --eval-points ({opts.eval_points})")
    if opts.split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {opts.split!r}")
    if not 2 <= opts.codebook_size <= 65536:
        raise ValueError(f"codebook_size must be in 2 .. 65536, got {opts.codebook_size}")
    if opts.kmeans_patches < opts.codebook_size:
        raise ValueError(f"kmeans_patches ({opts.kmeans_patches}) must be >= codebook_size ({opts.codebook_size})")
    if not 0 <= opts.tsne_images <= 10:
        raise ValueError(f"--tsne-images must be in 0 .. 10 (one image per class), got {opts.tsne_images}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


@dataclass(frozen=True)
class Parallelism:
    """How the runs share the machine: ``jobs`` processes at once, ``threads`` torch threads each."""

    jobs: int
    threads: int
    cores: int
    load: float      # 1-minute load average when the demo started (other work on the machine)


def pick_parallelism(opts: DemoOptions, device: str, num_runs: int) -> Parallelism:
    """One process per core on CPU, each single-threaded (tiny models scale badly over threads); with fewer
    jobs than cores the cores that other work leaves idle are shared out as threads (on a busy machine extra
    OpenMP threads oversubscribe it: 1 thread ran a step several times faster there). One process on CUDA."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device == "cuda":
        jobs = opts.jobs or 1
    else:
        jobs = opts.jobs or max(1, min(cores, num_runs))
    idle = max(1, cores - round(load))
    threads = opts.threads or max(1, min(cores // jobs, idle // jobs))
    return Parallelism(jobs=jobs, threads=threads, cores=cores, load=round(load, 2))
