"""Evaluation of one demo run (cached in ``<run>/demo_eval.json`` while its inputs are unchanged).

For each kept checkpoint (``eval_points`` of them, the last one final), with the EMA weights:

* **NTP**: held-out next-token loss, the mean cross-entropy in nats over every token of every image of the
  evaluation split, teacher-forced with the true label (the raw weights' value too at the final step);
* at the last ``fd_points`` checkpoints, ``samples_per_class`` samples of each class (KV-cache decoding,
  CFG, seeded by the run's seed and the step), decoded by the tokenizer, then
  **class consistency** (fraction the digit classifier assigns to the conditioning class) and **FD**: the
  Frechet distance between the classifier's 64-d features of the samples and of the real evaluation
  digits (FID computed with a domain network instead of Inception, ``mirai.metrics.stats``).

At the final checkpoint also the **2D organisation** of the layer-l hidden states (l = the injection layer,
the same for every method): for each evaluation image the features of its 64 positions (each drawn at the
grid cell it predicts, ``mirai.figures.token_features``), centred by their mean over the whole split and
L2-normalised; ``org`` = mean cosine similarity of grid neighbours (Manhattan distance 1) minus the mean over
all pairs of distinct cells of the same image. 0 means no spatial organisation; the curve of the similarity
against the Manhattan distance is kept for the figure.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirai.commands.demo.data import digest

EVAL_FILE = "demo_eval.json"
SAMPLES_FILE = "demo_samples.npz"


@dataclass
class EvalSettings:
    """What evaluating a run needs besides the run (picklable; its digest keys the cache)."""

    tokenizer: Path           # tokenizer.pt
    classifier: Path          # classifier.pt
    eval_store: Path          # code store of the evaluation split
    inputs_key: str           # digest of tokenizer, classifier and evaluation store
    samples_per_class: int
    cfg_scale: float
    temperature: float
    top_k: int
    fd_points: int
    ref_mu: Any               # float64 [64]: classifier features of the real evaluation digits
    ref_sigma: Any            # float64 [64, 64]
    device: str = "cpu"

    def cache_key(self, run_dir: Path, steps: list[int], layer: int) -> str:
        fields = {k: str(v) for k, v in asdict(self).items() if k not in ("ref_mu", "ref_sigma", "device")}
        metas = [(Path(run_dir) / "checkpoints" / f"step_{s:08d}" / "meta.json").read_bytes() for s in steps]
        return digest("eval", json.dumps(fields, sort_keys=True), steps, layer, *metas)


def fd_steps(steps: list[int], fd_points: int) -> list[int]:
    """The last ``fd_points`` of ``steps``, evenly spaced, the final one included."""
    n = len(steps)
    k = min(fd_points, n)
    return sorted({steps[round((j + 1) * n / k) - 1] for j in range(k)})


@torch.no_grad()
def heldout_ntp(model, codes: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy (nats) over every token of codes [N, T], teacher-forced."""
    import torch.nn.functional as F
    device = model.output.weight.device
    total, count = 0.0, 0
    model.eval()
    for lo in range(0, len(codes), batch_size):
        c, y = codes[lo:lo + batch_size].to(device), labels[lo:lo + batch_size].to(device)
        idx, targets = model.prepare_inputs(c)                                          # [B, T-1], [B, T]
        logits = model(idx, y).logits.float()                                           # [B, T, V]
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return total / count


def sample_images(model, tokenizer, per_class: int, s: EvalSettings, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [10 * per_class, 32, 32, 3] samples (labels 0..9 in turn) and their labels."""
    from mirai.data.images import to_uint8
    labels = torch.arange(10 * per_class) % 10
    device = model.output.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = model.generate(labels.to(device), cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k,
                           generator=gen)                                               # [N, T]
    g = model.config.grid_size
    return to_uint8(tokenizer.decode_code(codes, (g, g)).float()), labels.numpy()


def consistency(pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    per_class = [float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else None for c in range(10)]
    return {"overall": float(np.mean(pred == labels)), "per_class": per_class}


def sample_metrics(model, tokenizer, classifier, s: EvalSettings, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """(consistency and FD of fresh samples, the samples, their labels)."""
    from mirai.metrics.stats import FIDStatistics
    images, labels = sample_images(model, tokenizer, s.samples_per_class, s, seed)
    pred, feats = classifier.predict(images)
    fd = FIDStatistics.from_features(feats).frechet_distance(FIDStatistics(np.asarray(s.ref_mu),
                                                                           np.asarray(s.ref_sigma)))
    cons = consistency(pred, labels)
    return {"fd": fd, "consistency": cons["overall"], "per_class": cons["per_class"]}, images, labels


def layer_features(model, codes: torch.Tensor, labels: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer-l hidden states of every position, at the grid cell each predicts: [N, T, D]."""
    from mirai.figures import token_features
    return torch.stack([token_features(model, c, int(y), layer) for c, y in zip(codes, labels)])


def organisation(features: torch.Tensor, grid: int) -> dict[str, Any]:
    """2D organisation of features [N, T, D] on a grid x grid raster (see the module docstring)."""
    x = features.double()
    x = torch.nn.functional.normalize(x - x.mean(dim=(0, 1)), dim=-1)
    sim = x @ x.transpose(1, 2)                                                         # [N, T, T]
    rc = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(-1, 2)
    dist = (rc[:, None, :] - rc[None, :, :]).abs().sum(-1)                              # [T, T] Manhattan
    pair_mean = float(sim[:, dist > 0].mean())
    curve = [float(sim[:, dist == d].mean()) for d in range(1, 2 * grid - 1)]
    return {"org": curve[0] - pair_mean, "neighbour_sim": curve[0], "pair_sim": pair_mean, "sim_by_distance": curve}


def evaluate_run(run_dir: Path, seed: int, layer: int, s: EvalSettings) -> dict[str, Any]:
    """Every number of one finished run (see the module docstring); reads the cache when it is current."""
    from mirai.checkpoint import list_checkpoints
    steps = [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir) if (p / "meta.json").is_file()]
    key = s.cache_key(run_dir, steps, layer)
    cache = Path(run_dir) / EVAL_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key and (Path(run_dir) / SAMPLES_FILE).is_file():
            return {**cached["result"], "reused": True}
    except (OSError, json.JSONDecodeError):
        pass
    result = _evaluate(Path(run_dir), steps, seed, layer, s)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}))
    tmp.replace(cache)
    return {**result, "reused": False}


def _evaluate(run_dir: Path, steps: list[int], seed: int, layer: int, s: EvalSettings) -> dict[str, Any]:
    from mirai.checkpoint import load_gpt
    from mirai.data.format import CodeStore
    from mirai.commands.demo.classifier import load_classifier
    from mirai.models.vq import PatchKMeansTokenizer
    tok = PatchKMeansTokenizer.load(s.tokenizer, device=s.device)
    classifier = load_classifier(s.classifier)
    store = CodeStore(s.eval_store)
    codes = torch.from_numpy(np.array(store.codes[:, 0], dtype=np.int64))              # [N, T]
    labels = torch.from_numpy(np.array(store.labels, dtype=np.int64))                  # [N]
    with_fd = set(fd_steps(steps, s.fd_points))
    curve = []
    for step in steps:
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        model = load_gpt(ckpt, use_ema=True, device=s.device).float().eval()
        point: dict[str, Any] = {"step": step, "ntp": heldout_ntp(model, codes, labels)}
        if step in with_fd:
            metrics, images, sample_labels = sample_metrics(model, tok, classifier, s, seed * 1_000_003 + step)
            point.update(metrics)
        curve.append(point)
    final = dict(curve[-1])
    raw = load_gpt(run_dir / "checkpoints" / f"step_{steps[-1]:08d}", use_ema=False, device=s.device).float()
    final["ntp_raw"] = heldout_ntp(raw, codes, labels)
    final.update(organisation(layer_features(model, codes, labels, layer), model.config.grid_size))
    np.savez(run_dir / SAMPLES_FILE, images=images, labels=sample_labels)             # the final step's samples
    return {"steps": steps, "curve": curve, "final": final, "layer": layer}


def evaluation_settings(opts, out: Path, inputs: dict[str, Any], device: str) -> EvalSettings:
    """The settings every run's evaluation shares, with the real evaluation digits' feature statistics."""
    from mirai.commands.demo.data import file_digest
    from mirai.metrics.stats import FIDStatistics
    digits = inputs["digits"]
    ref = FIDStatistics.from_features(inputs["classifier"].predict(digits.eval_x)[1])
    key = digest(inputs["tok_key"], file_digest(out / "classifier.pt"), inputs["eval_key"])
    return EvalSettings(tokenizer=out / "tokenizer.pt", classifier=out / "classifier.pt",
                        eval_store=out / "data" / "eval", inputs_key=key, samples_per_class=opts.samples_per_class,
                        cfg_scale=opts.cfg_scale, temperature=opts.temperature, top_k=opts.top_k,
                        fd_points=opts.fd_points, ref_mu=ref.mu, ref_sigma=ref.sigma, device=device)


def reference_distances(inputs: dict[str, Any], s: EvalSettings, seed: int = 0) -> dict[str, float]:
    """FD of real fit-split digits (as many per class as samples) to the evaluation digits, as they are and
    after tokenize -> decode: what perfect samples would score, with and without the tokenizer's loss."""
    from mirai.data.images import to_uint8
    from mirai.metrics.stats import FIDStatistics
    digits, clf, tok = inputs["digits"], inputs["classifier"], inputs["tokenizer"]
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(np.flatnonzero(digits.fit_y == c))[:s.samples_per_class]
                           for c in range(10)])
    real = digits.fit_x[torch.from_numpy(pick)]
    ref = FIDStatistics(np.asarray(s.ref_mu), np.asarray(s.ref_sigma))
    decoded = to_uint8(tok.decode_code(tok.encode(real)))
    return {"real": FIDStatistics.from_features(clf.predict(real)[1]).frechet_distance(ref),
            "tokenized": FIDStatistics.from_features(clf.predict(decoded)[1]).frechet_distance(ref),
            "images": int(len(pick))}
