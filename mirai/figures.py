"""Figures of the paper: t-SNE of layer-l token representations drawn on the token grid (``mirai visualize tsne``).

For one image (a row of a code store, or an image file encoded with a tokenizer) the AR model is
run teacher-forced on the image's codes (``forward(idx = codes[:-1], cond = label,
hidden_layers=(l,))``); the residual stream after block l gives one feature per sequence position.
Position p is drawn at the grid cell of the token it predicts (``model.position_to_cell("target")``:
p itself for GPT, the region-reordered cell for PAR), so the T features tile the whole grid. The
features are embedded with t-SNE into 3 dimensions (``sklearn.manifold.TSNE``), each component
min-max scaled to [0, 1] and read as RGB: similar colours = similar representations. The command's
figure shows the image (when a tokenizer is given), the baseline's grid and Mirai's grid next to it;
titles, no axes; saved as PNG.

    token_features(model, codes, label, layer)   [T, D] hidden states after block l, in raster order
    tsne_rgb(features)                           [T, 3] t-SNE colours in [0, 1]
    tsne_grid(model, codes, label, layer)        [g, g, 3] the colours on the token grid
    tsne_figure(panels, out)                     panels side by side, saved as PNG
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def token_features(model, codes: torch.Tensor, label: int, layer: int) -> torch.Tensor:
    """Hidden state after block ``layer`` of every sequence position, in raster (grid-cell) order: [T, D]."""
    device = model.output.weight.device
    codes = codes.reshape(1, -1).long().to(device)                                   # [1, N]
    idx, _ = model.prepare_inputs(codes) if hasattr(model, "prepare_inputs") else (codes[:, :-1], codes)
    cond = torch.tensor([label], device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(idx, cond, hidden_layers=(layer,), return_logits=False)
    finally:
        model.train(was)
    h = out.hidden[layer][0].float().cpu()                                            # [T, D] sequence order
    if hasattr(model, "position_to_cell"):
        cell = model.position_to_cell("target")                                       # [T] grid cell of position p
        raster = torch.empty_like(h)
        raster[cell] = h
        return raster
    return h


def tsne_rgb(features: torch.Tensor | np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """t-SNE of [T, D] features to 3 components, each scaled to [0, 1] -> RGB [T, 3]."""
    from sklearn.manifold import TSNE
    x = np.asarray(features, dtype=np.float32)
    perplexity = float(min(perplexity, max(1.0, (len(x) - 1) / 3)))
    emb = TSNE(n_components=3, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    lo, hi = emb.min(0, keepdims=True), emb.max(0, keepdims=True)
    return (emb - lo) / np.maximum(hi - lo, 1e-12)


def tsne_figure(panels: list[tuple[str, np.ndarray]], out: str | Path, suptitle: str | None = None) -> Path:
    """Draw [h, w, 3] float/uint8 panels side by side with titles and no axes; save a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, img) in zip(axes[0], panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=120, format="png")
    plt.close(fig)
    return out


def tsne_grid(model, codes: torch.Tensor, label: int, layer: int, seed: int = 0) -> np.ndarray:
    """RGB t-SNE colours of one image's layer-l token features on the token grid: [g, g, 3]."""
    g = model.config.grid_size
    rgb = tsne_rgb(token_features(model, codes, label, layer), seed)
    return rgb.reshape(g, g, 3)                                                       # raster -> grid
