"""Benchmark of the fused linear + cross-entropy (``mirai.ops.linear_ce``) and of its row pass.

Two levels, each provider validated before it is timed:
  row pass   one chunk of logits z [C, V] (bf16 on CUDA) -> row losses and the gradient over z:
             ``kernel`` (``mirai._C.ce_softmax_grad_``: reads z for the statistics, reads and
             writes it for the gradient: 3 * C * V * elem bytes) against ``torch``
             (``linear_ce.row_pass_torch``: log_softmax in fp32 + exp_ + scatter_add_ + scaling
             cast: about C * V * (2 + 4 + 8 + 4 + 2) bytes). GB/s counts the kernel's 3 passes for both, so the
             torch figure is what it would need to match, against the measured copy bandwidth.
  whole op   ``linear_cross_entropy`` forward + backward over N tokens (GEMMs included) with
             ``backend="fused"`` and ``backend="reference"``; ms and peak extra memory.
Validation: the row pass against ``linear_ce.row_pass_reference`` (float64; loss rtol 1e-5, gradient
within bf16 resolution of the largest entry), the whole op's loss and gradients against backend="reference".

Shapes: GPT-B (N = 32 x 256 tokens, D = 768) and GPT-XXL (N = 16 x 256, D = 1536), V = 16,384 codes,
chunks of 2,048 rows (the op's default).

    python benchmarks/bench_linear_ce.py                # CUDA
    python benchmarks/bench_linear_ce.py --small        # CPU smoke test

Appends JSON lines to benchmarks/results/linear_ce.jsonl and prints a table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, copy_bandwidth_gbs, env_record, print_table, time_fn  # noqa: E402

from mirai import _ext  # noqa: E402
from mirai.ops.linear_ce import (DEFAULT_CHUNK_SIZE, linear_cross_entropy, row_pass_reference,  # noqa: E402
                                 row_pass_torch)

SHAPES = {"GPT-B": dict(n=32 * 256, d=768, v=16384), "GPT-XXL": dict(n=16 * 256, d=1536, v=16384)}
SMALL = {"small": dict(n=300, d=32, v=1000)}


def row_pass_check(z, t, w) -> str:
    want_loss, want_grad = row_pass_reference(z, t, w)
    zz = z.clone()
    loss = _ext.ext().ce_softmax_grad_(zz, t, w, True)
    err_l = ((loss.double() - want_loss).abs().max() / want_loss.abs().max()).item()
    err_g = ((zz.double() - want_grad).abs().max() / want_grad.abs().max()).item()
    resolution = 2.0 ** -8 if z.dtype == torch.bfloat16 else 1e-6
    if err_l > 1e-5 or err_g > resolution:
        raise SystemExit(f"bench_linear_ce: the row-pass kernel disagrees with the reference (loss rel err "
                         f"{err_l:.2e}, gradient rel err {err_g:.2e}); not timed")
    return f"loss rel err {err_l:.1e}, grad rel err {err_g:.1e}"


def whole_op_check(h, wt, tg) -> str:
    def run(backend):
        hh, ww = h.clone().requires_grad_(), wt.clone().requires_grad_()
        loss = linear_cross_entropy(hh, ww, tg, backend=backend)
        loss.backward()
        return loss.detach().double(), hh.grad.double(), ww.grad.double()

    a, b = run("fused"), run("reference")
    errs = [((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b)]
    if max(errs) > 2e-2:
        raise SystemExit(f"bench_linear_ce: backend='fused' disagrees with backend='reference' (rel errs {errs}); "
                         "not timed")
    return "loss/dh/dw rel diff " + "/".join(f"{e:.1e}" for e in errs)


def peak_extra_gb(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="one tiny shape (CPU smoke test)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    device = "cpu" if args.small and args.device == "cuda" and not torch.cuda.is_available() else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_linear_ce: no CUDA GPU visible (use --small for the CPU smoke test)")
    if not _ext.has_op("ce_softmax_grad_"):
        raise SystemExit(f"bench_linear_ce: mirai._C lacks ce_softmax_grad_ ({_ext.load_error()})")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    elem = torch.finfo(dtype).bits // 8
    env = env_record(device)
    copy_gbs = copy_bandwidth_gbs(device) if device == "cuda" else float("nan")
    print(f"device: {env['gpu']}; measured copy bandwidth {copy_gbs:.0f} GB/s")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, s in (SMALL if args.small else SHAPES).items():
        c = min(DEFAULT_CHUNK_SIZE, s["n"])
        z = (torch.randn(c, s["v"], generator=gen) * 3).to(device=device, dtype=dtype)
        t = torch.randint(0, s["v"], (c,), generator=gen).to(device)
        w = torch.full((c,), 1.0 / s["n"], device=device)
        print(f"[{name}] row pass: {row_pass_check(z, t, w)}")
        work = z.clone()
        pass_bytes = 3 * c * s["v"] * elem
        for provider, fn in (("fused", lambda: _ext.ext().ce_softmax_grad_(work.copy_(z), t, w, True)),
                             ("reference", lambda: row_pass_torch(work.copy_(z), t, w))):
            copy_ms = time_fn(lambda: work.copy_(z), device, args.warmup, args.iters).median_ms
            ms = time_fn(fn, device, args.warmup, args.iters).median_ms - copy_ms   # the refill is not the op's
            rows.append(dict(shape=name, level="row pass", provider=provider, ms=ms,
                             gbps=pass_bytes / (ms * 1e-3) / 1e9 if ms > 0 else None, peak_extra_gb=None))
        h = torch.randn(s["n"], s["d"], generator=gen).to(device=device, dtype=dtype)
        wt = (torch.randn(s["v"], s["d"], generator=gen) * 0.05).to(device=device, dtype=dtype)
        tg = torch.randint(0, s["v"], (s["n"],), generator=gen).to(device)
        print(f"[{name}] whole op: {whole_op_check(h, wt, tg)}")
        hh, ww = h.clone().requires_grad_(), wt.clone().requires_grad_()
        for provider in ("fused", "reference"):
            def full(_b=provider):
                hh.grad = ww.grad = None
                linear_cross_entropy(hh, ww, tg, backend=_b).backward()
            ms = time_fn(full, device, args.warmup, args.iters).median_ms
            rows.append(dict(shape=name, level="fwd+bwd", provider=provider, ms=ms, gbps=None,
                             peak_extra_gb=peak_extra_gb(full, device)))
        for r in rows:
            if r["shape"] == name and not args.no_save:
                append_jsonl("linear_ce", [dict(env, bench="linear_ce", dtype=str(dtype).removeprefix("torch."),
                                                chunk=c, copy_gbps=copy_gbs, **s, **r)],
                             Path(args.results_dir) if args.results_dir else None)
    print()
    print_table(rows, ["shape", "level", "provider", "ms", "gbps", "peak_extra_gb"])


if __name__ == "__main__":
    main()
