"""``mirai visualize tsne``: the paper's picture of layer-l token representations.

For one image (a row of a code store, or an image file encoded with a tokenizer) the AR model is
run teacher-forced on the image's codes (``forward(idx = codes[:-1], cond = label,
hidden_layers=(l,))``); the residual stream after block l gives one feature per sequence position.
Position p is drawn at the grid cell of the token it predicts (``model.position_to_cell("target")``:
p itself for GPT, the region-reordered cell for PAR), so the T features tile the whole grid. The
features are embedded with t-SNE into 3 dimensions (``sklearn.manifold.TSNE``), each component
min-max scaled to [0, 1] and read as RGB: similar colours = similar representations. The figure
shows the image (when a tokenizer is given), the baseline's grid and, with ``--ckpt-b``, Mirai's
grid next to it; titles, no axes; saved as PNG.
"""
from __future__ import annotations

import argparse
import sys
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


def _load_codes(args, tokenizer, grid: int) -> tuple[torch.Tensor, int, str]:
    if args.codes:
        from mirai.data.format import CodeStore
        store = CodeStore(args.codes)
        if not 0 <= args.index < len(store):
            raise ValueError(f"--index {args.index} out of range: {args.codes} holds {len(store)} images")
        if store.grid_size != grid:
            raise ValueError(f"{args.codes}: grid {store.grid_size} but the model's grid is {grid}")
        codes, label, _ = store.get(args.index, args.aug)
        name = f"{Path(args.codes).name}[{args.index}]"
        return codes, label if args.label is None else args.label, name
    from mirai.images import center_crop_arr, read_rgb
    if tokenizer is None:
        raise ValueError("--image needs --vq or --tokenizer to encode it")
    if args.label is None:
        raise ValueError("--image needs --label (the class to condition on)")
    size = grid * tokenizer.downsample
    img = center_crop_arr(read_rgb(args.image), size)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    codes = tokenizer.encode(x.to(args.device))[0]
    return codes.cpu(), args.label, Path(args.image).name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai visualize", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="figure", required=True)
    t = sub.add_parser("tsne", help="t-SNE of layer-l token features drawn on the token grid",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--ckpt", required=True, help="baseline checkpoint (file or run folder)")
    t.add_argument("--ckpt-b", default=None, help="second checkpoint drawn next to it (Mirai)")
    t.add_argument("--title-a", default="baseline")
    t.add_argument("--title-b", default="Mirai")
    t.add_argument("--layer", type=int, default=8, help="1-based block count l (hidden state after block l)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--codes", help="code store folder (mirai prepare output)")
    src.add_argument("--image", help="an image file (needs --vq/--tokenizer and --label)")
    t.add_argument("--index", type=int, default=0, help="row of the code store")
    t.add_argument("--aug", type=int, default=0, help="augmentation of that row (0 = first crop)")
    t.add_argument("--label", type=int, default=None, help="class label (default: the store's)")
    t.add_argument("--vq", default=None, help="VQ checkpoint: also show the (decoded) image")
    t.add_argument("--tokenizer", default=None, help="PatchKMeansTokenizer file instead of --vq")
    t.add_argument("--vq-model", default="VQ-16")
    t.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", required=True, help="output PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mirai.checkpoint import CheckpointError, load_gpt
    from mirai.images import to_uint8
    from mirai.models.vq import VQCheckpointError, load_tokenizer
    try:
        device = torch.device(args.device)
        model_a = load_gpt(args.ckpt, use_ema=not args.no_ema, device=device).float().eval()
        model_b = None
        if args.ckpt_b:
            model_b = load_gpt(args.ckpt_b, use_ema=not args.no_ema, device=device).float().eval()
            if model_b.config.grid_size != model_a.config.grid_size:
                raise ValueError(f"{args.ckpt} and {args.ckpt_b} have different token grids")
        for m, path in ((model_a, args.ckpt), (model_b, args.ckpt_b)):
            if m is not None and not 1 <= args.layer <= m.config.n_layer:
                raise ValueError(f"--layer {args.layer}: {path} has {m.config.n_layer} blocks")
        tok_path = args.tokenizer or args.vq
        tokenizer = load_tokenizer(tok_path, args.vq_model, device=device) if tok_path else None
        g = model_a.config.grid_size
        codes, label, name = _load_codes(args, tokenizer, g)
        panels = []
        if tokenizer is not None:
            panels.append((f"{name} (class {label})", to_uint8(tokenizer.decode_code(codes[None].to(device), (g, g)))[0]))
        panels.append((f"{args.title_a}, layer {args.layer}", tsne_grid(model_a, codes, label, args.layer, args.seed)))
        if model_b is not None:
            panels.append((f"{args.title_b}, layer {args.layer}",
                           tsne_grid(model_b, codes, label, args.layer, args.seed)))
        out = tsne_figure(panels, args.out, suptitle=f"t-SNE of layer-{args.layer} token features ({g}x{g} grid)")
    except (VQCheckpointError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"mirai visualize: error: {err}", file=sys.stderr)
        return 2
    print(f"visualize: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
