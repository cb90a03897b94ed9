"""Training-step throughput: the real Mirai step on synthetic codes, model x mode x micro-batch.

What is timed is exactly what ``mirai train`` runs per optimizer step (``mirai.trainer.step.StepRunner``
built by ``mirai.trainer.run.build_run`` from the shipped configs): host-to-device copy of the batch, the
teacher (Mirai-E: EMA teacher forward in bf16 on the EMA weights; Mirai-I: precomputed features from
the store, or ``encoder_online``: a DINOv2 ViT run on synthetic images), the DeepSpeed engine forward /
backward / step (ZeRO-2 by default, bf16, the configs' dropout, AdamW, grad clip), the fused EMA
update (which refreshes the teacher) and the device-side loss accumulation used for logging. One GPU,
global batch = micro-batch (no accumulation). The data come from a temporary synthetic code store
through the same loader; batches are read before timing (the loader runs off the critical path in
training too). Mirai-E is measured with the foresight term on (after its warm-up epochs).

Per point: ``--warmup`` untimed steps (torch.compile happens there), then ``--steps`` timed steps
(CUDA events, median per step), images/s, peak memory, backbone TFLOP/s and MFU against the GPU's
measured dense bf16 peak (H100: 777e12; ``--peak`` or MIRAI_PEAK_FLOPS to override), plus the same
for the whole Mirai step's FLOPs (``mirai.metrics.flops``). JSON lines go to ``benchmarks/results/step.jsonl``
(GPU name, commit, settings, numbers), one line as soon as each point is measured. Each point runs
in its own subprocess so engines and compile caches of one point never affect the next.
``--variant=FLAGS`` (repeatable) times each point again with extra flags, right after it in the same
process tree, for an A/B on one machine (``--variant=--fuse-ema --variant='--ce-backend reference'``). Each
record also says which ``mirai._C`` kernels passed their device self-check and which ops fell back
(``kernels``), so no number silently measures a fallback.
``--backend single`` times the plain single-process engine (``train.backend=auto`` on one GPU) instead of
DeepSpeed; ``--compile-scope`` sets ``train.compile_scope``; ``--fuse-ema`` sets ``optim.fuse_ema`` (the
AdamW step, clip and EMA in one pass; single-process engine); ``--ce-backend`` sets ``train.ce_backend``;
``--target-dtype`` sets ``foresight.target_dtype`` (the teacher's / encoder's weights and targets in fp32 or bf16):
``--modes ema --variant='--target-dtype bf16'`` times its cost. Modes are ``foresight.mode`` values (none =
the baseline, ema = Mirai-E, encoder = Mirai-I with precomputed features) plus ``encoder_online``.

    python benchmarks/bench_step.py                                   # the whole grid on one GPU
    python benchmarks/bench_step.py --models GPT-B --modes ema --micro 32 --profile
    python benchmarks/bench_step.py --device cpu                      # smoke test: GPT-debug on a CPU

``--profile`` records a few steps with the torch profiler, writes a Chrome trace to
``benchmarks/results/trace_<model>_<mode>_<micro>.json`` and prints the top kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS_DIR, append_jsonl, env_record, print_table, time_fn  # noqa: E402

MODES = ("none", "ema", "encoder", "encoder_online")     # foresight.mode, plus the online encoder
CONFIG_SUFFIX = {"none": "baseline", "ema": "mirai_e", "encoder": "mirai_i", "encoder_online": "mirai_i"}
CONFIG_OF = {"GPT-B": "gpt-b", "GPT-L": "gpt-l", "GPT-XL": "gpt-xl", "GPT-XXL": "gpt-xxl"}
DEFAULT_MICRO = {"GPT-B": 32, "GPT-L": 32, "GPT-XL": 32, "GPT-XXL": 16, "GPT-debug": 4}


def point_config(model: str, mode: str, micro: int, store: Path, out: Path, args) -> "Config":  # noqa: F821
    """The shipped config of (model, mode) adapted to one GPU and the synthetic store."""
    from mirai.config import load_config
    cpu = args.device == "cpu"
    path = ROOT / "configs" / ("debug.yaml" if model == "GPT-debug" else f"{CONFIG_OF[model]}_{CONFIG_SUFFIX[mode]}.yaml")
    over = [f"data.codes={store}", f"out_dir={out}", f"train.micro_batch={micro}", f"train.global_batch={micro}",
            f"train.zero_stage={args.zero}", f"train.backend={args.backend}",
            f"train.compile={str(args.compile).lower()}", f"train.compile_scope={args.compile_scope}",
            "train.progress=false", "train.tensorboard=false", "data.num_workers=0", "data.pin_memory=true",
            f"train.device={'cpu' if cpu else 'cuda'}", "train.max_steps=1000000", "train.resume=none",
            f"optim.fuse_ema={str(args.fuse_ema).lower()}", f"train.ce_backend={args.ce_backend}"]
    if args.target_dtype:
        over += [f"foresight.target_dtype={args.target_dtype}"]
    if model == "GPT-debug":
        over += ["train.precision=fp32" if cpu else "train.precision=bf16"]
        if mode == "ema":
            over += ["foresight.mode=ema"]
        if mode == "encoder":
            over += ["foresight.mode=encoder", "foresight.head_out=32", "foresight.use_precomputed_features=true"]
        if mode == "encoder_online":
            over += ["foresight.mode=encoder"]
    if mode == "ema":
        over += ["foresight.warmup_epochs=0"]                 # time the step with the foresight term on
    if mode == "encoder_online":
        over += ["foresight.use_precomputed_features=false"]
    return load_config(path, over)


def encoder_weights_file(name: str, folder: Path) -> Path:
    """A randomly initialised state dict of the encoder (timing does not depend on the weights)."""
    import timm

    from mirai.foresight.encoders import ENCODERS
    model = timm.create_model(ENCODERS[name].timm_name.split(".")[0], pretrained=False, num_classes=0,
                              dynamic_img_size=True)
    path = folder / f"{name}_random.pth"
    torch.save(model.state_dict(), path)
    return path


def run_point(model: str, mode: str, micro: int, args) -> dict:
    """Build the run, read batches, warm up, time; returns one JSON record (called in a child process)."""
    from mirai import _ext
    from mirai.trainer.logging import flops_per_image, peak_flops
    from mirai.data.synthetic import write_synthetic_store
    from mirai.trainer.run import build_run
    from mirai.trainer.engine import compile_scope

    tmp = Path(tempfile.mkdtemp(prefix="bench_step_"))
    debug = model == "GPT-debug"
    grid = 4 if debug else 16
    feat_dim = None
    if mode == "encoder":
        feat_dim = 32 if debug else (768 if model == "GPT-B" else 1024)
    n_batches = 4                                             # distinct batches, cycled
    store = write_synthetic_store(tmp / "codes", num_images=micro * n_batches, grid_size=grid,
                                  vocab_size=64 if debug else 16384, num_classes=10 if debug else 1000,
                                  num_aug=1, features_dim=feat_dim)
    cfg = point_config(model, mode, micro, store, tmp / "run", args)
    if mode == "encoder_online":
        cfg.foresight.encoder.weights = str(encoder_weights_file(cfg.foresight.encoder.name, tmp))
    run = build_run(cfg)                                      # no validate(): the online encoder mode
    device = run.engine.device
    run.loader.start(0)
    it = iter(run.loader)
    batches = [next(it) for _ in range(n_batches)]
    if mode == "encoder_online":
        g = torch.Generator().manual_seed(0)
        for b in batches:                                     # the crops the codes were made from
            b["images"] = torch.randint(0, 256, (micro, 3, 256, 256), dtype=torch.uint8, generator=g)
    if device.type == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    run.engine.train()
    state = {"step": 0}

    def one_step() -> None:
        s = state["step"]
        run.runner.run(s, 0, [batches[s % n_batches]])
        state["step"] = s + 1
        if state["step"] % args.log_every == 0:              # logging as in training: one read per log step
            run.runner.meter.read()

    for _ in range(args.warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    cpu0 = time.process_time()
    timing = time_fn(one_step, device, warmup=0, iters=args.steps)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / args.steps     # host CPU time: steadier than wall on a shared CPU
    img_s = micro / (timing.median_ms * 1e-3)
    total, backbone = flops_per_image(run.source, run.gpt.config, run.fcfg)
    peak = peak_flops(args.peak, device)
    rec = {**env_record(device), "bench": "step", "model": model, "mode": mode, "micro_batch": micro,
           "backend": run.runtime.backend,
           "zero_stage": cfg.train.zero_stage if run.runtime.backend == "deepspeed" else None,
           "precision": cfg.train.precision, "compile": cfg.train.compile,
           "fuse_ema": bool(cfg.optim.fuse_ema and run.runtime.backend != "deepspeed"),
           "ce_backend": cfg.train.ce_backend,
           "compile_scope": compile_scope(cfg, run.runtime) if cfg.train.compile else None,
           "k": run.fcfg.k if run.fcfg.enabled else 0,
           "target_dtype": run.fcfg.target_dtype if run.fcfg.enabled else None,
           "layer": run.fcfg.layer if run.fcfg.enabled else None, "warmup": args.warmup, "steps": args.steps,
           "ms_per_step": timing.median_ms, "ms_min": timing.min_ms, "ms_max": timing.max_ms, "img_per_s": img_s,
           "cpu_ms_per_step": cpu_ms,
           "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
           "flops_per_image": total, "backbone_flops_per_image": backbone,
           "tflops": img_s * total / 1e12, "backbone_tflops": img_s * backbone / 1e12, "peak_flops": peak,
           "mfu": None if peak is None else img_s * total / peak,
           "backbone_mfu": None if peak is None else img_s * backbone / peak,
           "kernels": _ext.report()}      # which mirai._C kernels passed their self-check, which fell back
    if args.profile:
        rec["trace"] = str(profile(one_step, device, f"{model}_{mode}_{micro}"))
    return rec


def profile(step_fn, device: torch.device, tag: str, steps: int = 5) -> Path:
    from torch.profiler import ProfilerActivity, profile as tprofile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts, record_shapes=False) as prof:
        for _ in range(steps):
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    path = RESULTS_DIR / f"trace_{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    table = prof.key_averages()
    if device.type == "cuda":   # where the GPU spends its time
        print(table.table(sort_by="self_cuda_time_total", row_limit=25), file=sys.stderr)
    # where the host spends its time (a step far above its GPU time is host-bound)
    print(table.table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    if device.type == "cuda":
        print_host_syncs(step_fn)
    return path


def print_host_syncs(step_fn) -> None:
    """One more step under CUDA sync-debug mode: where (file:line) the step makes the host wait."""
    import collections
    import warnings
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step_fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message).lower())
    print(f"host syncs in one step: {sum(where.values())}", file=sys.stderr)
    for loc, n in where.most_common(15):
        print(f"  {n:4d}  {loc}", file=sys.stderr)


def argv_base(args) -> list[str]:
    """The flags a child process gets for one point (everything but the point and the variants)."""
    flags = ["--device", args.device, "--backend", args.backend, "--zero", str(args.zero),
             "--compile" if args.compile else "--no-compile", "--compile-scope", args.compile_scope,
             "--warmup", str(args.warmup), "--fuse-ema" if args.fuse_ema else "--no-fuse-ema",
             "--ce-backend", args.ce_backend, "--steps", str(args.steps), "--log-every", str(args.log_every)]
    if args.target_dtype:
        flags += ["--target-dtype", args.target_dtype]
    if args.peak:
        flags += ["--peak", str(args.peak)]
    if args.profile:
        flags += ["--profile"]
    return flags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma list (default GPT-B,GPT-XXL; GPT-debug with --device cpu)")
    p.add_argument("--modes", default="none,ema,encoder", help=f"comma list of {','.join(MODES)}")
    p.add_argument("--micro", default=None, help="comma list of micro-batches (default per model: B 32, XXL 16)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", choices=("deepspeed", "single"), default="deepspeed")
    p.add_argument("--zero", type=int, default=2, help="ZeRO stage (one GPU: 2)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the blocks (default on for CUDA, off for CPU)")
    p.add_argument("--compile-scope", choices=("auto", "model", "blocks"), default="auto",
                   help="train.compile_scope: one graph for the whole forward, or one per block")
    p.add_argument("--fuse-ema", action=argparse.BooleanOptionalAction, default=False,
                   help="optim.fuse_ema: AdamW + clip + EMA in one pass (mirai.optim.AdamWEMA; --backend single)")
    p.add_argument("--ce-backend", choices=("auto", "fused", "reference"), default="auto",
                   help="train.ce_backend: the fused linear + CE's row pass (mirai._C kernel or PyTorch)")
    p.add_argument("--target-dtype", choices=("bf16", "fp32"), default=None,
                   help="foresight.target_dtype (default: the config's, fp32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 CUDA / 1 CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 CUDA / 3 CPU)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss reads, as train.log_every")
    p.add_argument("--peak", type=float, default=None, help="dense bf16 peak FLOP/s for MFU")
    p.add_argument("--profile", action="store_true", help="torch profiler trace + top kernels per point")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/step.jsonl")
    p.add_argument("--point-timeout", type=float, default=None,
                   help="seconds one point (build, compile, warm-up, timing) may take before it is skipped; "
                        "a GPT-XXL point needs a few minutes")
    p.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                   help="also time each point with these extra flags, right after the point as given (repeatable; "
                        "e.g. --variant=--fuse-ema --variant='--ce-backend reference'): A/B on one machine, interleaved")
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)   # child: one JSON point
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.compile = (not cpu) if args.compile is None else args.compile
    args.warmup = (1 if cpu else 10) if args.warmup is None else args.warmup
    args.steps = (3 if cpu else 30) if args.steps is None else args.steps
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    if args.point is not None:                                 # child process: one point
        spec = json.loads(args.point)
        rec = run_point(spec["model"], spec["mode"], spec["micro"], args)
        rec["variant"] = spec.get("variant", "")
        print("BENCH_STEP_RESULT " + json.dumps(rec), flush=True)
        return 0
    variants = [""] + [v.strip() for v in args.variant if v.strip()]
    for v in variants[1:]:                                     # fail now, not after the first point's minutes
        _, unknown = p.parse_known_args(argv_base(args) + shlex.split(v))
        if unknown:
            p.error(f"--variant {v!r}: {' '.join(unknown)} is not a flag of this benchmark")

    models = (args.models or ("GPT-debug" if cpu else "GPT-B,GPT-XXL")).split(",")
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; choose from {MODES}")
    records = []
    for model in models:
        micros = [int(x) for x in args.micro.split(",")] if args.micro else [DEFAULT_MICRO.get(model, 32)]
        for mode in modes:
            for micro, variant in ((m, v) for m in micros for v in variants):
                point = json.dumps({"model": model, "mode": mode, "micro": micro, "variant": variant})
                child = [sys.executable, __file__, "--point", point, *argv_base(args), *shlex.split(variant)]
                label = f"{model} {mode} micro {micro}" + (f" [{variant}]" if variant else "")
                try:
                    proc = subprocess.run(child, capture_output=True, text=True, cwd=ROOT,
                                          timeout=args.point_timeout)
                except subprocess.TimeoutExpired:
                    print(f"{label}: TIMED OUT after {args.point_timeout:.0f} s "
                          "(--point-timeout)", file=sys.stderr, flush=True)
                    continue
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_STEP_RESULT ")]
                if proc.returncode != 0 or not lines:
                    print(f"{label}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}",
                          file=sys.stderr)
                    continue
                if args.profile:
                    print(proc.stderr[-12000:], file=sys.stderr)
                rec = json.loads(lines[-1][len("BENCH_STEP_RESULT "):])
                records.append(rec)
                if not args.no_save:        # at once: a job killed later keeps the points already measured
                    append_jsonl("step", [rec])
                print(f"{label}: {rec['ms_per_step']:.1f} ms ({rec['cpu_ms_per_step']:.1f} ms host CPU), "
                      f"{rec['img_per_s']:.0f} img/s"
                      + (f", {rec['peak_mem_gb']:.1f} GB" if rec["peak_mem_gb"] is not None else "")
                      + (f", backbone MFU {100 * rec['backbone_mfu']:.1f}%" if rec["backbone_mfu"] else ""), flush=True)
                for line in rec["kernels"]["fallbacks"]:       # a number measured on a fallback says so
                    print(f"    fell back: {line}", flush=True)
    if not records:
        return 1
    print_table(records, ["model", "mode", "micro_batch", "variant", "ms_per_step", "img_per_s", "peak_mem_gb",
                          "backbone_tflops", "backbone_mfu", "tflops", "mfu"])
    if not args.no_save:
        print(f"appended to {RESULTS_DIR / 'step.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
