"""The demo's tokenizer: a k-means codebook of 4x4-pixel patches (``mirai.models.vq.PatchKMeansTokenizer``)
fitted on the fit split, so a 32x32 digit is an 8x8 grid of 64 tokens. Saved as ``tokenizer.pt`` and reused
while the fit split and the settings are unchanged (``mirai.commands.demo.cache``)."""
from __future__ import annotations

from pathlib import Path

import torch

from mirai.commands.demo.cache import load_current, mark_current
from mirai.commands.demo.data import PATCH, digest


def fit_or_load_tokenizer(path: Path, fit_x: torch.Tensor, eval_x: torch.Tensor, *, codebook_size: int,
                          iters: int, max_patches: int, seed: int):
    """(tokenizer, facts, reused). facts: the evaluation split's reconstruction MSE (pixels in [-1, 1])."""
    from mirai.models.vq import PatchKMeansTokenizer
    key = digest("kmeans", codebook_size, PATCH, iters, max_patches, seed, fit_x)
    found = load_current(path, key, PatchKMeansTokenizer.load)
    if found is not None:
        tok, facts = found
        return tok, facts, True
    tok = PatchKMeansTokenizer.fit(fit_x, codebook_size=codebook_size, patch=PATCH, iters=iters, seed=seed,
                                   max_patches=max_patches)
    tok.save(path)
    rec = tok.decode_code(tok.encode(eval_x))[:, :1]                                  # [N, 1, 32, 32]
    facts = {"codebook_size": tok.codebook_size, "patch": PATCH,
             "eval_mse": float(((rec - eval_x) ** 2).mean())}
    mark_current(path, key, facts)
    return tok, facts, False
