"""Host cost per optimizer step of each training engine, on the CPU, 2 ranks (gloo under torchrun).

What this measures, honestly: the part of a GPU training step that a CPU can show. A GPU step is host-bound
when the Python and C++ work that queues the kernels (autograd, gradient hooks, bucket copies, norm
bookkeeping, optimizer loops over parameters) takes longer than the kernels; that work grows with the
NUMBER of parameter tensors and engine-side operations, not with their size. So the models here keep the
parameter lists of GPT-B (88 tensors) and GPT-XXL (340 tensors), and of their Mirai-E variants (+ the K = 3
foresight heads, the EMA teacher's forward and refresh): the same n_layer and module structure, at width
64 with 4 heads, a 64-code vocabulary, a 4x4 token grid and 1 image per rank, so little arithmetic is left.
Engine size thresholds (DDP's bucket size, ZeRO's reduction / all-gather / prefetch buckets and ZeRO-3's
persistence threshold) are scaled by the ratio of the parameter counts, so the number of buckets and the
set of parameters ZeRO-3 partitions are those of the full-size model. What this cannot show: GPU kernel
time, NCCL time and its overlap, and device synchronisations (a CPU has nothing to wait for, so a host sync
that drains a GPU's queue costs nothing here). The gloo all-reduce here is a real copy over loopback where
NCCL would work on the GPU: it is small at width 64, but it is in the numbers.

Each step is the trainer's: ``mirai.trainer.run.build_run`` builds the run from the shipped config (with the
overrides above) and ``StepRunner.run`` executes it (learning rate, coefficients, teacher, engine
forward / backward / step, EMA), as ``benchmarks/bench_step.py`` does. Variants (``--variants``):
``single`` (the one-process engine; each rank runs its own, no collectives, so both cores are as busy as in
the other variants), ``auto`` (what ``train.backend=auto`` picks on these ranks), ``ddp``, ``ddp_fused``
(DDP + ``optim.fuse_ema``), ``zero0`` .. ``zero3`` (DeepSpeed at that stage), and ``allreduce``: no model,
only the gloo all-reduce of the run's fp32 gradient bytes in DDP's buckets, per step (the part of DDP's
overhead that is data movement, which NCCL does on the GPU). All variants of a model are built once, then
timed in ``--reps`` rounds, each running every variant for ``--steps`` steps in a rotated order
(interleaved: a load change on a shared machine hits every variant alike). DeepSpeed ZeRO-3 replaces
``torch.nn.functional.linear`` for the whole process when it is built (its ``memory_efficient_linear``);
each variant here runs with the ``F.linear`` it was built with, ZeRO-3 is built last, and each model runs
in its own launch, so ZeRO-3 changes neither the other variants nor the other models.

Per step: wall time (``time.perf_counter``) and this process's CPU time (``time.process_time``: user +
system of all its threads, gloo's included; other programs' load does not count, though it still slows
this one through shared caches and cores). Per variant: the median over all timed steps and ranks, the
overhead over ``single`` (per round and rank the difference of the medians, averaged over ranks; then the
median over rounds) and its spread over rounds (min, max); the same from each round's fastest step
(``*_min_overhead_ms``: on a busy machine the least disturbed step is the steadier estimate). Alongside,
counts that no load changes, taken on rank 0 over 3 more steps each: ATen operations dispatched per step
(what a GPU would launch or at least pay dispatch for) and Python function calls per step
(``sys.setprofile``; C functions included).

JSON lines go to ``benchmarks/results/host.jsonl``, one per (model, variant), with the machine (CPU model,
cores, load average before and after), torch / deepspeed versions and the commit.

    python benchmarks/bench_host.py                      # the whole table (a few minutes on 2 idle cores)
    python benchmarks/bench_host.py --models GPT-B --variants single,ddp,zero2 --reps 3
    python benchmarks/bench_host.py --models GPT-B --variants single,zero2 --profile zero2   # cProfile (CPU time)
    python benchmarks/bench_host.py --smoke --no-save    # tiny and fast (the test suite runs it)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import append_jsonl, device_name, git_commit, print_table  # noqa: E402

VARIANTS = ("single", "auto", "ddp", "ddp_fused", "zero0", "zero1", "zero2", "zero3", "allreduce")
MODELS = {"GPT-B": "gpt-b_baseline.yaml", "GPT-B+E": "gpt-b_mirai_e.yaml",     # +E: Mirai-E heads and teacher
          "GPT-XXL": "gpt-xxl_baseline.yaml", "GPT-XXL+E": "gpt-xxl_mirai_e.yaml",
          "GPT-debug": "debug.yaml"}                                            # --smoke
SMALL = ["model.dim=64", "model.n_head=4", "model.vocab_size=64", "model.num_classes=10", "model.image_size=64",
         "foresight.head_hidden=64", "foresight.warmup_epochs=0"]


def variant_overrides(variant: str) -> list[str]:
    """train.* settings of one variant."""
    if variant in ("single", "auto", "ddp"):
        return [f"train.backend={variant}"]
    if variant == "ddp_fused":
        return ["train.backend=ddp", "optim.fuse_ema=true"]
    return ["train.backend=deepspeed", f"train.zero_stage={int(variant[-1])}"]


def model_config(model: str, extra: list[str]):
    from mirai.config import load_config
    over = [*extra]
    if model == "GPT-debug":
        over += ["foresight.mode=ema"]
    return load_config(ROOT / "configs" / MODELS[model], over)


def size_scale(model: str) -> float:
    """Parameters at width 64 / parameters at full size (engine thresholds are scaled by it)."""
    from mirai.trainer.engine.memory import model_sizes
    return model_sizes(model_config(model, SMALL)).params / model_sizes(model_config(model, [])).params


# the engines' size thresholds and the module that reads each when an engine is built
THRESHOLDS = {"DDP_BUCKET_MB": "mirai.trainer.engine.plain",
              "ZERO_REDUCE_BUCKET": "mirai.trainer.engine.deepspeed_engine",
              "ZERO3_PREFETCH_BUCKET": "mirai.trainer.engine.deepspeed_engine",
              "ZERO3_PERSISTENCE": "mirai.trainer.engine.deepspeed_engine"}


def threshold_module(name: str):
    """The module holding threshold `name` (an older checkout: the single module mirai.trainer.engine)."""
    import importlib
    try:
        return importlib.import_module(THRESHOLDS[name])
    except ModuleNotFoundError:
        return importlib.import_module("mirai.trainer.engine")


def engine_thresholds() -> dict:
    """The thresholds as the code sets them (an older checkout may lack some)."""
    return {name: getattr(threshold_module(name), name) for name in THRESHOLDS
            if hasattr(threshold_module(name), name)}


def scale_engine_thresholds(full: dict, scale: float) -> dict:
    """Set the engines' size thresholds (module constants read when an engine is built) to `full` x `scale`."""
    for name, value in full.items():
        # (element counts stay multiples of 64: DeepSpeed wants its buckets aligned to the rank count)
        setattr(threshold_module(name), name,
                value * scale if name == "DDP_BUCKET_MB" else max(64, int(value * scale) // 64 * 64))
    return {name: getattr(threshold_module(name), name) for name in full}


def build(model: str, variant: str, store: Path, out: Path, args):
    """One run of the real trainer (``build_run``) and a function that runs its optimizer step s."""
    from mirai.trainer.run import build_run
    world = int(os.environ["WORLD_SIZE"])
    cfg = model_config(model, [
        *SMALL, f"data.codes={store}", f"out_dir={out}", f"train.micro_batch={args.micro}",
        f"train.global_batch={args.micro * (1 if variant == 'single' else world)}", "train.compile=false",
        "train.device=cpu", f"train.precision={args.precision}", "data.num_workers=0", "data.pin_memory=false",
        "train.progress=false", "train.tensorboard=false", "train.resume=none", "train.max_steps=1000000",
        *variant_overrides(variant)])
    if variant == "single":          # one process inside the launch: build it as a plain run would be
        saved = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        try:
            run = build_run(cfg)
        finally:
            os.environ.update(saved)
    else:
        run = build_run(cfg)
    run.loader.start(0)
    it = iter(run.loader)
    batches = [next(it) for _ in range(4)]
    run.engine.train()
    return run, lambda s: run.runner.run(s, 0, [batches[s % len(batches)]])


def with_linear(step_fn, linear):
    """`step_fn` run with ``torch.nn.functional.linear`` set to `linear`."""
    import torch.nn.functional as F

    def step(s: int) -> None:
        F.linear = linear
        step_fn(s)
    return step


def allreduce_stepper(run, bucket_mb: float):
    """The all-reduce alone: the run's fp32 gradient bytes in buckets of `bucket_mb` (DDP's first one 1 MB)."""
    import torch
    import torch.distributed as dist
    numel = sum(p.numel() for p in run.engine.module.parameters())
    first, per = min(numel, (1 << 20) // 4), max(1, int(bucket_mb * 2**20) // 4)       # elements
    buckets = [torch.zeros(first)] + [torch.zeros(min(per, numel - i)) for i in range(first, numel, per)]

    def step(s: int) -> None:
        for b in buckets:
            dist.all_reduce(b)
    return step


def time_steps(step_fn, first: int, n: int) -> tuple[list[float], list[float]]:
    """(wall ms, CPU ms) of optimizer steps first .. first + n - 1."""
    wall, cpu = [], []
    for s in range(first, first + n):
        w0, c0 = time.perf_counter(), time.process_time()
        step_fn(s)
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return wall, cpu


def count_steps(step_fn, first: int, n: int) -> tuple[float, float]:
    """(ATen operations, Python calls) per step on this rank: n steps counting each (steps first .. + 2n - 1;
    apart, since the dispatch mode that counts operations runs Python itself)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.n += 1
            return func(*args, **(kwargs or {}))

    calls = [0]

    def profiler(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1
    with Ops():
        time_steps(step_fn, first, n)
    sys.setprofile(profiler)
    try:
        time_steps(step_fn, first + n, n)
    finally:
        sys.setprofile(None)
    return Ops.n / n, calls[0] / n


def worker(args) -> None:
    """One rank: build every variant of every model, time them interleaved, rank 0 prints the results."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist
    from mirai.trainer.distributed import setup
    from mirai.data.synthetic import write_synthetic_store

    torch.set_num_threads(1)
    F = torch.nn.functional
    own_linear = F.linear
    setup("ddp", "cpu")                                   # the process group every variant shares
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_host_{rank}_"))
    store = write_synthetic_store(tmp / "codes", num_images=max(64, 8 * args.micro * world), grid_size=4,
                                  vocab_size=64, num_classes=10, num_aug=1)
    full = engine_thresholds()
    variants = args.variants.split(",")
    for model in args.models.split(","):
        scale = size_scale(model)
        thresholds = scale_engine_thresholds(full, scale)
        runs, steppers = {}, {}
        for v in sorted(variants, key=lambda v: v == "zero3"):       # ZeRO-3's patches of torch: built last
            if v == "allreduce":
                continue
            runs[v] = build(model, v, store, tmp / f"{model}_{v}", args)
            # DeepSpeed ZeRO-3 replaces torch.nn.functional.linear for the whole process (its
            # memory_efficient_linear): every variant runs with the F.linear it was built with
            steppers[v] = with_linear(runs[v][1], F.linear)
            F.linear = own_linear
        first = next(iter(runs.values()))[0]
        if "allreduce" in variants:
            steppers["allreduce"] = allreduce_stepper(first, thresholds.get("DDP_BUCKET_MB", 25.0))
        n_tensors = sum(1 for _ in first.engine.module.parameters())
        engines = {v: (r.runtime.backend, r.cfg.train.zero_stage) for v, (r, _) in runs.items()}
        engines["allreduce"] = ("gloo", None)
        step = dict.fromkeys(variants, 0)
        for v in variants:                                # warm-up: allocator, first-call paths
            dist.barrier()
            time_steps(steppers[v], 0, args.warmup)
            step[v] = args.warmup
        samples = {v: [] for v in variants}               # per round: (wall ms list, cpu ms list)
        for rep in range(args.reps):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                dist.barrier()
                if args.profile == v and rep == 0:        # every rank steps (collectives); rank 0 prints
                    profile_steps(steppers[v], step[v], args.steps, f"{model} {v}", show=rank == 0)
                    step[v] += args.steps
                samples[v].append(time_steps(steppers[v], step[v], args.steps))
                step[v] += args.steps
        counts = {}
        for v in variants:
            dist.barrier()
            counts[v] = count_steps(steppers[v], step[v], 3)
            step[v] += 6
        gathered = [None] * world
        dist.all_gather_object(gathered, samples)
        if rank == 0:
            for rec in summarise(gathered, variants, args):
                v = rec["variant"]
                rec.update(model=model, param_tensors=n_tensors, backend=engines[v][0], zero_stage=engines[v][1],
                           ops_per_step=counts[v][0], py_calls_per_step=counts[v][1], size_scale=scale,
                           thresholds=thresholds)
                if "single" in counts:
                    rec["ops_overhead"] = counts[v][0] - counts["single"][0]
                    rec["py_calls_overhead"] = counts[v][1] - counts["single"][1]
                print("BENCH_HOST_RESULT " + json.dumps(rec), flush=True)
        del runs, steppers, first
    dist.barrier()
    dist.destroy_process_group()


def summarise(gathered: list[dict], variants: list[str], args) -> list[dict]:
    """Medians over steps and ranks; overhead over `single` paired per round and rank; its spread."""
    world = len(gathered)
    out = []
    for v in variants:
        rec = {"variant": v}
        for kind, name in ((0, "wall"), (1, "cpu")):
            rec[f"{name}_ms"] = statistics.median(x for r in range(world) for rnd in gathered[r][v] for x in rnd[kind])
            if "single" not in variants or v == "allreduce":
                continue
            for stat, tag in ((statistics.median, ""), (min, "_min")):     # min: the least disturbed step
                per_round = [statistics.mean(stat(gathered[r][v][i][kind]) - stat(gathered[r]["single"][i][kind])
                                             for r in range(world)) for i in range(args.reps)]
                rec[f"{name}{tag}_overhead_ms"] = statistics.median(per_round)
                rec[f"{name}{tag}_overhead_spread_ms"] = [round(min(per_round), 3), round(max(per_round), 3)]
        out.append(rec)
    return out


def profile_steps(step_fn, first: int, n: int, tag: str, show: bool) -> None:
    """cProfile (CPU time) of n steps on this rank; with `show`, the top functions by own time to stderr."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    time_steps(step_fn, first, n)
    prof.disable()
    if not show:
        return
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    print(f"---- cProfile (CPU time) {tag}, {n} steps, rank 0\n{s.getvalue()}", file=sys.stderr, flush=True)


def launch_command(nproc: int) -> list[str]:
    """torchrun on a free local port, running this file."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port), __file__]


def machine() -> dict:
    from importlib import metadata

    import torch
    try:
        ds = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        ds = None
    return {"cpu": device_name("cpu"), "cores": os.cpu_count(), "torch": torch.__version__, "deepspeed": ds,
            "commit": git_commit()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="GPT-B,GPT-XXL,GPT-B+E,GPT-XXL+E", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="train.precision (bf16: autocast in the plain engine, DeepSpeed's bf16 path)")
    p.add_argument("--micro", type=int, default=1, help="images per rank per step (16 tokens each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    p.add_argument("--reps", type=int, default=5, help="rounds over all variants (interleaved)")
    p.add_argument("--nproc", type=int, default=2, help="ranks")
    p.add_argument("--profile", default=None, metavar="VARIANT", help="cProfile rank 0's first round of VARIANT")
    p.add_argument("--smoke", action="store_true", help="GPT-debug, single/ddp/zero2, 1 round of 2 steps")
    p.add_argument("--no-save", action="store_true", help="do not append to the results file")
    p.add_argument("--results-dir", default=None, help="folder of host.jsonl (default benchmarks/results)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.variants = "GPT-debug", "single,ddp,zero2"
        args.warmup, args.steps, args.reps = 1, 2, 1
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for m in args.models.split(","):
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.worker:
        worker(args)
        return 0

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    flags = list(argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()
    lines: list[str] = []
    for model in args.models.split(","):   # one launch per model: a ZeRO-3 engine patches torch for its process
        proc = subprocess.run(launch_command(args.nproc) + ["--worker", *flags, "--models", model], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        if args.profile:
            print("\n".join(ln for ln in proc.stderr.splitlines() if "Warning" not in ln)[-60000:], file=sys.stderr)
        if proc.returncode != 0:
            print(f"bench_host: the {args.nproc}-rank launch for {model} failed (rc {proc.returncode})\n"
                  f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", file=sys.stderr)
            return 1
        lines += [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_HOST_RESULT ")]
    info = {**machine(), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "precision": args.precision, "micro": args.micro,
            "world": args.nproc, "steps": args.steps, "reps": args.reps, "warmup": args.warmup, "smoke": args.smoke,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    records = [{**json.loads(ln.split(" ", 1)[1]), **info} for ln in lines]
    if not records:
        print(f"bench_host: no results\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
        return 1
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, deepspeed {info['deepspeed']}, commit "
          f"{info['commit']}, {args.precision}, {args.nproc} ranks, load {load_before[0]:.1f} -> "
          f"{info['load_after'][0]:.1f}")
    print_table(records, ["model", "param_tensors", "variant", "backend", "zero_stage", "wall_ms", "cpu_ms",
                          "cpu_overhead_ms", "cpu_overhead_spread_ms", "cpu_min_overhead_ms", "ops_overhead",
                          "py_calls_overhead"])
    if not args.no_save:
        path = append_jsonl("host", records, Path(args.results_dir) if args.results_dir else None)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
