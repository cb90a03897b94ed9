"""FID, sFID, Inception Score, precision and recall of a sample batch (the library of ``mirai eval``).

Same protocol as the ADM evaluation suite (guided-diffusion's evaluator, used by LlamaGen and
the paper): both batches are .npz files whose ``arr_0`` is uint8 [N, H, W, 3]; the reference may
instead (or also) hold precomputed statistics ``mu``/``sigma`` (pool features) and
``mu_s``/``sigma_s`` (spatial features), as ADM's ``VIRTUAL_imagenet256_labeled.npz`` does.
Features come from the 2015 Inception network in PyTorch (``mirai.metrics.inception``; its
weights must be local: ``inception_weights`` (``mirai eval --inception-weights``) or ``MIRAI_INCEPTION_WEIGHTS``);
the .npz files are streamed by ``mirai.io.npz``; the math is in
``mirai.metrics.stats`` and runs on injected features too (``compute_metrics``). Precision and
recall need the reference images (``arr_0``); without them they are reported as null.

``evaluate`` writes ``<samples>.metrics.json`` next to the samples (or to ``out``) and returns the numbers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from mirai.io.npz import NpzError, iter_npz_images, npz_image_shape, npz_keys
from mirai.metrics.stats import FIDStatistics, inception_score, precision_recall


class EvalInputError(NpzError):
    """The batches cannot be evaluated (no images, no reference images or statistics); names the file."""


def extract_features(net, batches, device="cpu", progress: str | None = None) -> dict[str, np.ndarray]:
    """Run the Inception net over uint8 NHWC batches -> {"pool", "spatial", "logits"} float32 arrays."""
    out: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc=progress, unit="img", dynamic_ncols=True)
    for batch in batches:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)   # [b, 3, H, W]
        feats = net(x)
        for k in out:
            out[k].append(feats[k].cpu().numpy())
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    if not out["pool"]:
        raise EvalInputError("no images to evaluate")
    return {k: np.concatenate(v) for k, v in out.items()}


def compute_metrics(sample: dict[str, np.ndarray], ref: dict[str, np.ndarray] | None = None,
                    ref_stats: dict[str, np.ndarray] | None = None, k: int = 3, split_size: int = 5000,
                    device="cpu") -> dict:
    """Metrics from features. ``sample``: {"pool", "spatial", "logits"}; ``ref``: reference
    {"pool", "spatial"} features or None; ``ref_stats``: precomputed {"mu", "sigma"[, "mu_s",
    "sigma_s"]} (take precedence for FID/sFID, as in ADM)."""
    if ref is None and not ref_stats:
        raise EvalInputError("reference has neither images (arr_0) nor statistics (mu, sigma)")
    s_pool = FIDStatistics.from_features(sample["pool"])
    s_spat = FIDStatistics.from_features(sample["spatial"])
    if ref_stats and "mu" in ref_stats:
        r_pool = FIDStatistics(ref_stats["mu"], ref_stats["sigma"])
    else:
        r_pool = FIDStatistics.from_features(ref["pool"])
    if ref_stats and "mu_s" in ref_stats:
        r_spat = FIDStatistics(ref_stats["mu_s"], ref_stats["sigma_s"])
    elif ref is not None:
        r_spat = FIDStatistics.from_features(ref["spatial"])
    else:
        r_spat = None
    metrics = {
        "inception_score": inception_score(sample["logits"], split_size),
        "fid": s_pool.frechet_distance(r_pool),
        "sfid": None if r_spat is None else s_spat.frechet_distance(r_spat),
        "precision": None,
        "recall": None,
        "num_samples": int(len(sample["pool"])),
        "num_ref": None if ref is None else int(len(ref["pool"])),
    }
    if ref is not None:
        metrics["precision"], metrics["recall"] = precision_recall(ref["pool"], sample["pool"], k=k, device=device)
    return metrics


def evaluate(samples: str | Path, ref: str | Path, inception_weights: str | None = None, batch_size: int = 100,
             device: str | torch.device | None = None, out: str | Path | None = None, progress: bool = True) -> dict:
    """Metrics of the ``samples`` batch against the ``ref`` batch (see the module docstring); also written as JSON
    (``out``, default ``<samples>.metrics.json``), whose path the returned dict holds under "json"."""
    from mirai.metrics.inception import load_inception
    samples, ref = Path(samples), Path(ref)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "arr_0" not in npz_keys(samples):
        raise EvalInputError(f"{samples}: no arr_0 (uint8 [N, H, W, 3] samples)")
    npz_image_shape(samples)
    ref_keys = npz_keys(ref)
    if "arr_0" not in ref_keys and "mu" not in ref_keys:
        raise EvalInputError(f"{ref}: neither arr_0 (reference images) nor mu/sigma (statistics)")
    net = load_inception(inception_weights, device)           # fails here, before any work, if missing
    t0 = time.time()
    sample_feats = extract_features(net, iter_npz_images(samples, batch_size), device,
                                    "inception (samples)" if progress else None)
    ref_feats = None
    if "arr_0" in ref_keys:
        ref_feats = extract_features(net, iter_npz_images(ref, batch_size), device,
                                     "inception (reference)" if progress else None)
    ref_stats = None
    if "mu" in ref_keys:
        with np.load(ref) as z:
            ref_stats = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in z.files}
    metrics = compute_metrics(sample_feats, ref_feats, ref_stats, device=device)
    metrics.update({"samples": str(samples), "ref": str(ref), "seconds": round(time.time() - t0, 2)})
    out = Path(out) if out else samples.with_name(samples.stem + ".metrics.json")
    out.write_text(json.dumps(metrics, indent=2))
    metrics["json"] = str(out)
    return metrics
