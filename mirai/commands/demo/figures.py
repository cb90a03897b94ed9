"""The demo's figures (PNG, matplotlib's Agg backend). Colours: baseline blue, Mirai-E red, Mirai-I green."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

COLOURS = {"baseline": "tab:blue", "mirai_e": "tab:red", "mirai_i": "tab:green"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_tokenizer(real: torch.Tensor, tok, path: Path) -> Path:
    """Real digits (top row) and the same digits after tokenize -> decode (bottom row)."""
    from PIL import Image

    from mirai.data.images import make_grid, to_uint8
    rec = tok.decode_code(tok.encode(real))
    grid = make_grid(np.concatenate([to_uint8(real.expand(-1, 3, -1, -1)), to_uint8(rec)]), nrow=len(real))
    img = Image.fromarray(grid)
    img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(path)
    return path


def class_rows(images: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one mosaic with a row per class 0..9 (per_class images each, white padding)."""
    from mirai.data.images import make_grid
    ordered = []
    for c in range(10):
        sel = images[labels == c][:per_class]
        if len(sel) < per_class:
            sel = np.concatenate([sel, np.full((per_class - len(sel),) + images.shape[1:], 255, np.uint8)])
        ordered.append(sel)
    return make_grid(np.concatenate(ordered), nrow=per_class, pad=2)


def plot_samples(panels: list[tuple[str, np.ndarray]], per_class: int, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(0.42 * per_class * len(panels) + 1.5, 5.2), squeeze=False)
    for ax, (title, grid) in zip(axes[0], panels):
        ax.imshow(grid, interpolation="nearest")
        cell = (grid.shape[0] - 2) / 10
        ax.set_yticks([2 + cell * (c + 0.5) for c in range(10)], [str(c) for c in range(10)])
        ax.set_xticks([])
        ax.set_ylabel("conditioning class")
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _band(ax, x, rows: list[list[float]], colour: str, label: str) -> None:
    """Mean over seeds (rows) as a line, +- one standard deviation as a band (when there are 2+ seeds)."""
    a = np.asarray(rows, dtype=float)                                               # [seeds, points]
    mean = a.mean(0)
    ax.plot(x, mean, color=colour, marker="o", ms=3, label=label)
    if len(a) > 1:
        sd = a.std(0, ddof=1)
        ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.2, lw=0)


def plot_convergence(curves: dict[str, list[list[dict[str, Any]]]], train_logs: dict[str, list[list[dict]]],
                     titles: dict[str, str], eval_name: str, path: Path) -> Path:
    """Held-out NTP and FD against the step (mean +- sd over seeds), and the training foresight loss."""
    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, runs in curves.items():
        steps = [p["step"] for p in runs[0]]
        _band(a1, steps, [[p["ntp"] for p in r] for r in runs], COLOURS[method], titles[method])
        fd = [p["step"] for p in runs[0] if "fd" in p]
        _band(a2, fd, [[p["fd"] for p in r if "fd" in p] for r in runs], COLOURS[method], titles[method])
    for method, logs in train_logs.items():
        recs = [r for r in logs[0] if r.get("head_loss")]
        if recs:
            steps = [r["step"] for r in recs]
            rows = [[float(np.mean(r["head_loss"])) for r in log if r.get("head_loss")] for log in logs]
            _band(a3, steps, rows, COLOURS[method], f"{titles[method]}: mean over heads of -cos")
    a1.set_title(f"{eval_name} next-token loss (EMA weights)")
    a1.set_ylabel("nats per token")
    a2.set_title(f"Frechet distance to the {eval_name} digits (digit-classifier features)")
    a3.set_title("foresight loss during training (0 while lambda = 0)")
    for ax in (a1, a2, a3):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_organisation(finals: dict[str, list[dict[str, Any]]], titles: dict[str, str], layer: int,
                      path: Path) -> Path:
    """Left: cosine similarity of layer-l features against grid distance; right: the org number per seed."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (method, runs) in enumerate(finals.items()):
        dist = np.arange(1, len(runs[0]["sim_by_distance"]) + 1)
        _band(a1, dist, [r["sim_by_distance"] for r in runs], COLOURS[method], titles[method])
        orgs = [r["org"] for r in runs]
        a2.bar(i, np.mean(orgs), color=COLOURS[method], alpha=0.5)
        a2.scatter(np.full(len(orgs), i) + np.linspace(-0.15, 0.15, len(orgs)), orgs, color=COLOURS[method], s=18)
    a1.set_xlabel("Manhattan distance between the two cells (same image)")
    a1.set_ylabel("mean cosine similarity (centred features)")
    a1.set_title(f"layer-{layer} features: similarity against grid distance")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_xticks(range(len(finals)), [titles[m] for m in finals])
    a2.set_ylabel("neighbour similarity - all-pairs similarity")
    a2.set_title("2D organisation (bar: mean, dots: seeds)")
    a2.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_tsne(images: np.ndarray, rows: list[tuple[str, np.ndarray]], layer: int, path: Path) -> Path:
    """Top row: the decoded digits; then one row per model: each cell's colour = its t-SNE embedding (fitted
    jointly over all the images of that row, so colours compare across the images of a row)."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.3 * n + 1.6, 1.4 * (1 + len(rows))), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j], interpolation="nearest")
        for i, (_, rgb) in enumerate(rows):
            axes[1 + i, j].imshow(rgb[j], interpolation="nearest")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("digit", fontsize=8)
    for i, (title, _) in enumerate(rows):
        axes[1 + i, 0].set_ylabel(title, fontsize=8)
    fig.suptitle(f"layer-{layer} features: t-SNE to 3 components read as RGB,\none fit per row over all its images",
                 fontsize=9)
    return _save(fig, path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records in step order (the last record of a step wins after a resume)."""
    import json
    path = Path(run_dir) / "metrics.jsonl"
    by_step: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def tsne_rows(models: dict[str, Any], codes: torch.Tensor, labels: torch.Tensor, layer: int,
              seed: int) -> list[np.ndarray]:
    """Per model: RGB [n, g, g, 3] of one t-SNE fitted jointly over the layer-l features of all n images."""
    from mirai.commands.demo.evaluate import layer_features
    from mirai.figures import tsne_rgb
    rows = []
    for model in models.values():
        feats = layer_features(model, codes, labels, layer)                         # [n, T, D]
        n, t, _ = feats.shape
        g = model.config.grid_size
        rows.append(tsne_rgb(feats.reshape(n * t, -1), seed).reshape(n, g, g, 3))
    return rows


def draw_figures(opts, out: Path, plan, results: dict[str, dict[str, Any]], inputs: dict[str, Any],
                 device: str) -> dict[str, str]:
    """convergence.png, samples.png, organisation.png and (unless --tsne-images 0) tsne.png."""
    from mirai.checkpoint import load_gpt
    from mirai.commands.demo.runs import METHODS, TITLES
    from mirai.data.images import to_uint8
    by_method = {m: [s for s in plan.specs if s.method == m] for m, _, _ in METHODS}
    evals = {m: [results[s.key]["eval"] for s in specs] for m, specs in by_method.items()}
    names = {"convergence": "convergence.png", "samples": "samples.png", "organisation": "organisation.png"}
    plot_convergence({m: [e["curve"] for e in ev] for m, ev in evals.items()},
                     {m: [read_metrics(s.run_dir) for s in specs] for m, specs in by_method.items()},
                     TITLES, inputs["digits"].eval_name, out / names["convergence"])
    shown = min(8, opts.samples_per_class)
    panels = []
    for m, specs in by_method.items():
        with np.load(specs[0].run_dir / "demo_samples.npz") as npz:
            grid = class_rows(npz["images"], npz["labels"], shown)
        panels.append((f"{TITLES[m]} (seed 0): class consistency {evals[m][0]['final']['consistency']:.2f}", grid))
    plot_samples(panels, shown, out / names["samples"])
    layer = plan.specs[0].layer
    plot_organisation({m: [e["final"] for e in ev] for m, ev in evals.items()}, TITLES, layer,
                      out / names["organisation"])
    if opts.tsne_images:
        digits, tok = inputs["digits"], inputs["tokenizer"]
        pick = [int(np.flatnonzero(digits.eval_y == c)[0]) for c in range(opts.tsne_images)]
        codes = tok.encode(digits.eval_x[pick])                                      # [n, T]
        labels = torch.from_numpy(digits.eval_y[pick])
        models = {m: load_gpt(specs[0].run_dir, use_ema=True, device=device).float().eval()
                  for m, specs in by_method.items()}
        rows = tsne_rows(models, codes, labels, layer, opts.data_seed)
        images = to_uint8(tok.decode_code(codes))
        plot_tsne(images, [(f"{TITLES[m]} (seed 0)", r) for m, r in zip(models, rows)], layer, out / "tsne.png")
        names["tsne"] = "tsne.png"
    return names
