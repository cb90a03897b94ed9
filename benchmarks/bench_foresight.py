"""Benchmark of the fused foresight loss: ``mirai.ops.foresight_loss`` against the
plain reference (``foresight_loss_reference``: K head MLPs + gathered targets), eager and
under ``torch.compile``.

Providers: ``reference`` (eager), ``compiled`` (torch.compile of the reference), ``fused``
(the C++/CUDA op; ``fused@GxM`` = G heads at a time over chunks of M tokens, see ``--plans``).
Modes: ``forward`` (with autograd recording, as in training: for the fused op this is where
all the work happens), ``backward`` (the backward call alone, after an untimed forward),
``full`` (forward + backward).

Reported per (shape, provider, mode): median ms (CUDA events, after warm-up), achieved
TFLOP/s of the head GEMMs (forward 2*N*K*(D*H + H*H + H*C) FLOPs, backward twice that) and
its fraction of the measured dense bf16 matmul peak (one 8192^3 GEMM), and for ``full`` the
peak extra memory: max allocated during the step minus allocated before it (inputs and
weights exist, parameter grads are None before the step, so the grads it creates count).
Before timing, each fused variant is validated against the fp32 reference in the
flash-attention style (its error at most 2x/3x that of the bf16 reference, plus a floor).
Results are appended as JSON lines to ``benchmarks/results/foresight.jsonl``.

    python benchmarks/bench_foresight.py                      # all issue-4 shapes, CUDA
    python benchmarks/bench_foresight.py --plans auto,1x4096,3x8192,budget=90   # fused schedule sweep
    python benchmarks/bench_foresight.py --device cpu --small # smoke test on a CPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, env_record, print_table, time_fn  # noqa: E402

from mirai.foresight.heads import ForesightHeads  # noqa: E402
from mirai.foresight.neighbours import neighbour_table  # noqa: E402
from mirai.ops.foresight import fused_plan, foresight_loss, plan_bytes  # noqa: E402
from mirai.ops.reference import foresight_loss_reference  # noqa: E402

# The design shapes: batch x 256 tokens (16 x 16 grid), heads hidden 2048, 2D layout.
SHAPES = {
    "gptb-e-k3": dict(label="GPT-B Mirai-E K=3", batch=32, grid=16, d=768, c=768, k=3, hidden=2048, source="ema"),
    "gptb-e-k9": dict(label="GPT-B Mirai-E K=9", batch=32, grid=16, d=768, c=768, k=9, hidden=2048, source="ema"),
    "gptb-i-k1": dict(label="GPT-B Mirai-I K=1", batch=32, grid=16, d=768, c=768, k=1, hidden=2048,
                      source="encoder"),
    "gptxxl-e-k3": dict(label="GPT-XXL Mirai-E K=3", batch=16, grid=16, d=1536, c=1536, k=3, hidden=2048,
                        source="ema"),
    "gptxxl-i-k1": dict(label="GPT-XXL Mirai-I K=1", batch=16, grid=16, d=1536, c=1024, k=1, hidden=2048,
                        source="encoder"),
}
SMALL = {"small": dict(label="small smoke", batch=2, grid=6, d=32, c=24, k=3, hidden=48, source="ema")}
MODES = ("forward", "backward", "full")


def make_inputs(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    t = cfg["grid"] ** 2
    heads = ForesightHeads(cfg["d"], cfg["c"], cfg["k"], hidden=cfg["hidden"]).to(device=device, dtype=dtype)
    h = torch.randn(cfg["batch"], t, cfg["d"], device=device, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(cfg["batch"], t, cfg["c"], device=device, dtype=dtype)
    table = neighbour_table(cfg["grid"], cfg["k"], layout="2d", source=cfg["source"]).to(device)
    coeffs = torch.full((cfg["k"],), 2.0, device=device)
    return h, heads, teacher, table, coeffs


def head_flops(cfg: dict) -> float:
    """GEMM FLOPs of one forward of the K heads over all tokens."""
    n = cfg["batch"] * cfg["grid"] ** 2
    d, c, hid, k = cfg["d"], cfg["c"], cfg["hidden"], cfg["k"]
    return 2.0 * n * k * (d * hid + hid * hid + hid * c)


def matmul_peak_tflops(device: str, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, device, warmup=5, iters=30)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def loss_and_grads(fn, h, heads):
    heads.zero_grad(set_to_none=True)
    h.grad = None
    total, per_head = fn(h, heads)
    total.backward()
    grads = [h.grad] + [p.grad for p in heads.parameters()]
    return total.detach(), per_head.detach(), grads


def validate(fused_fn, cfg, device) -> tuple[bool, str]:
    """Flash-attention-style check of the bf16 fused op against the fp32 reference."""
    h, heads, teacher, table, coeffs = make_inputs(cfg, device, torch.bfloat16, seed=1)
    heads32 = ForesightHeads(cfg["d"], cfg["c"], cfg["k"], hidden=cfg["hidden"]).to(device)
    heads32.load_state_dict({k: v.float() for k, v in heads.state_dict().items()})
    h32 = h.detach().float().requires_grad_(True)
    ref32 = loss_and_grads(lambda x, m: foresight_loss_reference(x, m, teacher.float(), table, coeffs), h32, heads32)
    ref16 = loss_and_grads(lambda x, m: foresight_loss_reference(x, m, teacher, table, coeffs), h, heads)
    fused = loss_and_grads(lambda x, m: fused_fn(x, m, teacher, table, coeffs), h, heads)
    names = ["total", "per_head", "h"] + [n for n, _ in heads.named_parameters()]
    ok, worst = True, (0.0, "")
    for i, (a, b, r) in enumerate(zip([fused[0], fused[1]] + fused[2], [ref16[0], ref16[1]] + ref16[2],
                                      [ref32[0], ref32[1]] + ref32[2])):
        e_f = (a.double() - r.double()).abs().max().item()
        e_r = (b.double() - r.double()).abs().max().item()
        # floor: relative to the tensor's size, plus an absolute 1e-5 per unit of sum|coeffs| for the losses
        # (means of cosines of random vectors are close to 0, which makes a relative floor meaningless, and
        # the bf16 reference's own error on such a mean can be accidentally tiny: 4e-8 on XXL K=3, H100)
        loss_floor = 1e-5 * max(1.0, float(coeffs.abs().sum()))
        floor = (loss_floor if i < 2 else 0.0) + 1e-4 * r.double().abs().max().item()
        good = e_f <= (2 if i < 2 else 3) * e_r + floor
        ok &= good
        ratio = (e_f - floor) / max(e_r, 1e-30)
        if not good or ratio > worst[0]:
            worst = max(worst, (ratio, f"{names[i]}: fused err {e_f:.3e}, bf16 reference err {e_r:.3e}"))
    return ok, f"worst {worst[1]}"


def time_mode(fn, mode, h, heads, teacher, table, coeffs, device, warmup, iters) -> float:
    def fwd():
        return fn(h, heads, teacher, table, coeffs)

    def full():
        heads.zero_grad(set_to_none=True)
        h.grad = None
        fwd()[0].backward()

    if mode == "forward":
        return time_fn(fwd, device, warmup, iters).median_ms
    if mode == "full":
        return time_fn(full, device, warmup, iters).median_ms
    # backward alone: untimed forward, timed backward
    for _ in range(warmup):
        full()
    ms = []
    for _ in range(iters):
        heads.zero_grad(set_to_none=True)
        h.grad = None
        total = fwd()[0]
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            total.backward()
            end.record()
            torch.cuda.synchronize()
            ms.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            total.backward()
            ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    return ms[len(ms) // 2]


def peak_extra_gb(fn, h, heads, teacher, table, coeffs, device) -> float | None:
    if device != "cuda":
        return None
    heads.zero_grad(set_to_none=True)
    h.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(h, heads, teacher, table, coeffs)[0].backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    heads.zero_grad(set_to_none=True)
    h.grad = None
    return peak / 1e9


def parse_plan(spec: str, cfg: dict, elem_bytes: int) -> tuple[str, int, int]:
    """A --plans entry -> (label, group_heads, chunk_tokens): 'auto' (the op's default schedule),
    'M' (all heads, chunks of M tokens), 'GxM', or 'budget=MiB' (fused_plan within that budget)."""
    n, k = cfg["batch"] * cfg["grid"] ** 2, cfg["k"]
    dims = (n, k, cfg["hidden"], cfg["d"], cfg["c"], elem_bytes)
    try:
        if spec == "auto":
            g, m = fused_plan(*dims)
            return f"fused@auto={g}x{m}", g, m
        if spec.startswith("budget="):
            g, m = fused_plan(*dims, budget_bytes=int(float(spec.split("=", 1)[1]) * 2**20))
            return f"fused@{spec}={g}x{m}", g, m
        g, m = (int(v) for v in spec.split("x")) if "x" in spec else (k, int(spec))
    except ValueError:
        raise SystemExit(f"bench_foresight: --plans entry {spec!r} is not auto, M, GxM or budget=MiB") from None
    if g < 1 or m < 1:
        raise SystemExit(f"bench_foresight: --plans entry {spec!r} needs G >= 1 and M >= 1")
    g, m = min(g, k), min(m, n)
    return f"fused@{g}x{m}", g, m


def profile_fused(cfg, device, plan):
    h, heads, teacher, table, coeffs = make_inputs(cfg, device, torch.bfloat16)
    _, group, chunk = plan
    for _ in range(3):
        foresight_loss(h, heads, teacher, table, coeffs, backend="fused", chunk_tokens=chunk,
                       group_heads=group)[0].backward()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            heads.zero_grad(set_to_none=True)
            foresight_loss(h, heads, teacher, table, coeffs, backend="fused", chunk_tokens=chunk,
                           group_heads=group)[0].backward()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(f"\nprofile of fused full step ({cfg['label']}, {group} heads x {chunk} tokens), 5 steps:")
    print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=90))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="one tiny shape (smoke test)")
    ap.add_argument("--shapes", default="", help=f"comma list of {list(SHAPES)} (default: all)")
    ap.add_argument("--providers", default="", help="comma list of reference,compiled,fused "
                    "(default: all on CUDA, reference,fused on CPU)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--plans", default="auto,budget=90",
                    help="fused schedules to time: 'auto' (the op's default, fused_plan), 'M' (all heads, chunks "
                    "of M tokens), 'GxM' (G heads at a time), 'budget=MiB' (fused_plan within that budget)")
    ap.add_argument("--sweep-shapes", default="gptb-e-k3,gptxxl-e-k3",
                    help="shapes on which every --plans entry is timed (others use the first)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="print the top kernels of the fused step")
    ap.add_argument("--results-dir", default=None, help="where foresight.jsonl goes (default benchmarks/results)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_foresight: --device cuda but no CUDA GPU is visible (use --device cpu --small)")
    shapes = SMALL if args.small else SHAPES
    if args.shapes:
        unknown = [s for s in args.shapes.split(",") if s not in shapes]
        if unknown:
            raise SystemExit(f"bench_foresight: unknown shapes {unknown}; choose from {list(shapes)}")
        shapes = {s: shapes[s] for s in args.shapes.split(",")}
    providers = args.providers.split(",") if args.providers else (
        ["reference", "compiled", "fused"] if device == "cuda" else ["reference", "fused"])
    modes = args.modes.split(",")
    plans = [p for p in args.plans.split(",") if p] or ["auto"]
    dtype = torch.bfloat16

    env = env_record(device)
    peak = matmul_peak_tflops(device) if device == "cuda" else float("nan")
    print(f"device: {env['gpu']}; torch {env['torch']}; measured dense bf16 matmul peak: {peak:.0f} TFLOP/s")

    rows = []
    for name, cfg in shapes.items():
        fwd_flops = head_flops(cfg)
        variants = []
        for p in providers:
            if p == "reference":
                variants.append(("reference", None, foresight_loss_reference))
            elif p == "compiled":
                variants.append(("compiled", None, torch.compile(foresight_loss_reference)))
            elif p == "fused":
                use = plans if (name in args.sweep_shapes.split(",") or args.small) else plans[:1]
                seen = set()
                for spec in use:
                    label, g, m = parse_plan(spec, cfg, torch.finfo(dtype).bits // 8)
                    if (g, m) in seen:
                        continue  # two specs naming one schedule: time it once
                    seen.add((g, m))

                    def f(h, heads, teacher, table, coeffs, _g=g, _m=m):
                        return foresight_loss(h, heads, teacher, table, coeffs, backend="fused", chunk_tokens=_m,
                                              group_heads=_g)
                    variants.append((label, (g, m), f))
            else:
                raise SystemExit(f"bench_foresight: unknown provider {p!r}")
        inputs = make_inputs(cfg, device, dtype)
        for label, plan, fn in variants:
            valid = None
            if label.startswith("fused"):
                valid, msg = validate(lambda x, m, t, tb, c, _fn=fn: _fn(x, m, t, tb, c), cfg, device)
                print(f"[{cfg['label']}] {label}: validation {'OK' if valid else 'FAILED'} ({msg})")
                if not valid:
                    print(f"bench_foresight: {label} disagrees with the reference on {cfg['label']}; not timed")
                    continue
            mem = peak_extra_gb(fn, *inputs, device) if "full" in modes else None
            for mode in modes:
                ms = time_mode(fn, mode, *inputs, device, args.warmup, args.iters)
                flops = fwd_flops * {"forward": 1, "backward": 2, "full": 3}[mode]
                tflops = flops / (ms * 1e-3) / 1e12
                row = dict(shape=cfg["label"], provider=label, mode=mode, ms=ms, tflops=tflops,
                           peak_frac=tflops / peak if peak == peak else None,
                           peak_extra_gb=mem if mode == "full" else None)
                rows.append(row)
                rec = dict(env, bench="foresight", shape_key=name, **{k: v for k, v in cfg.items() if k != "label"},
                           tokens=cfg["batch"] * cfg["grid"] ** 2, dtype=str(dtype).replace("torch.", ""),
                           group_heads=plan[0] if plan else None, chunk_tokens=plan[1] if plan else None,
                           plan_mb=(plan_bytes(cfg["batch"] * cfg["grid"] ** 2, cfg["k"], cfg["hidden"], cfg["d"],
                                               cfg["c"], torch.finfo(dtype).bits // 8, *plan) / 2**20
                                    if plan else None),
                           validated=valid, matmul_peak_tflops=peak,
                           head_gemm_floor_ms=flops / (peak * 1e12) * 1e3 if peak == peak else None, **row)
                if not args.no_save:
                    append_jsonl("foresight", [rec], Path(args.results_dir) if args.results_dir else None)
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()

    # speed-up of each provider over torch.compile(reference) for the same shape and mode
    base = {(r["shape"], r["mode"]): r["ms"] for r in rows if r["provider"] == "compiled"}
    for r in rows:
        b = base.get((r["shape"], r["mode"]))
        r["vs_compiled"] = b / r["ms"] if b else None
    print()
    print_table(rows, ["shape", "provider", "mode", "ms", "tflops", "peak_frac", "peak_extra_gb", "vs_compiled"])
    if args.profile:
        first = next(iter(shapes.values()))
        for spec in plans:
            profile_fused(first, device, parse_plan(spec, first, torch.finfo(dtype).bits // 8))


if __name__ == "__main__":
    main()
