"""Sampling throughput: images/s of class-conditional generation with CFG, eager vs fixed-shape compiled decoding.

Variants of the token decoder (``mirai sample`` without / with ``--compile``):

  eager    ``model.generate``: the KV-cache decoder of ``mirai.models.generation`` (growing cache slices, one
           host synchronisation per step in the multinomial check and the mask test)
  static   ``StaticDecoder(compile=False)``: the fixed-shape step on a preallocated full-length cache, run eagerly
  compile  ``StaticDecoder(compile=True)``: the same step through ``torch.compile(fullgraph=True)``; on CUDA with
           ``mode="reduce-overhead"``, i.e. replayed as CUDA graphs

Per model and variant, times (median of ``--iters`` batches after a warm-up batch, which also compiles):
``tokens`` (the decoder alone) and ``e2e`` (decoder + VQ decode of the codes to pixels + the uint8 copy to the
host, what ``mirai sample`` does per batch), as images/s at ``--batch`` (256 by default). The models have
random weights (speed does not depend on them) and run in bf16 on CUDA, fp32 on CPU; the tokenizer is a
random VQ-16 (VQ-debug with ``--small``).

Validation before timing: each variant must give exactly the eager decoder's tokens for the same generator on a
``--validate-batch`` batch in fp32 (in bf16 the attention kernels of the two decoders round differently, so
their samples drift apart after a near-tie; in fp32 they agree). A variant that fails is reported and not timed.

    python benchmarks/bench_sample.py                              # CUDA: GPT-B and GPT-XXL at batch 256
    python benchmarks/bench_sample.py --models GPT-B --variants eager,compile --iters 5
    python benchmarks/bench_sample.py --device cpu --small         # smoke run: a tiny model on the CPU

Appends JSON lines to benchmarks/results/sample.jsonl (GPU name, torch version, commit, settings, numbers;
``cudagraph_skips`` > 0 says the compiled variant ran without CUDA graphs, with inductor's reason in the log).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import append_jsonl, env_record, print_table, time_fn  # noqa: E402

from mirai.data.images import to_uint8  # noqa: E402
from mirai.models.gpt import build_gpt  # noqa: E402
from mirai.models.static_decode import StaticDecoder  # noqa: E402
from mirai.models.vq import build_vq  # noqa: E402

VARIANTS = ("eager", "static", "compile")
SMALL = dict(model="GPT-debug", vq="VQ-debug", vocab=64, block_size=16, batch=4)


def build(name: str, vocab: int, block_size: int, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    model = build_gpt(name, vocab_size=vocab, block_size=block_size, num_classes=1000)
    torch.nn.init.normal_(model.output.weight, std=0.02)       # the zero init would give uniform logits
    return model.to(device=device, dtype=dtype).eval()


def decoder_fn(variant: str, model, batch: int, sampling: dict, backend: str):
    """A callable (labels, generator) -> codes for the variant."""
    if variant == "eager":
        return lambda labels, generator: model.generate(labels, generator=generator, **sampling)
    compile_arg = (True if backend == "inductor" else backend) if variant == "compile" else False
    return StaticDecoder(model, batch, compile=compile_arg, **sampling).generate


def validate(variant: str, model, args, sampling: dict, device: torch.device) -> dict:
    """The variant's tokens equal the eager decoder's for the same generator (fp32, a small batch)."""
    model32 = copy.deepcopy(model).float()
    labels = torch.randint(0, 1000, (args.validate_batch,), generator=torch.Generator().manual_seed(1)).to(device)
    fn = decoder_fn(variant, model32, args.validate_batch, sampling, args.compile_backend)
    out = {"validate_batch": args.validate_batch, "validated": True}
    for seed in (11, 12):
        want = model32.generate(labels, generator=torch.Generator(device).manual_seed(seed), **sampling)
        got = fn(labels, torch.Generator(device).manual_seed(seed))
        if not torch.equal(got, want):
            diff = (got != want).nonzero()
            out.update(validated=False, first_mismatch=diff[0].tolist(),
                       equal_fraction=float((got == want).float().mean()))
            break
    del model32, fn
    return out


def bench_model(name: str, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    small = args.small
    vocab = SMALL["vocab"] if small else 16384
    block = SMALL["block_size"] if small else (args.image_size // 16) ** 2
    batch = SMALL["batch"] if small and args.batch is None else (args.batch or 256)
    grid = int(block ** 0.5)
    model = build(name, vocab, block, device, dtype)
    torch.manual_seed(0)
    vq = build_vq(SMALL["vq"] if small else "VQ-16").to(device).eval()
    sampling = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    labels = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    records = []
    for variant in args.variants.split(","):
        rec = {**env_record(device), "bench": "sample", "model": name, "variant": variant, "batch": batch,
               "tokens_per_image": block, "dtype": str(dtype).replace("torch.", ""), **sampling,
               "compile_backend": args.compile_backend if variant == "compile" else None}
        rec.update(validate(variant, model, args, sampling, device))
        if not rec["validated"]:
            print(f"{name} {variant}: VALIDATION FAILED (first mismatch [row, token] {rec['first_mismatch']}, "
                  f"{100 * rec['equal_fraction']:.1f}% of tokens equal): not timed", file=sys.stderr, flush=True)
            records.append(rec)
            continue
        fn = decoder_fn(variant, model, batch, sampling, args.compile_backend)
        seeds = iter(range(10_000))

        def tokens():
            return fn(labels, torch.Generator(device).manual_seed(next(seeds)))

        def end_to_end():
            return to_uint8(vq.decode_code(tokens(), (grid, grid)).float())

        skips = counters["inductor"]["cudagraph_skips"]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        tokens()                                                                 # warm-up: compiles
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rec["first_batch_s"] = time.perf_counter() - t0
        t_tok = time_fn(tokens, device, warmup=0, iters=args.iters)
        t_e2e = time_fn(end_to_end, device, warmup=0, iters=args.iters)
        rec.update(tokens_ms=t_tok.median_ms, tokens_img_s=batch / (t_tok.median_ms * 1e-3),
                   e2e_ms=t_e2e.median_ms, e2e_img_s=batch / (t_e2e.median_ms * 1e-3), iters=args.iters,
                   peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
                   cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips)   # > 0: ran without CUDA graphs
        print(f"{name} {variant}: validated on {rec['validate_batch']} images; tokens {rec['tokens_img_s']:.1f} img/s, "
              f"end to end {rec['e2e_img_s']:.1f} img/s (first batch {rec['first_batch_s']:.1f} s)", flush=True)
        records.append(rec)
        del fn
        model.clear_caches()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model, vq
    torch._dynamo.reset()
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="smoke run: GPT-debug + VQ-debug, batch 4")
    p.add_argument("--models", default=None, help="comma list (default GPT-B,GPT-XXL; GPT-debug with --small)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {','.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 256; 4 with --small)")
    p.add_argument("--image-size", type=int, default=256, help="256 (16x16 tokens) or 384 (24x24)")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=None, help="timed batches (default 3; 1 with --small)")
    p.add_argument("--validate-batch", type=int, default=2, help="fp32 batch of the token-equality check")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile variant (inductor; 'eager' to check tracing only)")
    p.add_argument("--results-dir", default=None, help="where sample.jsonl goes (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {VARIANTS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu --small for the smoke run")
    args.iters = args.iters or (1 if args.small else 3)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = (args.models or (SMALL["model"] if args.small else "GPT-B,GPT-XXL")).split(",")
    records = []
    for name in models:
        recs = bench_model(name, args, device, dtype)
        records += recs
        if not args.no_save:                     # at once: a job killed later keeps what was measured
            append_jsonl("sample", recs, args.results_dir)
    print_table(records, ["model", "variant", "batch", "validated", "tokens_img_s", "e2e_img_s", "first_batch_s",
                          "peak_mem_gb"])
    return 0 if all(r["validated"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
