"""Benchmark of the 2D RoPE rotation under torch.compile: formulations of the same function.

The training step's profiles show Inductor's fused RoPE kernel (`triton_poi_fused__to_copy_add_cat_flip_mul_...`)
well below memory bandwidth: about 76 µs per call on GPT-XXL where its bytes need about 17 µs. This script times
formulations of ``mirai.models.rope.apply_rotary`` (same math, rotate interleaved pairs ``(x[2i], x[2i+1])`` of
``x [B, T, H, hd]`` by ``rows [T, hd/2, 2]`` (cos, sin), fp32 math, bf16 out), each compiled on its own:

  flip     ``x*cos + flip(x)*(-sin, sin)``: the model's formulation until 2026-11-22
  unbind   ``stack(x0*c - x1*s, x1*c + x0*s)`` on the unbound pair: ``apply_rotary``, the model's formulation since
           2026-11-22
  complex  ``view_as_complex(x) * view_as_complex(rows)`` (LlamaGen's formulation)
  bits     each bf16 pair read as one int32 and split with shifts, so every load and store is a plain
           contiguous 32-bit access (no pair swap); backward is the rotation by -angle

Input: the q/k columns of a fused wqkv output ``[B, T, (2·H_q + H_kv)·hd]`` (a strided view, as in the model),
bf16. Output layout ``bthd`` (as computed) or ``bhtd`` (transposed and made contiguous, as Inductor writes it
in the model before attention). Modes: forward, and forward + backward (gradient for the wqkv output).
Bytes model: the rotated tensor read once and written once per pass (2·N·2 B forward, twice that for forward +
backward); GB/s against the measured device copy bandwidth. Every formulation is checked against the fp32
eager reference before it is timed.

    python benchmarks/bench_rope.py                      # CUDA, GPT-B and GPT-XXL shapes
    python benchmarks/bench_rope.py --device cpu --small # smoke run

Appends JSON lines to benchmarks/results/rope.jsonl.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import append_jsonl, copy_bandwidth_gbs, env_record, print_table, time_fn  # noqa: E402

from mirai.models.rope import apply_rotary, rope_2d_table  # noqa: E402

# name: (batch, tokens incl. the class token, heads, head_dim, grid)
SHAPES = {"gptb": (32, 256, 12, 64, 16), "gptxxl": (16, 256, 24, 64, 16)}
SMALL = {"small": (2, 17, 3, 16, 4)}


def rope_flip(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    B, T, H, D = x.shape
    xp = x.float().reshape(B, T, H, D // 2, 2)                          # interleaved pairs (x0, x1)
    sin = torch.cat([-rows[:, None, :, 1:2], rows[:, None, :, 1:2]], dim=-1)   # [T, 1, D/2, 2]: (-s, +s)
    return torch.addcmul(xp * rows[:, None, :, 0:1], xp.flip(-1), sin).reshape(B, T, H, D).type_as(x)


def rope_complex(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    B, T, H, D = x.shape
    xc = torch.view_as_complex(x.float().reshape(B, T, H, D // 2, 2))   # [B, T, H, D/2] complex64
    fc = torch.view_as_complex(rows.contiguous())[:, None]              # [T, 1, D/2]
    return torch.view_as_real(xc * fc).reshape(B, T, H, D).type_as(x)


def _rotate_packed(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """bf16 ``x [B, T, H, D]`` (last dim contiguous) rotated pairwise, via int32 words holding one pair each."""
    u = x.view(torch.int32)                                             # [B, T, H, D/2], one pair per word
    x0 = (u << 16).view(torch.float32)                                  # low half: element 2i
    x1 = (u & -65536).view(torch.float32)                               # high half: element 2i+1
    o0 = (x0 * c - x1 * s).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    o1 = (x1 * c + x0 * s).to(torch.bfloat16).view(torch.int16).to(torch.int32) << 16
    return (o0 | o1).view(torch.bfloat16)                                # [B, T, H, D]


class _PackedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows):
        c, s = rows[:, None, :, 0], rows[:, None, :, 1]
        ctx.save_for_backward(rows)
        return _rotate_packed(x, c, s)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        c, s = rows[:, None, :, 0], rows[:, None, :, 1]
        return _rotate_packed(grad.contiguous(), c, -s), None           # rotation by -angle


def rope_bits(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.bfloat16:
        raise TypeError("the bits formulation is for bf16 only")
    return _PackedRope.apply(x, rows)


FORMS = {"flip": rope_flip, "unbind": apply_rotary, "complex": rope_complex, "bits": rope_bits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="tiny shape (smoke run)")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile each formulation (default: on CUDA)")
    ap.add_argument("--layouts", default="bthd,bhtd", help="comma list of output layouts (bthd, bhtd)")
    ap.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (default: all)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --small)")
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise SystemExit(f"--forms: unknown {unknown}; known: {list(FORMS)}")
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or any(x not in ("bthd", "bhtd") for x in layouts):
        raise SystemExit(f"--layouts: expected a comma list of bthd, bhtd; got {args.layouts!r}")
    shapes = SMALL if args.small else SHAPES
    if args.shapes and not args.small:
        names = [x.strip() for x in args.shapes.split(",") if x.strip()]
        if any(n not in SHAPES for n in names):
            raise SystemExit(f"--shapes: unknown in {names}; known: {list(SHAPES)}")
        shapes = {n: SHAPES[n] for n in names}
    copy_gbs = copy_bandwidth_gbs(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 24))
    env = env_record(device)
    print(f"device: {env['gpu']}; measured copy bandwidth {copy_gbs:,.0f} GB/s; compile={compile_}")
    rows_out, records = [], []
    for shape_name, (B, T, H, D, grid) in shapes.items():
        torch.manual_seed(0)
        cls = T - grid * grid
        table = rope_2d_table(grid, D, cls_token_num=max(cls, 0), device=device)[-T:]   # [T, D/2, 2]
        width = 3 * H * D                                                  # wqkv output, q k v columns
        base = torch.randn(B, T, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        n = B * T * 2 * H * D                                              # rotated elements (q and k)
        base32 = base.detach().float().requires_grad_(True)
        ref = apply_rotary(base32[..., :2 * H * D].view(B, T, 2 * H, D), table)      # fp32 reference
        g_ref = torch.randn_like(ref)
        (ref_grad,) = torch.autograd.grad(ref, base32, g_ref)
        ref = ref.detach()
        for layout in layouts:
            for form in forms:
                fn = FORMS[form]

                def step(fn=fn, layout=layout):
                    out = fn(base[..., :2 * H * D].view(B, T, 2 * H, D), table)   # [B, T, 2H, D]
                    return out.transpose(1, 2).contiguous() if layout == "bhtd" else out
                run = torch.compile(step, dynamic=False) if compile_ else step
                out = run()
                got = out.transpose(1, 2) if layout == "bhtd" else out
                err = (got.float() - ref).abs().max().item()
                tol = 2 * ref.abs().max().item() * 2 ** -8                 # bf16 rounding of the result
                if err > tol:
                    raise SystemExit(f"[{shape_name} {form} {layout}] wrong result: max error {err:.3g} > {tol:.3g}")
                g = (g_ref.transpose(1, 2).contiguous() if layout == "bhtd" else g_ref).to(out.dtype)
                (grad,) = torch.autograd.grad(out, base, g)
                gerr = (grad.float() - ref_grad).abs().max().item()
                if gerr > 2 * ref_grad.abs().max().item() * 2 ** -8:
                    raise SystemExit(f"[{shape_name} {form} {layout}] wrong gradient: max error {gerr:.3g}")
                fwd = time_fn(run, device, warmup=3, iters=args.iters)

                def full(run=run, g=g):
                    return torch.autograd.grad(run(), base, g)
                full()
                both = time_fn(full, device, warmup=3, iters=args.iters)
                for mode, t, nbytes in (("forward", fwd, 2 * n * 2), ("full", both, 4 * n * 2)):
                    gbs = nbytes / (t.median_ms * 1e-3) / 1e9
                    row = {"shape": shape_name, "form": form, "layout": layout, "mode": mode,
                           "ms": round(t.median_ms, 4), "gb_s": round(gbs, 1), "of_copy": round(gbs / copy_gbs, 3)}
                    rows_out.append(row)
                    records.append({**env, "bench": "rope", "batch": B, "tokens": T, "heads_qk": 2 * H,
                                    "head_dim": D, "compile": compile_, "copy_gb_s": round(copy_gbs, 1),
                                    "max_err": err, **row})
    print_table(rows_out, ["shape", "form", "layout", "mode", "ms", "gb_s", "of_copy"])
    if not args.no_save:
        print(f"appended to {append_jsonl('rope', records)}")


if __name__ == "__main__":
    main()
