"""Benchmark of the optimizer step + model-EMA update on real models' parameter sets.

Providers (same work: one AdamW step of every parameter with its gradient divided by
``grad_scale``, then the fp32 EMA of every parameter with the new value and its bf16 teacher copy):
  torch_fused+ema  ``torch.optim.AdamW(fused=True)`` with ``grad_scale`` set, then
                   ``mirai.ops.ema_update_(..., teacher)``: two passes, what the trainer does today
  fused            ``mirai.ops.adamw_ema_step_``: one pass, one call per param group
  AdamWEMA         ``mirai.optim.AdamWEMA.step()`` with the EMA attached (the op plus the optimizer's
                   Python bookkeeping: state lookup, step counts)

Bytes each provider must move per parameter (fp32 params, grads, moments and EMA, bf16 teacher):
  torch_fused+ema  AdamW reads grad, param, exp_avg, exp_avg_sq (16 B) and writes param, exp_avg,
                   exp_avg_sq plus the unscaled grad (16 B); the EMA pass reads param and ema (8 B),
                   writes ema (4 B) and teacher (2 B): 46 B
  fused, AdamWEMA  reads grad, param, exp_avg, exp_avg_sq, ema (20 B), writes param, exp_avg,
                   exp_avg_sq, ema (16 B) and teacher (2 B): 38 B
GB/s = those bytes / median time, reported against the device-to-device copy bandwidth measured
here (read + write bytes of a 1 GiB ``copy_``). Timed calls use grad_scale = 1 so that repeated
calls leave the grads unchanged (torch's fused AdamW still writes them back: same bytes).

Before timing, the fused op is validated against torch_fused+ema on one tensor of every distinct
shape (grad_scale 2, after a few steps of history): params and moments within rtol 1e-5 /
atol 1e-6 (torch's CUDA kernel mixes double and float arithmetic, ours is fp32 with FMAs), the
EMA within the same tolerance and bit-exact with ``ema_update_`` on our own new params, the
teacher equal to bf16(EMA), the grads unchanged.

Parameter shapes: ``mirai.models.gpt.build_gpt(model)`` built on the meta device, split into
decay (dim >= 2, weight decay 0.05) and no-decay groups as the trainer does; real tensors are
then allocated (GPT-XXL, 1.41B params: about 31 GB for params, grads, moments, EMA and teacher).

    python benchmarks/bench_optim.py                      # CUDA: GPT-B and GPT-XXL
    python benchmarks/bench_optim.py --models GPT-B
    python benchmarks/bench_optim.py --small              # CPU smoke test, GPT-debug shapes

Appends one JSON line per (model, provider) to benchmarks/results/optim.jsonl and prints a table.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, copy_bandwidth_gbs, env_record, print_table, time_fn  # noqa: E402

import mirai._ext as _ext  # noqa: E402
from mirai.ops.adamw_ema_step import adamw_ema_step_  # noqa: E402
from mirai.ops.ema_update import ema_update_  # noqa: E402
from mirai.optim import AdamWEMA  # noqa: E402

PROVIDERS = ["torch_fused+ema", "fused", "AdamWEMA"]
BYTES_PER_PARAM = {"torch_fused+ema": 46, "fused": 38, "AdamWEMA": 38}
HP = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.05
EMA_DECAY = 0.9999


def param_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a registered model, built on the meta device."""
    from mirai.models.gpt import build_gpt
    with torch.device("meta"):
        m = build_gpt(model)
    return [(n, tuple(p.shape)) for n, p in m.named_parameters()]


class Workload:
    """Params (with grads), moments, EMA and teacher of one model, shared by every provider."""

    def __init__(self, shapes: list[tuple[int, ...]], device: torch.device, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)

        def randn(s, scale=1.0):
            return torch.randn(s, device=device, generator=g).mul_(scale)

        self.params = [torch.nn.Parameter(randn(s, 0.02)) for s in shapes]
        for p in self.params:
            p.grad = randn(p.shape, 1e-3)
        self.exp_avgs = [randn(s, 1e-4) for s in shapes]
        self.exp_avg_sqs = [randn(s, 1e-4).square_() for s in shapes]
        self.ema = [p.detach().clone() for p in self.params]
        self.teacher = [e.to(torch.bfloat16) for e in self.ema]
        self.groups = [[i for i, p in enumerate(self.params) if p.dim() >= 2],
                       [i for i, p in enumerate(self.params) if p.dim() < 2]]
        self.step = 10
        self.one = torch.ones((), device=device)   # grad_scale of the timed calls

    def clone(self, idx: list[int]) -> "Workload":
        """A copy of the tensors at `idx` (for validation)."""
        new = Workload.__new__(Workload)
        new.params = [torch.nn.Parameter(self.params[i].detach().clone()) for i in idx]
        for p, i in zip(new.params, idx):
            p.grad = self.params[i].grad.clone()
        for name in ("exp_avgs", "exp_avg_sqs", "ema", "teacher"):
            setattr(new, name, [getattr(self, name)[i].clone() for i in idx])
        new.groups = [[j for j, p in enumerate(new.params) if p.dim() >= 2],
                      [j for j, p in enumerate(new.params) if p.dim() < 2]]
        new.step, new.one = self.step, self.one
        return new

    def group_kwargs(self) -> list[dict]:
        return [{"params": [self.params[i] for i in idx], "weight_decay": wd}
                for idx, wd in zip(self.groups, (WEIGHT_DECAY, 0.0)) if idx]

    def torch_fused(self) -> torch.optim.AdamW:
        """torch's fused AdamW over these params, its state pointing at our moment tensors."""
        opt = torch.optim.AdamW(self.group_kwargs(), fused=True, **HP)
        dev = self.params[0].device
        for p, m, v in zip(self.params, self.exp_avgs, self.exp_avg_sqs):
            opt.state[p] = {"step": torch.tensor(float(self.step - 1), device=dev), "exp_avg": m, "exp_avg_sq": v}
        return opt

    def adamwema(self) -> AdamWEMA:
        opt = AdamWEMA(self.group_kwargs(), **HP)
        for p, m, v in zip(self.params, self.exp_avgs, self.exp_avg_sqs):
            opt.state[p] = {"step": torch.tensor(float(self.step - 1)), "exp_avg": m, "exp_avg_sq": v}
        opt.attach_ema(list(zip(self.params, self.ema, self.teacher)))
        return opt

    def fused_op(self, grad_scale: torch.Tensor) -> None:
        for idx, wd in zip(self.groups, (WEIGHT_DECAY, 0.0)):
            if idx:
                adamw_ema_step_([self.params[i] for i in idx], [self.params[i].grad for i in idx],
                                [self.exp_avgs[i] for i in idx], [self.exp_avg_sqs[i] for i in idx],
                                weight_decay=wd, step=self.step, grad_scale=grad_scale,
                                ema=[self.ema[i] for i in idx], ema_decay=EMA_DECAY,
                                teacher=[self.teacher[i] for i in idx], **HP)


def validate(work: Workload, idx: list[int]) -> str | None:
    """Ours against torch_fused+ema on the tensors `idx`; returns an error message or None."""
    ref, ours = work.clone(idx), work.clone(idx)
    grads = [p.grad.clone() for p in ours.params]
    scale = torch.tensor(2.0, device=work.params[0].device)
    opt = ref.torch_fused()
    opt.grad_scale = scale
    opt.step()
    ema_update_(ref.ema, [p.detach() for p in ref.params], EMA_DECAY, ref.teacher)
    ema_in = [e.clone() for e in ours.ema]
    ours.fused_op(scale)
    own = [e.clone() for e in ema_in]
    ema_update_(own, [p.detach() for p in ours.params], EMA_DECAY)
    tol = dict(rtol=1e-5, atol=1e-6)
    for j, i in enumerate(idx):
        s = opt.state[ref.params[j]]
        pairs = {"param": (ours.params[j], ref.params[j]), "exp_avg": (ours.exp_avgs[j], s["exp_avg"]),
                 "exp_avg_sq": (ours.exp_avg_sqs[j], s["exp_avg_sq"]), "ema": (ours.ema[j], ref.ema[j])}
        for name, (a, b) in pairs.items():
            if not torch.allclose(a.detach(), b.detach(), **tol):
                err = (a.detach() - b.detach()).abs().max().item()
                return f"{name} of tensor {i} {list(a.shape)} differs from torch_fused+ema (max abs {err:.3g})"
        if not torch.equal(ours.ema[j], own[j]):
            return f"ema of tensor {i} is not bit-exact with ema_update_ on the new params"
        if not torch.equal(ours.teacher[j], ours.ema[j].to(torch.bfloat16)):
            return f"teacher of tensor {i} is not bf16(ema)"
        if not torch.equal(ours.params[j].grad, grads[j]):
            return f"grad of tensor {i} was written"
    return None


def bench_model(model: str, shapes: list[tuple[str, tuple[int, ...]]], device: torch.device, providers: list[str],
                args, copy_gbs: float, env: dict) -> list[dict] | None:
    work = Workload([s for _, s in shapes], device)
    n_params = sum(p.numel() for p in work.params)
    distinct = Counter(str(list(s)) for _, s in shapes)
    print(f"model {model}: {len(shapes)} tensors, {n_params:,} params, {len(distinct)} distinct shapes; device {device}")
    first = {}
    for i, (_, s) in enumerate(shapes):
        first.setdefault(s, i)
    err = validate(work, sorted(first.values()))
    if err:
        print(f"VALIDATION FAILED ({model}): {err}")
        return None
    print(f"validation ({model}): fused op matches torch_fused+ema on every distinct shape; EMA bit-exact with "
          "ema_update_ on the new params")

    torch_opt, ours_opt = work.torch_fused(), work.adamwema()
    torch_opt.grad_scale = work.one
    ours_opt.grad_scale = work.one

    def torch_fused_ema():
        torch_opt.step()
        ema_update_(work.ema, [p.detach() for p in work.params], EMA_DECAY, work.teacher)

    def adamwema():
        ours_opt.ema_decay = EMA_DECAY
        ours_opt.step()

    fns = {"torch_fused+ema": torch_fused_ema, "fused": lambda: work.fused_op(work.one), "AdamWEMA": adamwema}
    rows = []
    for name in providers:
        t = time_fn(fns[name], device, warmup=args.warmup, iters=args.iters)
        bpp = BYTES_PER_PARAM[name]
        gbs = n_params * bpp / (t.median_ms * 1e-3) / 1e9
        rows.append({**env, "bench": "optim", "model": model, "n_params": n_params, "n_tensors": len(shapes),
                     "shapes": dict(distinct), "provider": name, "ms": round(t.median_ms, 4),
                     "min_ms": round(t.min_ms, 4), "iters": t.iters, "bytes_per_param": bpp, "gbps": round(gbs, 1),
                     "copy_gbps": round(copy_gbs, 1), "frac_copy_bw": round(gbs / copy_gbs, 4)})
    base = next((r["ms"] for r in rows if r["provider"] == "torch_fused+ema"), None)
    for r in rows:
        if base:
            r["speedup_vs_torch_fused_ema"] = round(base / r["ms"], 3)
    del torch_opt, ours_opt, work
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --small)")
    ap.add_argument("--models", default=None, help="comma list (default GPT-B,GPT-XXL; GPT-debug with --small)")
    ap.add_argument("--small", action="store_true", help="CPU smoke test on GPT-debug's shapes")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=None, help="timed calls (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--results-dir", default=None, help="where optim.jsonl goes (default benchmarks/results)")
    ap.add_argument("--no-save", action="store_true", help="do not append to optim.jsonl")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda"))
    args.iters = args.iters or (20 if device.type == "cuda" else 3)
    models = [m.strip() for m in (args.models or ("GPT-debug" if args.small else "GPT-B,GPT-XXL")).split(",")]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"bench_optim: unknown providers {unknown}; known: {PROVIDERS}")
    if device.type == "cuda" and not _ext.has_cuda():
        print(f"WARNING: mirai._C has no CUDA kernels ({_ext.describe()}); 'fused' runs the foreach fallback")

    copy_gbs = copy_bandwidth_gbs(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    print(f"device-to-device copy bandwidth: {copy_gbs:.1f} GB/s")
    env = env_record(device)
    rows: list[dict] = []
    for model in models:
        got = bench_model(model, param_shapes(model), device, providers, args, copy_gbs, env)
        if got is None:
            return 1
        rows += got
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        r["pct_copy_bw"] = round(100 * r["frac_copy_bw"], 1)
    print(f"{env['gpu']} | commit {env['commit']} | torch {env['torch']}")
    print_table(rows, ["model", "provider", "ms", "min_ms", "bytes_per_param", "gbps", "pct_copy_bw",
                       "speedup_vs_torch_fused_ema"])
    if not args.no_save:
        out = append_jsonl("optim", [{k: v for k, v in r.items() if k != "pct_copy_bw"} for r in rows],
                           Path(args.results_dir) if args.results_dir else None)
        print(f"appended {len(rows)} lines to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
