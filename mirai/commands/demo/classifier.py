"""The digit classifier: class consistency of samples, and the feature space of the demo's Frechet distance.

``DigitNet`` is a small CNN on the digits' native 8x8 resolution (32x32 images, grey, average-pooled to 8x8):
conv 3x3 (32) - ReLU - conv 3x3 (64) - ReLU - 2x2 max-pool - linear 1024 -> 64 - ReLU - linear 64 -> 10.
It is trained on the fit split only (Adam, cross-entropy). Its 64-d penultimate activations play the role
Inception's pool features play in FID: the demo's "FD" is a Frechet distance in the feature space of this
domain network, not comparable with ImageNet FID numbers. Saved as ``classifier.pt`` and reused while the
fit split and the settings are unchanged.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mirai.commands.demo.cache import load_current, mark_current
from mirai.commands.demo.data import digest

KIND = "mirai-demo-digit-classifier"
FEATURE_DIM = 64


def pool8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Grey 8x8 inputs [N, 1, 8, 8]: from [N, 1 or 3, H, W] in [-1, 1], or uint8 [N, H, W, 3] samples."""
    if isinstance(images, np.ndarray):                                              # uint8 [N, H, W, 3]
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1.0      # [N, 3, H, W]
    else:
        x = images.float()
    return F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 8)                         # [N, 1, 8, 8]


class DigitNet(nn.Module):
    """8x8 grey digit -> (logits [N, 10], features [N, 64])."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.out = nn.Linear(FEATURE_DIM, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)                 # [N, 64, 4, 4]
        feats = F.relu(self.fc(h.flatten(1)))                                            # [N, 64]
        return self.out(feats), feats

    @torch.no_grad()
    def predict(self, images, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(predicted labels [N], features float64 [N, 64]) of images (any form ``pool8`` reads)."""
        x = pool8(images)
        outs = [self.eval()(c) for c in x.split(batch)]
        logits = torch.cat([o[0] for o in outs])
        feats = torch.cat([o[1] for o in outs])
        return logits.argmax(1).numpy(), feats.double().numpy()


def train_classifier(x: torch.Tensor, y: np.ndarray, epochs: int, seed: int) -> DigitNet:
    """Adam (lr 2e-3), batch 64, ``epochs`` passes over x [N, 1, 32, 32] with labels y [N]."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitNet()
    gen = torch.Generator().manual_seed(seed)
    inputs, labels = pool8(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=gen).split(64):
            loss = F.cross_entropy(net(inputs[idx])[0], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def load_classifier(path: Path) -> DigitNet:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("kind") != KIND:
        raise ValueError(f"{path}: not a demo classifier file (kind {KIND!r})")
    net = DigitNet()
    net.load_state_dict(obj["state_dict"])
    return net.eval().requires_grad_(False)


def fit_or_load_classifier(path: Path, fit_x: torch.Tensor, fit_y: np.ndarray, eval_x: torch.Tensor,
                           eval_y: np.ndarray, tokenizer, tokenizer_key: str, epochs: int, seed: int):
    """(classifier, facts, reused). facts: its accuracy on the real evaluation digits and on the same digits
    after tokenize -> decode (the best a perfect generator can score through this tokenizer)."""
    key = digest("classifier", epochs, seed, fit_x, fit_y, eval_x, tokenizer_key)   # facts read eval + tokenizer
    found = load_current(path, key, load_classifier)
    if found is not None:
        return found[0], found[1], True
    t0 = time.process_time()
    net = train_classifier(fit_x, fit_y, epochs, seed)
    tmp = Path(path).with_suffix(".tmp")
    torch.save({"kind": KIND, "state_dict": net.state_dict()}, tmp)
    tmp.replace(path)
    decoded = tokenizer.decode_code(tokenizer.encode(eval_x))
    facts = {"eval_acc": float(np.mean(net.predict(eval_x)[0] == eval_y)),
             "eval_tokenized_acc": float(np.mean(net.predict(decoded)[0] == eval_y)),
             "fit_acc": float(np.mean(net.predict(fit_x)[0] == fit_y)),
             "cpu_seconds": round(time.process_time() - t0, 1)}
    mark_current(path, key, facts)
    return net, facts, False
