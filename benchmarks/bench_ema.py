"""Benchmark of the EMA update on a real model's parameter set.

Providers (same work: fp32 EMA <- decay*EMA + (1-decay)*param over every parameter):
  loop             per-parameter ``e.mul_(d).add_(p, alpha=1-d)`` (LlamaGen's and the released Mirai code's way)
  foreach_mul_add  ``torch._foreach_mul_`` + ``torch._foreach_add_`` (mixed dtypes take torch's per-tensor path)
  foreach_lerp     ``torch._foreach_lerp_``; it needs one dtype, so bf16 params are cast to fp32 first
                   (the cast is part of the timed work, as it would be in a training loop)
  fused            ``mirai.ops.ema_update_`` (one launch)
  fused+teacher    the same pass also writes bf16(EMA) into a teacher copy

Bandwidth model (bytes that must move): fp32 EMA read + write (8 B/param) + the param read
(2 B bf16, 4 B fp32) [+ 2 B teacher write]: 10 B/param for bf16 params, 12 with the teacher.
GB/s = those bytes / median time; reported against the device-to-device copy bandwidth measured
here (read + write bytes of a 1 GiB ``copy_``). Target: fused >= 85% of copy bandwidth.
The fused result is checked bit for bit against the PyTorch formula before anything is timed.

Parameter shapes: from ``mirai.models.gpt.build_gpt(model)`` built on the meta device when that
module imports, else from LlamaGen's formula (same shapes: 1,410,972,672 params for GPT-XXL).

    python benchmarks/bench_ema.py                       # CUDA, GPT-XXL, bf16 params
    python benchmarks/bench_ema.py --device cpu          # small smoke run (GPT-debug)

Appends one JSON line per provider to benchmarks/results/ema.jsonl and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import append_jsonl, copy_bandwidth_gbs, env_record, print_table, time_fn  # noqa: E402

import mirai._ext as _ext  # noqa: E402
from mirai.ops.ema_update import ema_update_, ema_update_reference_  # noqa: E402

PROVIDERS = ["loop", "foreach_mul_add", "foreach_lerp", "fused", "fused+teacher"]
# LlamaGen GPT family: (n_layer, n_head, dim); vocab 16384, 1000 classes (+1 null row), MHA, SwiGLU.
ARCHS = {"GPT-debug": (2, 4, 64), "GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
         "GPT-XXL": (48, 24, 1536), "GPT-3B": (24, 32, 3200)}
TARGET_MS = {"GPT-XXL": {"fused": 5.6, "fused+teacher": 6.7}}  # target, H100 at 3.0 TB/s copy


def formula_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """LlamaGen state-dict shapes of a GPT model, computed without building it."""
    n_layer, _, dim = ARCHS[model]
    hidden = int(2 * 4 * dim / 3)
    hidden = 256 * ((hidden + 255) // 256)  # multiple_of = 256
    shapes = [("cls_embedding.embedding_table.weight", (1001, dim)), ("tok_embeddings.weight", (16384, dim))]
    for i in range(n_layer):
        shapes += [(f"layers.{i}.attention.wqkv.weight", (3 * dim, dim)),
                   (f"layers.{i}.attention.wo.weight", (dim, dim)),
                   (f"layers.{i}.feed_forward.w1.weight", (hidden, dim)),
                   (f"layers.{i}.feed_forward.w3.weight", (hidden, dim)),
                   (f"layers.{i}.feed_forward.w2.weight", (dim, hidden)),
                   (f"layers.{i}.attention_norm.weight", (dim,)),
                   (f"layers.{i}.ffn_norm.weight", (dim,))]
    shapes += [("norm.weight", (dim,)), ("output.weight", (16384, dim))]
    return shapes


def param_shapes(model: str) -> tuple[list[tuple[str, tuple[int, ...]]], str]:
    try:
        from mirai.models.gpt import build_gpt
        with torch.device("meta"):
            m = build_gpt(model)
        return [(n, tuple(p.shape)) for n, p in m.named_parameters()], "mirai.models.gpt"
    except Exception as err:  # model code missing or not importable here: same shapes from the formula
        if model not in ARCHS:
            raise SystemExit(f"bench_ema: unknown model {model!r} ({err}); known: {sorted(ARCHS)}")
        return formula_shapes(model), f"formula ({type(err).__name__})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="GPT model whose parameters to use "
                    "(default GPT-XXL on CUDA, GPT-debug on CPU)")
    ap.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--decay", type=float, default=0.9999)
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=None, help="timed calls (default 20 on CUDA, 5 on CPU)")
    ap.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/ema.jsonl")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    model = args.model or ("GPT-XXL" if device.type == "cuda" else "GPT-debug")
    iters = args.iters or (20 if device.type == "cuda" else 5)
    pdtype = getattr(torch, args.param_dtype)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"bench_ema: unknown providers {unknown}; known: {PROVIDERS}")
    if device.type == "cuda" and not _ext.has_cuda():
        warnings.warn(f"bench_ema: mirai._C has no CUDA kernels ({_ext.describe()}); 'fused' is the fallback")

    shapes, source = param_shapes(model)
    n_params = sum(torch.Size(s).numel() for _, s in shapes)
    print(f"model {model}: {len(shapes)} tensors, {n_params:,} params (shapes from {source}); "
          f"params {args.param_dtype}, decay {args.decay}, device {device}")
    g = torch.Generator(device=device).manual_seed(0)
    ema = [torch.randn(s, device=device, generator=g) for _, s in shapes]
    params = [torch.randn(s, device=device, generator=g).to(pdtype) for _, s in shapes]
    teacher = [torch.empty(s, device=device, dtype=torch.bfloat16) for _, s in shapes]
    d = args.decay

    # Validate the fused op against the PyTorch formula (bit for bit) before timing.
    ref = [e.clone() for e in ema]
    ema_update_reference_(ref, params, d)
    work = [e.clone() for e in ema]
    ema_update_(work, params, d, teacher)
    bad = sum(not torch.equal(a, b) for a, b in zip(work, ref))
    bad_t = sum(not torch.equal(t, w.to(torch.bfloat16)) for t, w in zip(teacher, work))
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        bad = sum(not torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(work, ref))
    del ref, work
    if bad or bad_t:
        print(f"VALIDATION FAILED: {bad} EMA tensors and {bad_t} teacher tensors differ from the reference")
        return 1
    print("validation: fused EMA and teacher equal the PyTorch formula bit for bit")

    def loop():
        for e, p in zip(ema, params):
            e.mul_(d).add_(p, alpha=1 - d)

    def foreach_mul_add():
        torch._foreach_mul_(ema, d)
        torch._foreach_add_(ema, params, alpha=1 - d)

    def foreach_lerp():
        src = params if pdtype == torch.float32 else [p.float() for p in params]
        torch._foreach_lerp_(ema, src, 1 - d)

    fns = {"loop": loop, "foreach_mul_add": foreach_mul_add, "foreach_lerp": foreach_lerp,
           "fused": lambda: ema_update_(ema, params, d),
           "fused+teacher": lambda: ema_update_(ema, params, d, teacher)}

    copy_gbs = copy_bandwidth_gbs(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    print(f"device-to-device copy bandwidth: {copy_gbs:.1f} GB/s")
    env = env_record(device)
    pbytes = torch.tensor([], dtype=pdtype).element_size()
    rows = []
    for name in providers:
        t = time_fn(fns[name], device, warmup=args.warmup, iters=iters)
        bpp = 8 + pbytes + (2 if name == "fused+teacher" else 0)
        gbs = n_params * bpp / (t.median_ms * 1e-3) / 1e9
        target_ms = n_params * bpp / (0.85 * copy_gbs * 1e9) * 1e3
        row = {**env, "bench": "ema", "model": model, "n_params": n_params, "n_tensors": len(shapes),
               "shapes_from": source, "param_dtype": args.param_dtype, "provider": name,
               "ms": round(t.median_ms, 4), "min_ms": round(t.min_ms, 4), "iters": t.iters,
               "bytes_per_param": bpp, "gbps": round(gbs, 1), "copy_gbps": round(copy_gbs, 1),
               "frac_copy_bw": round(gbs / copy_gbs, 4), "target_ms_85pct": round(target_ms, 3)}
        if name.startswith("fused"):
            row["meets_85pct"] = bool(gbs >= 0.85 * copy_gbs)
            target = TARGET_MS.get(model, {}).get(name)
            if target is not None and args.param_dtype == "bfloat16":
                row["target_ms"] = target
                row["meets_target"] = bool(t.median_ms <= target)
        rows.append(row)
    for r in rows:
        r["pct_copy_bw"] = round(100 * r["frac_copy_bw"], 1)
        r["ok"] = "" if "meets_85pct" not in r else ("yes" if r["meets_85pct"] else "NO")
    print(f"{env['gpu']} | commit {env['commit']} | torch {env['torch']}")
    print_table(rows, ["provider", "ms", "min_ms", "bytes_per_param", "gbps", "pct_copy_bw", "target_ms_85pct", "ok"])
    if not args.no_save:
        out = append_jsonl("ema", [{k: v for k, v in r.items() if k not in ("ok", "pct_copy_bw")} for r in rows])
        print(f"appended {len(rows)} lines to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
