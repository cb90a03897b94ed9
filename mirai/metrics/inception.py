"""The 2015 TF Inception-v3 used by FID/sFID/IS/precision-recall, as a PyTorch module.

Same module names as torch-fidelity's ``FeatureExtractorInceptionV3`` (``Conv2d_1a_3x3`` ...
``Mixed_7c``, ``fc`` with 1008 outputs; each ``BasicConv2d`` holds ``conv`` + ``bn`` with eps
1e-3), so its converted weights load: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
or pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the same conversion of the TF graph).
The TF graph's quirks are kept: average pools exclude padding, the last block max-pools.

Input: uint8 images [N, 3, H, W] (any size) -> TF1-style bilinear resize to 299 (no half-pixel
centres, as ``tf.image.resize_bilinear``) in fp32 -> (x - 128) / 128 -> network. Outputs (dict):
  ``pool``     [N, 2048]          pool_3 features (FID, precision/recall)
  ``spatial``  [N, 17 * 17 * 7]   first 7 channels of mixed_6/conv (= Mixed_6d.branch1x1 after ReLU),
                                  flattened in TF's (h, w, c) order (sFID; matches ADM's mu_s/sigma_s)
  ``logits``   [N, 1008]          pool_3 @ fc.weight^T without bias (ADM's softmax input for IS)

Weights are never downloaded: ``find_inception_weights`` looks at the given path, then the
``MIRAI_INCEPTION_WEIGHTS`` environment variable, then torch's hub cache
(``~/.cache/torch/hub/checkpoints/``, where torch-fidelity / pytorch-fid put them); otherwise
``InceptionWeightsMissing`` explains how to provide them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
ENV_VAR = "MIRAI_INCEPTION_WEIGHTS"
INPUT_SIZE = 299


class InceptionWeightsMissing(FileNotFoundError):
    """No local Inception weights (the message says how to provide them)."""


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsMissing(f"{p}: Inception weights file not found")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InceptionWeightsMissing(f"{ENV_VAR}={env}: Inception weights file not found")
        return p
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHT_FILES:
        if (cache / name).is_file():
            return cache / name
    raise InceptionWeightsMissing(
        "Inception weights not found (nothing is downloaded). Provide torch-fidelity's port of the 2015 "
        f"Inception network, file {WEIGHT_FILES[0]} (or pytorch-fid's {WEIGHT_FILES[1]}), with "
        f"--inception-weights PATH or the environment variable {ENV_VAR}=PATH, or place it in {cache}. "
        "It is published at https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        f"{WEIGHT_FILES[0]} (fetch it on a machine with network access).")


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    """TF's 3x3 stride-1 average pool: padded zeros are not counted."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x, branch1x1: torch.Tensor | None = None):
        b1 = self.branch1x1(x) if branch1x1 is None else branch1x1
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([b1, b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """``max_pool=True`` for the last block (Mixed_7c): the TF graph max-pools its pool branch."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres) of float [N, C, H, W]."""
    n, c, h, w = x.shape

    def axis(n_in: int):
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = pos.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, pos - lo.float()

    ylo, yhi, dy = axis(h)
    xlo, xhi, dx = axis(w)
    top, bot = x[:, :, ylo], x[:, :, yhi]                     # [N, C, size, W]
    tl, tr, bl, br = top[..., xlo], top[..., xhi], bot[..., xlo], bot[..., xhi]   # [N, C, size, size]
    t = tl + (tr - tl) * dx.view(1, 1, 1, size)
    b = bl + (br - bl) * dx.view(1, 1, 1, size)
    return t + (b - t) * dy.view(1, 1, size, 1)


class InceptionV3(nn.Module):
    """Feature extractor; see the module docstring for inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, 1008)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception input must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.float(), INPUT_SIZE)   # [N, 3, 299, 299]
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                     "Mixed_6b", "Mixed_6c"):
            x = getattr(self, name)(x)                         # ends at [N, 768, 17, 17]
        b1 = self.Mixed_6d.branch1x1(x)                         # mixed_6/conv: [N, 192, 17, 17]
        spatial = b1[:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)   # [N, 17*17*7] in (h, w, c) order
        x = self.Mixed_6d(x, branch1x1=b1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # [N, 2048, 8, 8]
        pool = torch.flatten(self.AvgPool(x), 1)                # [N, 2048]
        logits = pool @ self.fc.weight.t()                      # [N, 1008], no bias (as ADM's IS)
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


def load_inception(path: str | os.PathLike | None = None, device="cpu") -> InceptionV3:
    """Build the network and load local weights (see ``find_inception_weights``)."""
    from mirai.io.torch_files import load_file
    f = find_inception_weights(path)
    sd = load_file(f)                  # weights-only; a ValueError naming the file if unreadable or unsafe
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    net = InceptionV3()
    own = net.state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    want = {k for k in own if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    wrong = [k for k in want & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{f}: not the torch-fidelity Inception weights (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]})")
    net.load_state_dict(sd, strict=False)
    return net.to(device).eval().requires_grad_(False)
