"""``mirai eval``: FID, sFID, Inception Score, precision and recall of a sample batch.

Same protocol as the ADM evaluation suite (guided-diffusion's evaluator, used by LlamaGen and
the paper): both batches are .npz files whose ``arr_0`` is uint8 [N, H, W, 3]; the reference may
instead (or also) hold precomputed statistics ``mu``/``sigma`` (pool features) and
``mu_s``/``sigma_s`` (spatial features), as ADM's ``VIRTUAL_imagenet256_labeled.npz`` does.
Features come from the 2015 Inception network in PyTorch (``mirai.metrics.inception``; its
weights must be local: ``--inception-weights`` or ``MIRAI_INCEPTION_WEIGHTS``); the math is in
``mirai.metrics.stats`` and runs on injected features too (``compute_metrics``). Precision and
recall need the reference images (``arr_0``); without them they are reported as null.

Writes ``<samples>.metrics.json`` next to the samples (or ``--out``) and prints the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mirai.metrics.stats import FIDStatistics, inception_score, precision_recall


class EvalInputError(ValueError):
    """A sample/reference file is missing or malformed (names the file)."""


# ---------------------------------------------------------------------------------------------
# npz streaming (a 50k x 256 x 256 x 3 batch is ~10 GB: never load it whole)
# ---------------------------------------------------------------------------------------------
def npz_keys(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as err:
        raise EvalInputError(f"{path}: not an .npz file ({err})") from err


@contextmanager
def _open_member(path: Path, key: str):
    with zipfile.ZipFile(path) as z:
        name = f"{key}.npy"
        if name not in z.namelist():
            raise EvalInputError(f"{path}: no array {key!r} (has {npz_keys(path)})")
        with z.open(name) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise EvalInputError(f"{path}: {key} uses .npy format {version}, expected 1.0 or 2.0")
            yield f, shape, fortran, dtype


def npz_image_shape(path: Path, key: str = "arr_0") -> tuple[int, ...]:
    with _open_member(path, key) as (_, shape, fortran, dtype):
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8 or fortran:
            raise EvalInputError(f"{path}: {key} must be uint8 [N, H, W, 3] (C order), got {dtype} {shape}")
        return tuple(shape)


def iter_npz_images(path: str | Path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Stream uint8 [b, H, W, 3] batches of ``key`` without loading the whole array."""
    path = Path(path)
    n, h, w, c = npz_image_shape(path, key)
    per = h * w * c
    with _open_member(path, key) as (f, *_):
        for lo in range(0, n, batch_size):
            b = min(batch_size, n - lo)
            buf = f.read(b * per)
            if len(buf) != b * per:
                raise EvalInputError(f"{path}: {key} is truncated (image {lo + len(buf) // per} of {n})")
            yield np.frombuffer(bytearray(buf), dtype=np.uint8).reshape(b, h, w, c)   # writable


# ---------------------------------------------------------------------------------------------
# features and metrics
# ---------------------------------------------------------------------------------------------
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", required=True, help="sample batch .npz (arr_0: uint8 [N, H, W, 3])")
    p.add_argument("--ref", required=True, help="reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    p.add_argument("--inception-weights", default=None,
                   help="local weights-inception-2015-12-05-6726825d.pth (default: $MIRAI_INCEPTION_WEIGHTS, "
                        "then the torch hub cache)")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception batch")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="metrics JSON (default: <samples>.metrics.json)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mirai.metrics.inception import InceptionWeightsMissing
    try:
        m = evaluate(args.samples, args.ref, args.inception_weights, args.batch_size, args.device, args.out,
                     progress=not args.no_progress)
    except (InceptionWeightsMissing, EvalInputError, ValueError) as err:
        print(f"mirai eval: error: {err}", file=sys.stderr)
        return 2

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"
    print(f"Inception Score: {fmt(m['inception_score'])}\nFID: {fmt(m['fid'])}\nsFID: {fmt(m['sfid'])}\n"
          f"Precision: {fmt(m['precision'])}\nRecall: {fmt(m['recall'])}\nwritten to {m['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
