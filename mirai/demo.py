"""``mirai demo`` / ``make demo``: the embedded default job, baseline vs Mirai-E on real digits, no downloads.

    python -m mirai.demo [--out runs/demo] [--steps N] [--device auto|cpu|cuda] [--fresh] [--threads N]
                         [--set KEY=VALUE ...]

Stages (each prints a ``[demo i/7]`` line; every product lands under ``--out``):

1. data       the 1,797 8x8 handwritten digits shipped inside scikit-learn (``load_digits``), scaled to
              [-1, 1], bilinearly upscaled to 32x32 (grey, 1 channel), split into train / held-out
              (20 %, stratified, seed 0): 1,437 / 360 images.
2. tokenizer  ``PatchKMeansTokenizer`` (``mirai.models.vq``) fitted on the training split: a k-means
              codebook of 128 4x4 patches (--codebook-size), so an image is an 8x8 grid of 64 tokens.
              -> ``tokenizer.pt`` (reused on re-runs) and ``tokenizer.png`` (real vs decoded digits).
3. codes      both splits encoded (one augmentation each: digits are not flip-symmetric) into code
              stores ``data/train`` and ``data/heldout`` (``mirai.data.format.write_code_store``); reused
              while the tokenizer file is unchanged.
4. train      ``configs/demo_baseline.yaml`` and ``configs/demo_mirai_e.yaml`` (same model, seed, steps
              and batch) through the command users run, ``python -m mirai.train --config ... --set ...``
              (DeepSpeed ZeRO-2; ``DS_ACCELERATOR=cpu`` with gloo without a GPU), one subprocess per run,
              into ``baseline/`` and ``mirai_e/``. A run whose final checkpoint exists and whose resolved
              config equals the one this call would write is reused; an interrupted one is resumed by the
              trainer; one whose settings changed is started over.
5. evaluate   EMA weights of each run (``mirai.checkpoint.load_gpt``): held-out next-token loss
              (teacher-forced, mean cross-entropy over the 360 x 64 held-out tokens; the raw weights'
              value too); class-conditional samples through ``mirai.sample.sample`` (KV cache, CFG);
              class consistency = fraction of samples an RBF SVC fitted on the real training digits
              (8x8, 4x4 average-pooled from 32x32) assigns to the conditioning class.
6. t-SNE      ``mirai.visualize.tsne_grid`` of the layer-l token features (l = Mirai-E's injection
              layer) of held-out images, baseline next to Mirai-E -> ``tsne.png``.
7. report     ``report.md`` (+ ``report.json`` with every number) and ``loss_curves.png``, ``samples.png``.

``--fresh`` deletes what earlier demo calls wrote under ``--out`` (tokenizer, stores, runs, figures)
and starts over. ``--set`` overrides apply to both training configs (e.g. ``--set model.dim=64``).
``--threads N`` sets torch's CPU threads (``OMP_NUM_THREADS`` of the training subprocesses): on a CPU
shared with other work, 1 thread avoids OpenMP oversubscription, which can slow a step down many times.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

NUM_STAGES = 7
IMAGE_SIZE = 32                    # digits are upscaled from 8x8 to 32x32 pixels
PATCH = 4                          # k-means patches of 4x4 pixels -> an 8x8 token grid
RUNS = (                           # (folder, config file, title): same seed, steps and batch
    ("baseline", "demo_baseline.yaml", "baseline (LlamaGen)"),
    ("mirai_e", "demo_mirai_e.yaml", "Mirai-E"),
)
DEMO_FILES = ("tokenizer.pt", "tokenizer.png", "data", "baseline", "mirai_e", "samples", "loss_curves.png",
              "samples.png", "tsne.png", "report.md", "report.json", "timings.json")
IGNORED_FOR_REUSE = (("train", "device"), ("train", "progress"))   # config fields that do not change a run


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
@dataclass
class DemoOptions:
    """Everything one demo call depends on (the CLI fills it; tests build it directly)."""

    out: Path = Path("runs/demo")
    """Folder of every product of the demo."""
    steps: int | None = None
    """Optimizer steps of each run (None: the configs' train.max_steps)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda: training and evaluation device."""
    fresh: bool = False
    """Delete the demo's earlier products under ``out`` first."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` config overrides applied to both runs."""
    codebook_size: int = 128
    """Number of k-means codes (the GPT vocabulary)."""
    kmeans_iters: int = 20
    """Lloyd iterations of the tokenizer fit."""
    kmeans_patches: int = 40_000
    """Random training patches the k-means is fitted on."""
    heldout_frac: float = 0.2
    """Fraction of the digits held out (stratified)."""
    seed: int = 0
    """Seed of the split, the tokenizer fit, sampling and t-SNE (the runs' seed is train.seed)."""
    samples_per_class: int = 20
    """Generated samples per class and model (class consistency uses all; samples.png shows up to 10)."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale of the samples (1 = off)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Top-k filter of the sampler (0 = off)."""
    tsne_images: int = 2
    """Held-out images drawn in the t-SNE figure."""
    progress: bool = True
    """Progress bars of the trainer and the sampler."""
    threads: int | None = None
    """CPU threads of torch (OMP_NUM_THREADS of the training processes); None = torch's default (all cores)."""


def build_parser() -> argparse.ArgumentParser:
    d = DemoOptions()
    p = argparse.ArgumentParser(prog="mirai demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(d.out), help="output folder (report.md, figures, runs, data)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the configs' 600)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="training and evaluation device (auto: CUDA when available)")
    p.add_argument("--fresh", action="store_true", help="start over: delete the demo's earlier products in --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE",
                   help="config override for both runs, e.g. --set model.dim=64 (repeatable)")
    p.add_argument("--codebook-size", type=int, default=d.codebook_size, help="k-means codes (GPT vocabulary)")
    p.add_argument("--kmeans-iters", type=int, default=d.kmeans_iters, help="Lloyd iterations of the tokenizer fit")
    p.add_argument("--kmeans-patches", type=int, default=d.kmeans_patches, help="patches the k-means is fitted on")
    p.add_argument("--samples-per-class", type=int, default=d.samples_per_class,
                   help="samples per class and model for class consistency (samples.png shows up to 10)")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=d.top_k, help="top-k filter of the sampler (0 = off)")
    p.add_argument("--tsne-images", type=int, default=d.tsne_images, help="held-out images in tsne.png (0 = skip)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the split, tokenizer fit, sampling and t-SNE (the runs use train.seed)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch in training and evaluation (default: torch's choice, all cores); "
                        "on a machine busy with other work, 1 avoids oversubscription and can be much faster")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    opts = DemoOptions(out=Path(args.out), steps=args.steps, device=args.device, fresh=args.fresh,
                       overrides=[item for group in args.overrides for item in group],
                       codebook_size=args.codebook_size, kmeans_iters=args.kmeans_iters,
                       kmeans_patches=args.kmeans_patches, samples_per_class=args.samples_per_class,
                       cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                       tsne_images=args.tsne_images, seed=args.seed, progress=not args.no_progress,
                       threads=args.threads)
    check_options(opts)
    return opts


def check_options(opts: DemoOptions) -> None:
    """Raise ValueError naming the option on a bad value (before any work)."""
    if opts.steps is not None and opts.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {opts.steps}")
    if not 2 <= opts.codebook_size <= 65536:
        raise ValueError(f"--codebook-size must be in 2 .. 65536, got {opts.codebook_size}")
    if opts.kmeans_iters < 0:
        raise ValueError(f"--kmeans-iters must be >= 0, got {opts.kmeans_iters}")
    if opts.kmeans_patches < opts.codebook_size:
        raise ValueError(f"--kmeans-patches ({opts.kmeans_patches}) must be >= --codebook-size ({opts.codebook_size})")
    if opts.samples_per_class < 1:
        raise ValueError(f"--samples-per-class must be >= 1, got {opts.samples_per_class}")
    if opts.tsne_images < 0:
        raise ValueError(f"--tsne-images must be >= 0, got {opts.tsne_images}")
    if not 0.0 < opts.heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in (0, 1), got {opts.heldout_frac}")
    if opts.threads is not None and opts.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {opts.threads}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class Stages:
    """``[demo i/7] title`` lines with the time since the demo started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._start = 0.0

    def begin(self, i: int, name: str, text: str) -> None:
        self.end()
        self._name, self._start = name, time.perf_counter()
        print(f"[demo {i}/{NUM_STAGES}] {text}  (t = {self._start - self.t0:.0f} s)", flush=True)

    def end(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.perf_counter() - self._start, 2)
            self._name = None

    @staticmethod
    def note(text: str) -> None:
        print(f"           {text}", flush=True)


# --------------------------------------------------------------------------------------------
# 1. data
# --------------------------------------------------------------------------------------------
@dataclass
class Digits:
    """The split digits: images float32 [N, 1, 32, 32] in [-1, 1], labels int64 [N]."""

    train_x: torch.Tensor
    train_y: np.ndarray
    held_x: torch.Tensor
    held_y: np.ndarray


def load_digits_32(heldout_frac: float = 0.2, seed: int = 0) -> Digits:
    """scikit-learn's digits (values 0..16 on 8x8), scaled to [-1, 1] and upscaled to 32x32 bilinearly."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    x8 = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]          # [N, 1, 8, 8] in [0, 1]
    x32 = F.interpolate(x8, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x32 = (x32 * 2.0 - 1.0).clamp(-1.0, 1.0)                                         # [N, 1, 32, 32]
    y = bunch.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=heldout_frac, stratify=y, random_state=seed)
    tr, te = np.sort(tr), np.sort(te)
    return Digits(x32[tr], y[tr], x32[te], y[te])


def pool8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Grey 8x8 classifier features: [N, 1 or 3, 32, 32] in [-1, 1] (or uint8 [N, 32, 32, 3]) -> [N, 64]."""
    import torch.nn.functional as F
    if isinstance(images, np.ndarray):                                              # uint8 [N, H, W, 3]
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1.0      # [N, 3, H, W]
    else:
        x = images.float()
    x = x.mean(1, keepdim=True)                                                     # [N, 1, H, W] grey
    x = F.adaptive_avg_pool2d(x, 8)                                                 # [N, 1, 8, 8]
    return x.reshape(x.shape[0], 64).numpy()


# --------------------------------------------------------------------------------------------
# 2. tokenizer, 3. code stores
# --------------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def fit_or_load_tokenizer(path: Path, train_x: torch.Tensor, opts: DemoOptions):
    """(tokenizer, reused): the saved tokenizer when it has the requested codebook size, else a new fit."""
    from mirai.models.vq import PatchKMeansTokenizer, VQCheckpointError
    if path.is_file():
        try:
            tok = PatchKMeansTokenizer.load(path)
        except VQCheckpointError as err:
            Stages.note(f"{err}; fitting a new tokenizer")
        else:
            if tok.codebook_size == opts.codebook_size and tok.patch == PATCH:
                return tok, True
            Stages.note(f"{path} has {tok.codebook_size} codes of {tok.patch}x{tok.patch} patches, "
                        f"{opts.codebook_size} of {PATCH}x{PATCH} requested: fitting a new one")
    tok = PatchKMeansTokenizer.fit(train_x, codebook_size=opts.codebook_size, patch=PATCH,
                                   iters=opts.kmeans_iters, seed=opts.seed, max_patches=opts.kmeans_patches)
    tok.save(path)
    return tok, False


def store_matches(root: Path, digest: str, num_images: int) -> bool:
    meta = root / "meta.json"
    if not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("tokenizer_digest") == digest and int(info.get("num_images", -1)) == num_images


def write_stores(data_dir: Path, tok, digits: Digits, digest: str) -> dict[str, bool]:
    """Encode both splits into code stores (A = 1 augmentation); {split: reused}."""
    from mirai.data.format import write_code_store
    reused = {}
    for split, x, y in (("train", digits.train_x, digits.train_y), ("heldout", digits.held_x, digits.held_y)):
        root = data_dir / split
        if store_matches(root, digest, len(y)):
            reused[split] = True
            continue
        if root.exists():
            shutil.rmtree(root)                                   # a store of an older tokenizer
        codes = tok.encode(x).numpy().astype(np.uint16)[:, None]  # [N, T] -> [N, A=1, T]
        write_code_store(root, codes, y, grid_size=IMAGE_SIZE // PATCH, vocab_size=tok.codebook_size,
                         num_classes=10, image_size=IMAGE_SIZE,
                         files=[f"sklearn.datasets.load_digits[{split}][{i}]" for i in range(len(y))],
                         extra={"tokenizer_digest": digest, "source": "sklearn.datasets.load_digits",
                                "split": split})
        reused[split] = False
    return reused


# --------------------------------------------------------------------------------------------
# 4. training (through `python -m mirai.train`)
# --------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One training run of the demo."""

    key: str                 # folder name under --out ("baseline", "mirai_e")
    title: str               # name in figures and tables
    config_file: Path        # configs/demo_*.yaml
    sets: list[str]          # --set overrides passed to mirai train
    cfg: Any                 # the resolved mirai.config.Config

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def total_steps(self) -> int:
        return int(self.cfg.train.max_steps)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mirai.train", "--config", str(self.config_file), "--set", *self.sets]

    def display_command(self) -> str:
        return " ".join(["python -m mirai.train", "--config", str(self.config_file), "--set", *self.sets])


def make_specs(opts: DemoOptions, device: str) -> list[RunSpec]:
    """The two runs' configs (demo configs + data / out_dir / device / steps + the user's --set)."""
    from mirai.config import CONFIG_DIR, load_config, validate
    specs = []
    for key, filename, title in RUNS:
        config_file = CONFIG_DIR / filename
        try:
            config_file = config_file.relative_to(Path.cwd())
        except ValueError:
            pass
        sets = [f"out_dir={opts.out / key}", f"data.codes={opts.out / 'data' / 'train'}", f"train.device={device}",
                f"model.vocab_size={opts.codebook_size}"]
        if opts.steps is not None:
            sets.append(f"train.max_steps={opts.steps}")
        if not opts.progress:
            sets.append("train.progress=false")
        sets += list(opts.overrides)
        cfg = load_config(config_file, sets)
        validate(cfg, world_size=1, check_data=False)      # the store is written later; mirai train checks it
        if cfg.train.max_steps is None:
            raise ValueError(f"{config_file}: the demo needs train.max_steps (set it or pass --steps)")
        specs.append(RunSpec(key, title, config_file, sets, cfg))
    base, mirai = specs[0].cfg, specs[1].cfg
    for section in ("model", "data", "optim"):
        if getattr(base, section) != getattr(mirai, section):
            raise ValueError(f"the demo's two runs differ in their {section} section; they must share it")
    if (base.train.seed, base.train.max_steps, base.train.global_batch) != \
            (mirai.train.seed, mirai.train.max_steps, mirai.train.global_batch):
        raise ValueError("the demo's two runs must share train.seed, train.max_steps and train.global_batch")
    return specs


def comparable(cfg) -> dict[str, Any]:
    d = cfg.to_dict()
    for section, key in IGNORED_FOR_REUSE:
        d.get(section, {}).pop(key, None)
    return d


def final_step(run_dir: Path) -> int | None:
    """Step of the run's latest complete checkpoint (None: no checkpoint yet or a broken one)."""
    from mirai.checkpoint import CheckpointError, read_latest, verify
    try:
        ckpt = read_latest(run_dir)
        return None if ckpt is None else int(verify(ckpt).get("step", -1))
    except CheckpointError:
        return None


def run_state(spec: RunSpec) -> tuple[str, str]:
    """(state, why): "finished" (final checkpoint of this exact config), "partial" (resumable), "stale"
    (other settings or a broken folder: start over) or "new"."""
    from mirai.config import ConfigError, load_config
    run_dir = spec.run_dir
    if not run_dir.exists():
        return "new", "no run folder"
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return "stale", f"{saved} is missing"
    try:
        old = comparable(load_config(saved))
    except ConfigError as err:
        return "stale", f"{saved} no longer loads ({err})"
    new = comparable(spec.cfg)
    if old != new:
        diff = [f"{sec}.{key}" for sec in new if isinstance(new[sec], dict)
                for key in new[sec] if old.get(sec, {}).get(key) != new[sec][key]]
        diff += [sec for sec in new if not isinstance(new[sec], dict) and old.get(sec) != new[sec]]
        return "stale", f"settings changed ({', '.join(diff) or 'config layout'})"
    step = final_step(run_dir)
    if step is None:
        return "partial", "no complete checkpoint yet"
    if step == spec.total_steps:
        return "finished", f"final checkpoint at step {step}"
    if step < spec.total_steps:
        return "partial", f"latest checkpoint at step {step} of {spec.total_steps}"
    return "stale", f"latest checkpoint at step {step}, past {spec.total_steps}"


def train_run(spec: RunSpec, device: str, threads: int | None = None) -> dict[str, Any] | None:
    """Train (or resume) one run in a `python -m mirai.train` subprocess.

    Returns None when a finished run is reused, else {"seconds": wall, "cpu_seconds": user + sys CPU time
    of the subprocess, "load_avg": 1-minute load average of the machine when it ended, "threads": torch
    CPU threads (None on CUDA)}. A folder left by a run with other settings is deleted first.
    """
    import resource
    state, why = run_state(spec)
    if state == "finished":
        return None
    if state == "stale":
        Stages.note(f"{spec.run_dir}: {why}; starting this run over")
        shutil.rmtree(spec.run_dir)
    Stages.note(("resuming: " if state == "partial" else "") + spec.display_command())
    env = dict(os.environ)
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(spec.command(), env=env)
    seconds = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"mirai train for {spec.key} exited with code {proc.returncode} "
                           f"(command: {spec.display_command()})")
    step = final_step(spec.run_dir)
    if step != spec.total_steps:
        raise RuntimeError(f"{spec.run_dir}: mirai train returned but its latest complete checkpoint is at step "
                           f"{step}, not the final step {spec.total_steps}")
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "load_avg": round(os.getloadavg()[0], 2),
            "threads": threads if threads is not None else (torch.get_num_threads() if device == "cpu" else None)}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records in step order (the last record of a step wins after a resume)."""
    path = Path(run_dir) / "metrics.jsonl"
    by_step: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


# --------------------------------------------------------------------------------------------
# 5. evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_ntp(model, store_dir: Path, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy (nats) over every token of every held-out image, teacher-forced."""
    import torch.nn.functional as F
    from mirai.data.format import CodeStore
    store = CodeStore(store_dir)
    device = model.output.weight.device
    codes_all = torch.from_numpy(np.array(store.codes[:, 0], dtype=np.int64))         # [N, T]
    labels_all = torch.from_numpy(np.array(store.labels, dtype=np.int64))             # [N]
    total, count = 0.0, 0
    model.eval()
    for lo in range(0, len(store), batch_size):
        codes = codes_all[lo:lo + batch_size].to(device)
        labels = labels_all[lo:lo + batch_size].to(device)
        idx, targets = model.prepare_inputs(codes)                                     # [B, T-1], [B, T]
        logits = model(idx, labels).logits.float()                                     # [B, T, V]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total / count


def fit_classifier(digits: Digits):
    """RBF SVC on the real training digits (8x8 pooled features)."""
    from sklearn.svm import SVC
    clf = SVC(C=10.0, gamma="scale")
    clf.fit(pool8(digits.train_x), digits.train_y)
    return clf


def consistency(pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    per_class = [float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else None for c in range(10)]
    return {"overall": float(np.mean(pred == labels)), "per_class": per_class}


def draw_samples(spec: RunSpec, model, tok, opts: DemoOptions) -> tuple[np.ndarray, np.ndarray, dict]:
    """uint8 [N, 32, 32, 3] samples and their labels [N] (samples_per_class of each class), and stats."""
    from mirai.sample import sample
    out = opts.out / "samples" / spec.key
    num = 10 * opts.samples_per_class
    stats = sample(model, tok, out=out, num=num, batch_size=min(num, 100), classes=list(range(10)),
                   labels="balanced", cfg_scale=opts.cfg_scale, temperature=opts.temperature, top_k=opts.top_k,
                   seed=opts.seed, png=False, grid=0, progress=opts.progress)
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    return images, labels, stats


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def class_rows(images: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one mosaic with a row per class 0..9 (per_class images each)."""
    from mirai.images import make_grid
    ordered = []
    for c in range(10):
        sel = images[labels == c][:per_class]
        if len(sel) < per_class:                                   # pad with white cells
            pad = np.full((per_class - len(sel),) + images.shape[1:], 255, np.uint8)
            sel = np.concatenate([sel, pad])
        ordered.append(sel)
    return make_grid(np.concatenate(ordered), nrow=per_class, pad=2)


def plot_samples(panels: list[tuple[str, np.ndarray]], per_class: int, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(0.45 * per_class * len(panels) + 1.2, 5.2), squeeze=False)
    for ax, (title, grid) in zip(axes[0], panels):
        ax.imshow(grid, interpolation="nearest")
        cell = (grid.shape[0] - 2) / 10
        ax.set_yticks([2 + cell * (c + 0.5) for c in range(10)], [str(c) for c in range(10)])
        ax.set_xticks([])
        ax.set_ylabel("conditioning class")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(curves: dict[str, list[dict[str, Any]]], heldout: dict[str, float], titles: dict[str, str],
                path: Path) -> Path:
    """Left: training NTP loss of both runs (+ held-out NTP at the end); right: Mirai-E's foresight terms."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"baseline": "tab:blue", "mirai_e": "tab:red"}
    for key, recs in curves.items():
        if not recs:
            continue
        steps = [r["step"] for r in recs]
        ax.plot(steps, [r["ntp_loss"] for r in recs], color=colours.get(key), label=f"{titles[key]}: train NTP")
        if key in heldout:
            ax.scatter([steps[-1]], [heldout[key]], color=colours.get(key), marker="*", s=120, zorder=3,
                       label=f"{titles[key]}: held-out NTP (EMA) {heldout[key]:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title("next-token prediction loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    recs = curves.get("mirai_e", [])
    if recs and recs[0].get("head_loss"):
        steps = [r["step"] for r in recs]
        for k in range(len(recs[0]["head_loss"])):
            ax2.plot(steps, [r["head_loss"][k] for r in recs], label=f"head {k + 1}: -cos(student, EMA teacher)")
        ax3 = ax2.twinx()
        ax3.plot(steps, [r["lambdas"][0] if r.get("lambdas") else 0.0 for r in recs], color="grey", ls=":",
                 label="lambda")
        ax3.set_ylabel("lambda (grey, dotted)")
        ax2.legend(fontsize=8, loc="upper right")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("foresight loss per head")
    ax2.set_title("Mirai-E foresight alignment (0 during warm-up)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tokenizer(digits: Digits, tok, path: Path, n: int = 20) -> Path:
    from mirai.images import make_grid, to_uint8
    from PIL import Image
    real = digits.held_x[:n]
    rec = tok.decode_code(tok.encode(real), (IMAGE_SIZE // PATCH,) * 2)
    grid = make_grid(np.concatenate([to_uint8(real.expand(-1, 3, -1, -1)), to_uint8(rec)]), nrow=n)
    img = Image.fromarray(grid)
    img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(path)
    return path


# --------------------------------------------------------------------------------------------
# 7. report
# --------------------------------------------------------------------------------------------
def _fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def write_report(out: Path, r: dict[str, Any]) -> Path:
    """report.md from the numbers in r (also written as report.json)."""
    (out / "report.json").write_text(json.dumps(r, indent=2))
    runs = r["runs"]
    keys = [k for k, _, _ in RUNS]
    title = {k: runs[k]["title"] for k in keys}
    L: list[str] = []
    L += ["# Mirai demo: LlamaGen baseline vs Mirai-E on scikit-learn's handwritten digits", ""]
    L += [f"Written by `python -m mirai.demo` on {r['date']} ({r['device_name']}, torch {r['torch']}). "
          "Every number below is measured by this call (or by the earlier call whose run it reused); "
          "one seed, one small model, a few hundred steps: read them as a working pipeline, not as a "
          "benchmark of the method.", ""]
    d, tk = r["data"], r["tokenizer"]
    L += ["## Setup", ""]
    L += [f"- **Data**: `sklearn.datasets.load_digits` ({d['num_images']} real 8x8 digits, 10 classes, shipped inside "
          f"scikit-learn), upscaled to 32x32 (bilinear); stratified split: {d['num_train']} train / "
          f"{d['num_heldout']} held-out images (seed {d['seed']})."]
    L += [f"- **Tokenizer**: k-means codebook of {tk['codebook_size']} 4x4 patches fitted on the training split "
          f"(`PatchKMeansTokenizer`), an 8x8 grid of 64 tokens per image; held-out reconstruction MSE "
          f"{tk['heldout_mse']:.4f} (pixels in [-1, 1]). `tokenizer.png`: held-out digits (top) and their "
          "decoded codes (bottom)." + (" Reused from an earlier call." if tk["reused"] else "")]
    m = r["model"]
    L += [f"- **Model**: {m['name']} with dim {m['dim']}, {m['n_layer']} layers, {m['n_head']} heads, vocabulary "
          f"{m['vocab_size']}, 10 classes + null class, {m['params'] / 1e6:.2f}M parameters; "
          f"{r['train']['steps']} steps of {r['train']['global_batch']} images "
          f"({r['train']['epochs']:.1f} epochs), seed {r['train']['seed']}, identical for both runs."]
    f = r["foresight"]
    L += [f"- **Mirai-E**: K = {f['k']} heads ({f['layout']} layout), alignment of layer {f['layer']} of "
          f"{m['n_layer']} to the EMA teacher's layer {f['layer']} (EMA decay {f['ema_decay']}), MLP heads "
          f"{m['dim']} -> {f['head_hidden']} -> {f['head_hidden']} -> {f['head_out']}, lambda {f['lambdas']} -> "
          f"{f['lambda_end']} at {f['switch_frac']:.0%} of training, no foresight term during the first "
          f"{f['warmup_epochs']} epochs ({f['warmup_steps']} steps; the paper uses 15 of 300 epochs)."]
    L += ["- **Training**: the command users run (DeepSpeed, ZeRO-" + str(r["train"]["zero_stage"]) +
          (", `DS_ACCELERATOR=cpu`, gloo" if r["device"] == "cpu" else "") + "):", ""]
    for k in keys:
        L += ["  ```", f"  {runs[k]['command']}", "  ```"]
    L += [""]
    L += ["## Timings", "", "Stages of this call (a reused run's training stage shows 0):", "",
          "| stage | wall seconds |", "|---|---:|"]
    for name, sec in r["timings"].items():
        L += [f"| {name} | {sec:.1f} |"]
    L += ["", "Training runs (the `python -m mirai.train` subprocesses; CPU time = user + sys of the subprocess, "
          "which on an idle machine with n cores bounds the wall time from below by CPU / n):", "",
          "| run | wall seconds | CPU seconds | median step (s) | torch threads | 1-min load average at its end |",
          "|---|---:|---:|---:|---:|---:|"]
    for k in keys:
        tr = runs[k]["training"]
        note = " (reused; measured when it trained)" if tr["reused"] else ""
        L += [f"| {title[k]}{note} | {_fmt(tr['seconds'], 1)} | {_fmt(tr['cpu_seconds'], 1)} | "
              f"{_fmt(tr['median_step_s'], 3)} | {tr.get('threads') or 'n/a'} | {_fmt(tr['load_avg'], 2)} |"]
    walls = [runs[k]["training"]["seconds"] for k in keys]
    cpus = [runs[k]["training"]["cpu_seconds"] for k in keys]
    if all(w is not None for w in walls):
        L += ["", f"Both runs: {sum(walls):.1f} s wall ({sum(walls) / 60:.1f} min)"
              + (f", {sum(cpus):.1f} s CPU" if all(c is not None for c in cpus) else "")
              + f" ({r['device_name']})."]
    L += [""]
    L += ["## Training loss", "", "![loss curves](loss_curves.png)", "",
          "| run | train NTP loss, first log | train NTP loss, last log | held-out NTP loss (EMA weights) | "
          "held-out NTP loss (raw weights) |", "|---|---:|---:|---:|---:|"]
    for k in keys:
        e = runs[k]["eval"]
        L += [f"| {title[k]} | {_fmt(e['train_ntp_first'])} | {_fmt(e['train_ntp_last'])} | "
              f"{_fmt(e['heldout_ntp_ema'], 4)} | {_fmt(e['heldout_ntp_raw'], 4)} |"]
    L += ["", f"Held-out NTP loss: mean next-token cross-entropy in nats over all {d['num_heldout']} x 64 held-out "
          "tokens, teacher-forced with the true class label (uniform guessing: "
          f"ln {tk['codebook_size']} = {np.log(tk['codebook_size']):.3f}).", ""]
    s = r["sampling"]
    L += ["## Samples", "", "![samples](samples.png)", "",
          f"The first {s['shown_per_class']} of {s['per_class']} samples per class (rows: conditioning class 0..9) "
          "from the EMA weights of each run, "
          f"CFG scale {s['cfg_scale']}, temperature {s['temperature']}, top-k {s['top_k'] or 'off'}, seed {s['seed']}, "
          "decoded by the tokenizer.", ""]
    L += ["## Class consistency", "",
          f"A classifier ({r['classifier']['kind']}) fitted on the real training digits (32x32 average-pooled to 8x8) "
          "labels every sample; class consistency = fraction labelled as the class it was conditioned on.", "",
          f"- classifier sanity: accuracy {r['classifier']['heldout_acc']:.3f} on the real held-out digits, "
          f"{r['classifier']['heldout_tokenized_acc']:.3f} on the same digits after tokenize -> decode "
          "(the best a perfect generator could score through this tokenizer).", "",
          "| run | class consistency | " + " | ".join(str(c) for c in range(10)) + " |",
          "|---|---:|" + "---:|" * 10]
    for k in keys:
        c = runs[k]["eval"]["consistency"]
        L += [f"| {title[k]} | **{c['overall']:.3f}** | " + " | ".join(_fmt(v, 2) for v in c["per_class"]) + " |"]
    L += ["", f"({10 * s['per_class']} samples per run.)", ""]
    t = r["tsne"]
    L += ["## t-SNE of layer-l token features", ""]
    if t["images"]:
        L += ["![t-SNE](tsne.png)", "",
              f"For {len(t['images'])} held-out image(s) (indices {t['images']}), the hidden states after block "
              f"{t['layer']} of all 64 positions, embedded by t-SNE into 3 components read as RGB and drawn on the "
              "8x8 token grid (`mirai.visualize.tsne_grid`): similar colours = similar representations. "
              "It is the paper's figure of layer-l representations at toy scale; no number here is derived "
              "from it.", ""]
    else:
        L += ["(skipped: --tsne-images 0)", ""]
    L += ["## Files", "",
          "`tokenizer.pt`, `data/{train,heldout}` (code stores), `baseline/`, `mirai_e/` (run folders: config.yaml, "
          "metrics.jsonl, checkpoints), `samples/<run>/samples.npz`, the PNGs above, `report.json` (every number "
          "of this report). Re-running `python -m mirai.demo` reuses the tokenizer and the finished runs "
          "(`--fresh` starts over).", ""]
    path = out / "report.md"
    path.write_text("\n".join(L))
    return path


# --------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------
def clean(out: Path) -> None:
    """Remove what earlier demo calls wrote under `out` (and nothing else)."""
    for name in DEMO_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """The whole demo; returns the report dict (also in report.json)."""
    from mirai.checkpoint import load_gpt
    from mirai.images import to_uint8
    from mirai.visualize import tsne_figure, tsne_grid

    check_options(opts)
    out = Path(opts.out)
    if opts.fresh:
        clean(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(opts.device)
    specs = make_specs(opts, device)                         # bad --set values fail here, before any work
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    stages = Stages()
    timings_path = out / "timings.json"
    try:
        old_timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    except json.JSONDecodeError:
        old_timings = {}

    # 1. data
    stages.begin(1, "data", "data: scikit-learn digits, upscaled to 32x32, stratified held-out split")
    digits = load_digits_32(opts.heldout_frac, opts.seed)
    Stages.note(f"{len(digits.train_y)} train / {len(digits.held_y)} held-out images")

    # 2. tokenizer
    stages.begin(2, "tokenizer", f"tokenizer: k-means codebook of {opts.codebook_size} {PATCH}x{PATCH} patches "
                 f"-> {out / 'tokenizer.pt'}")
    tok_path = out / "tokenizer.pt"
    tok, tok_reused = fit_or_load_tokenizer(tok_path, digits.train_x, opts)
    Stages.note("reused the fitted tokenizer" if tok_reused else "fitted and saved")
    rec = tok.decode_code(tok.encode(digits.held_x))[:, :1]                         # [N, 1, 32, 32]
    heldout_mse = float(((rec - digits.held_x) ** 2).mean())
    plot_tokenizer(digits, tok, out / "tokenizer.png")
    digest = file_digest(tok_path)

    # 3. code stores
    stages.begin(3, "codes", f"codes: encoding both splits into {out / 'data'}/{{train,heldout}}")
    stores = write_stores(out / "data", tok, digits, digest)
    Stages.note(", ".join(f"{k}: {'reused' if v else 'written'}" for k, v in stores.items()))

    # 4. training
    stages.begin(4, "train", f"train: {' and '.join(s.title for s in specs)}, {specs[0].total_steps} steps each "
                 f"on {device} (python -m mirai.train)")
    training: dict[str, dict[str, Any]] = {}
    for spec in specs:
        Stages.note(f"--- {spec.title} -> {spec.run_dir}")
        measured = train_run(spec, device, opts.threads)
        if measured is None:
            Stages.note(f"{spec.run_dir}: finished run with these settings found; reused")
            prev = old_timings.get("runs", {}).get(spec.key) or {"seconds": None, "cpu_seconds": None, "load_avg": None,
                                                                 "threads": None}
            training[spec.key] = {"reused": True, **prev}
        else:
            Stages.note(f"trained in {measured['seconds']:.1f} s wall, {measured['cpu_seconds']:.1f} s CPU")
            training[spec.key] = {"reused": False, **measured}
    stages.end()
    stages.seconds.pop("train", None)
    for spec in specs:
        stages.seconds[f"train {spec.key}"] = 0.0 if training[spec.key]["reused"] else training[spec.key]["seconds"]

    # 5. evaluation
    stages.begin(5, "evaluate", "evaluate: held-out NTP loss, samples, class consistency")
    classifier = fit_classifier(digits)
    tokenized_held = tok.decode_code(tok.encode(digits.held_x))
    clf_info = {"kind": "RBF SVC (C=10), sklearn", "heldout_acc": float(np.mean(
        classifier.predict(pool8(digits.held_x)) == digits.held_y)),
        "heldout_tokenized_acc": float(np.mean(classifier.predict(pool8(tokenized_held)) == digits.held_y))}
    Stages.note(f"classifier: {clf_info['heldout_acc']:.3f} on real held-out digits, "
                f"{clf_info['heldout_tokenized_acc']:.3f} after tokenize -> decode")
    evals: dict[str, dict[str, Any]] = {}
    models = {}
    sample_panels = []
    shown = min(10, opts.samples_per_class)                  # samples per class drawn in samples.png
    tok_dev = tok.to(device)
    for spec in specs:
        raw = load_gpt(spec.run_dir, use_ema=False, device=device).float().eval()
        ntp_raw = heldout_ntp(raw, out / "data" / "heldout")
        del raw
        model = load_gpt(spec.run_dir, use_ema=True, device=device).float().eval()
        ntp_ema = heldout_ntp(model, out / "data" / "heldout")
        images, labels, stats = draw_samples(spec, model, tok_dev, opts)
        pred = classifier.predict(pool8(images))
        cons = consistency(pred, labels)
        recs = read_metrics(spec.run_dir)
        evals[spec.key] = {"heldout_ntp_ema": ntp_ema, "heldout_ntp_raw": ntp_raw, "consistency": cons,
                           "train_ntp_first": recs[0]["ntp_loss"] if recs else None,
                           "train_ntp_last": recs[-1]["ntp_loss"] if recs else None,
                           "sample_img_per_s": float(stats["images_per_s"])}
        Stages.note(f"{spec.title}: held-out NTP {ntp_ema:.4f} (EMA) / {ntp_raw:.4f} (raw), "
                    f"class consistency {cons['overall']:.3f}")
        models[spec.key] = model
        sample_panels.append((f"{spec.title}: class consistency {cons['overall']:.2f}",
                              class_rows(images, labels, shown)))
    plot_samples(sample_panels, shown, out / "samples.png")
    curves = {s.key: read_metrics(s.run_dir) for s in specs}
    plot_losses(curves, {k: v["heldout_ntp_ema"] for k, v in evals.items()}, {s.key: s.title for s in specs},
                out / "loss_curves.png")

    # 6. t-SNE
    fcfg = specs[1].cfg.foresight
    gpt_cfg = models["mirai_e"].config
    layer = fcfg.resolve(gpt_cfg).layer
    stages.begin(6, "tsne", f"t-SNE: layer-{layer} token features of {opts.tsne_images} held-out image(s)")
    from mirai.data.format import CodeStore
    held_store = CodeStore(out / "data" / "heldout")
    picks: list[int] = []
    for c in range(10):                                   # one image per class, classes in order
        if len(picks) >= opts.tsne_images:
            break
        picks.append(int(np.flatnonzero(digits.held_y == c)[0]))
    panels = []
    g = gpt_cfg.grid_size
    for i in picks:
        codes, label, _ = held_store.get(i, 0)
        decoded = tok_dev.decode_code(codes[None].to(device), (g, g))                 # [1, 3, 32, 32]
        panels.append((f"held-out #{i} (class {label})", to_uint8(decoded)[0]))
        for spec in specs:
            panels.append((f"{spec.title}, layer {layer}",
                           tsne_grid(models[spec.key], codes, label, layer, seed=opts.seed)))
    if panels:
        tsne_figure(panels, out / "tsne.png", suptitle=f"t-SNE of layer-{layer} token features (8x8 grid)")

    # 7. report
    stages.begin(7, "report", f"report: {out / 'report.md'}")
    stages.end()
    timings = {**stages.seconds, "total (this call)": round(time.perf_counter() - stages.t0, 2)}
    timings_path.write_text(json.dumps({"stages": timings, "runs": {
        k: {f: v.get(f) for f in ("seconds", "cpu_seconds", "load_avg", "threads")} for k, v in training.items()}},
        indent=2))
    base_cfg = specs[0].cfg
    fres = fcfg.resolve(gpt_cfg)
    steps_per_epoch = len(digits.train_y) // base_cfg.train.global_batch
    runs = {}
    for spec in specs:
        recs = curves[spec.key]
        tr = training[spec.key]
        sec = tr["seconds"]
        step_s = [r["step_time_s"] for r in recs if r.get("step_time_s")]
        runs[spec.key] = {"title": spec.title, "command": spec.display_command(), "run_dir": str(spec.run_dir),
                          "training": {**tr, "steps_per_s": spec.total_steps / sec if sec else None,
                                       "median_step_s": float(np.median(step_s)) if step_s else None},
                          "eval": evals[spec.key]}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "device_name": device_name(device),
        "torch": torch.__version__,
        "data": {"num_images": len(digits.train_y) + len(digits.held_y), "num_train": len(digits.train_y),
                 "num_heldout": len(digits.held_y), "seed": opts.seed},
        "tokenizer": {"codebook_size": tok.codebook_size, "patch": PATCH, "heldout_mse": heldout_mse,
                      "reused": tok_reused},
        "model": {"name": base_cfg.model.name, "dim": gpt_cfg.dim, "n_layer": gpt_cfg.n_layer,
                  "n_head": gpt_cfg.n_head, "vocab_size": gpt_cfg.vocab_size,
                  "params": sum(p.numel() for p in models["baseline"].parameters())},
        "train": {"steps": base_cfg.train.max_steps, "global_batch": base_cfg.train.global_batch,
                  "epochs": base_cfg.train.max_steps / max(steps_per_epoch, 1), "seed": base_cfg.train.seed,
                  "zero_stage": base_cfg.train.zero_stage},
        "foresight": {"k": fres.k, "layer": fres.layer, "layout": fres.layout, "ema_decay": fres.ema_decay,
                      "head_hidden": fres.head_hidden, "head_out": fres.head_out, "lambdas": fres.lambdas[0],
                      "lambda_end": (fres.lambda_end or fres.lambdas)[0], "switch_frac": fres.switch_frac,
                      "warmup_epochs": fres.warmup_epochs, "warmup_steps": fres.warmup_epochs * steps_per_epoch},
        "sampling": {"per_class": opts.samples_per_class, "shown_per_class": shown, "cfg_scale": opts.cfg_scale,
                     "temperature": opts.temperature, "top_k": opts.top_k, "seed": opts.seed},
        "classifier": clf_info,
        "tsne": {"layer": layer, "images": picks},
        "timings": timings,
        "runs": runs,
    }
    path = write_report(out, report)
    Stages.note(f"wrote {path}")
    for spec in specs:
        e = evals[spec.key]
        Stages.note(f"{spec.title:>20}: held-out NTP {e['heldout_ntp_ema']:.4f}, class consistency "
                    f"{e['consistency']['overall']:.3f}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mirai.config import ConfigError
    try:
        opts = options_from_args(args)
        run_demo(opts)
    except (ValueError, ConfigError, RuntimeError) as err:
        print(f"mirai demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
