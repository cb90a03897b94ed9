"""The demo's frozen bidirectional encoder for Mirai-I (the role DINOv2 plays on ImageNet).

``DigitEncoder`` = the demo's tokenizer followed by ``GridTransformer``, a small transformer over the 8x8
token grid WITHOUT a causal mask: every cell attends to every cell, so each cell's feature can depend on the
whole image. It is trained on the fit split only, by masked-token prediction (BERT / MAE style: a random half
of the 64 tokens of each image is replaced by a mask token and predicted from the rest), then frozen. Its
per-cell features, the final LayerNorm output of the whole (unmasked) image, are what the Mirai-I run aligns
its layer-l hidden states with.

It has the interface ``mirai prepare --encoder`` expects of an encoder: ``targets(images [B, C, H, W] in
[0, 1]) -> [B, Tf, C]`` with ``name``, ``dim``, ``grid_size``, ``block_causal`` and ``input_size``, so the
demo writes its features into the code store exactly as prepare would (``mirai.commands.demo.data.write_store``).

``name`` is "features", the generic feature name of ``mirai.data.format.write_code_store``: the trainer
only accepts ``foresight.encoder.name`` values of encoders it could build itself, even when the features are
precomputed (it never builds the encoder then), and it matches a store's "features" with any such name.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirai.commands.demo.cache import load_current, mark_current
from mirai.commands.demo.data import GRID, IMAGE_SIZE, digest

KIND = "mirai-demo-grid-encoder"


@dataclass(frozen=True)
class EncoderSettings:
    """Architecture and training of the encoder (fixed; part of its cache key)."""

    dim: int = 64            # feature width C (the Mirai-I heads' output size)
    depth: int = 2           # transformer layers
    heads: int = 4           # attention heads
    mask_ratio: float = 0.5  # fraction of the 64 tokens masked per training image
    batch: int = 16          # images per step
    lr: float = 5e-3         # AdamW, constant after a 20-step warm-up
    steps: int = 1600        # optimizer steps


class GridTransformer(nn.Module):
    """Bidirectional pre-norm transformer over raster token grids: codes [B, T] -> features [B, T, dim]."""

    def __init__(self, vocab: int, grid: int, s: EncoderSettings):
        super().__init__()
        self.mask_id = vocab                                       # one extra embedding row: the mask token
        self.tok = nn.Embedding(vocab + 1, s.dim)
        self.pos = nn.Parameter(torch.randn(1, grid * grid, s.dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(s.dim, s.heads, 4 * s.dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(s.depth))
        self.norm = nn.LayerNorm(s.dim)
        self.head = nn.Linear(s.dim, vocab)

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.tok(codes) + self.pos                              # [B, T, dim]
        for block in self.blocks:
            h = block(h)                                            # no mask: every cell sees every cell
        return self.norm(h)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(codes))                      # [B, T, vocab] logits


class DigitEncoder(nn.Module):
    """Tokenizer + frozen ``GridTransformer``: pixels in [0, 1] -> per-cell features (``mirai prepare``'s
    encoder interface; see the module docstring)."""

    name = "features"
    block_causal = 0
    input_size = IMAGE_SIZE

    def __init__(self, tokenizer, net: GridTransformer, settings: EncoderSettings):
        super().__init__()
        self.tokenizer, self.net, self.settings = tokenizer, net, settings
        self.dim, self.grid_size = settings.dim, GRID
        self.description = (f"mirai.commands.demo.encoder.DigitEncoder: k-means tokens -> bidirectional transformer "
                            f"(dim {settings.dim}, {settings.depth} layers), masked-token training")
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [0, 1] -> features [B, 64, dim] (fp32; stores keep them in bf16)."""
        codes = self.tokenizer.encode(images.float() * 2.0 - 1.0)                      # [B, T]
        return self.net.features(codes)

    def save(self, path: Path) -> None:
        tmp = Path(path).with_suffix(".tmp")
        torch.save({"kind": KIND, "settings": dataclasses.asdict(self.settings),
                    "vocab": self.net.mask_id, "state_dict": self.net.state_dict()}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, tokenizer) -> "DigitEncoder":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("kind") != KIND:
            raise ValueError(f"{path}: not a demo encoder file (kind {KIND!r})")
        settings = EncoderSettings(**obj["settings"])
        net = GridTransformer(int(obj["vocab"]), GRID, settings)
        net.load_state_dict(obj["state_dict"])
        return cls(tokenizer, net, settings)


def mask_tokens(codes: torch.Tensor, ratio: float, mask_id: int, gen: torch.Generator):
    """(inputs with round(ratio * T) random tokens per row replaced by ``mask_id``, bool mask [B, T])."""
    b, t = codes.shape
    n = max(1, round(ratio * t))
    order = torch.rand(b, t, generator=gen).argsort(dim=1)                             # random permutation
    masked = torch.zeros(b, t, dtype=torch.bool).scatter_(1, order[:, :n], True)
    return codes.masked_fill(masked, mask_id), masked


@torch.no_grad()
def masked_accuracy(net: GridTransformer, codes: torch.Tensor, ratio: float, seed: int = 0) -> float:
    """Fraction of masked tokens the encoder predicts right (one fixed masking of ``codes``)."""
    inputs, masked = mask_tokens(codes, ratio, net.mask_id, torch.Generator().manual_seed(seed))
    pred = net.eval()(inputs).argmax(-1)
    return float((pred == codes)[masked].float().mean())


def train_grid_transformer(codes: torch.Tensor, vocab: int, s: EncoderSettings, seed: int) -> tuple[GridTransformer, float]:
    """Masked-token training on codes [N, T]; returns the net and its last-50-steps mean loss."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = GridTransformer(vocab, GRID, s)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20))
    net.train()
    losses = []
    for _ in range(s.steps):
        batch = codes[torch.randint(len(codes), (s.batch,), generator=gen)]           # [B, T]
        inputs, masked = mask_tokens(batch, s.mask_ratio, net.mask_id, gen)
        logits = net(inputs)                                                             # [B, T, V]
        loss = F.cross_entropy(logits[masked], batch[masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    tail = losses[-50:]
    return net.eval().requires_grad_(False), sum(tail) / len(tail)


def fit_or_load_encoder(path: Path, tokenizer, tokenizer_key: str, fit_x: torch.Tensor, eval_x: torch.Tensor,
                        settings: EncoderSettings, seed: int):
    """(frozen DigitEncoder, facts, reused): fitted on the fit split's tokens only, cached at ``path``."""
    fit_codes = tokenizer.encode(fit_x)                                                  # [N, T]
    key = digest("encoder", tokenizer_key, dataclasses.asdict(settings), seed, fit_codes)
    found = load_current(path, key, lambda p: DigitEncoder.load(p, tokenizer))
    if found is not None:
        return found[0], found[1], True
    t0 = time.process_time()
    net, loss = train_grid_transformer(fit_codes, tokenizer.codebook_size, settings, seed)
    enc = DigitEncoder(tokenizer, net, settings)
    enc.save(path)
    facts = {"train_loss_last50": loss, "cpu_seconds": round(time.process_time() - t0, 1),
             "params": sum(p.numel() for p in net.parameters()),
             "eval_masked_accuracy": masked_accuracy(net, tokenizer.encode(eval_x), settings.mask_ratio),
             "fit_masked_accuracy": masked_accuracy(net, fit_codes, settings.mask_ratio)}
    mark_current(path, key, facts)
    return enc, facts, False
