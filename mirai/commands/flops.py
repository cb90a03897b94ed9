"""``mirai flops``: per-image training FLOPs of a model and mode, as the trainer counts them for MFU.

    mirai flops --model GPT-B --mode all
    mirai flops --model gpt-xxl --mode ema --json

How they are counted: ``mirai.metrics.flops``. Bad input (an unknown model, a layer outside the model, a
non-positive size) is an error naming the option, exit code 2.
"""
from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import asdict

from mirai.commands import HelpFormatter
from mirai.metrics.flops import ENCODERS, MODES, TITLES, FlopsBreakdown, model_config, training_flops_per_image


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai flops", formatter_class=HelpFormatter,
                                description="Per-image training FLOPs of a model and mode (forward + backward of "
                                            "the student, plus Mirai's teacher / heads / encoder).")
    p.add_argument("--model", default="GPT-B",
                   help="registered model name, any case (GPT-debug, GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B, PAR-B, ...)")
    p.add_argument("--mode", default="all", choices=MODES + ("all",),
                   help="foresight.mode: none (baseline), ema (Mirai-E), encoder (Mirai-I), or all three")
    p.add_argument("--k", type=_positive_int, default=None, help="foresight heads (default as training: 3 for ema, 1 for encoder)")
    p.add_argument("--layer", type=_positive_int, default=None,
                   help="aligned layer l, 1-based (default: 2/3 of the depth, as training: 8 of GPT-B's 12 blocks)")
    p.add_argument("--head-hidden", type=_positive_int, default=2048, help="heads' hidden width")
    p.add_argument("--head-out", type=_positive_int, default=None,
                   help="heads' output width (default: the model width for ema, the encoder width for encoder)")
    p.add_argument("--encoder", default="dinov2_vitb14", choices=sorted(ENCODERS), metavar="NAME",
                   help=f"the Mirai-I encoder: {', '.join(sorted(ENCODERS))}")
    p.add_argument("--count-encoder", action="store_true", help="add the online encoder forward to mode encoder")
    p.add_argument("--block-size", type=_positive_int, default=None,
                   help="tokens per image, a square (default: the model's, 256 = 16x16; 576 for 384 px)")
    p.add_argument("--vocab-size", type=_positive_int, default=None, help="codebook size (default: the model's 16384)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    return p


def model_name(name: str, parser: argparse.ArgumentParser) -> str:
    """The registered spelling of ``name`` (matched case-insensitively); a parser error listing the known names."""
    from mirai.models.gpt import GPT_models
    from mirai.models.par import PAR_models
    known = list(GPT_models) + list(PAR_models)
    by_lower = {k.lower(): k for k in known}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    close = difflib.get_close_matches(name.upper(), [k.upper() for k in known], n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(by_lower[c.lower()] for c in close)}?)" if close else ""
    parser.error(f"argument --model: unknown model {name!r}{hint}; known: {', '.join(known)}")


def _fmt(x: float) -> str:
    return f"{x:.3e}"


def report(b: FlopsBreakdown) -> str:
    lines = [f"{b.model or 'model'}  mode={b.mode} ({TITLES[b.mode]})  T={b.seq_len}",
             f"  backbone fwd+bwd   {_fmt(b.backbone)}"]
    if b.mode == "ema":
        lines.append(f"  teacher fwd (l)    {_fmt(b.teacher)}  (+{100 * b.teacher / b.backbone:.1f}%)")
    if b.mode != "none":
        lines.append(f"  heads fwd+bwd      {_fmt(b.heads)}  (+{100 * b.heads / b.backbone:.1f}%)")
    if b.mode == "encoder":
        state = "counted" if b.encoder_counted else "not counted (precomputed features)"
        lines.append(f"  encoder fwd        {_fmt(b.encoder)}  (+{100 * b.encoder / b.backbone:.1f}%, {state})")
    lines.append(f"  total              {_fmt(b.total)}  overhead +{100 * b.overhead:.1f}%")
    lines.append(f"  paper convention (6*N*T): baseline {_fmt(b.six_nt_backbone)}, "
                 f"overhead +{100 * b.six_nt_overhead:.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    name = model_name(args.model, p)
    overrides = {k: v for k, v in (("block_size", args.block_size), ("vocab_size", args.vocab_size)) if v is not None}
    try:
        config = model_config(name, **overrides)
    except (KeyError, TypeError, ValueError) as err:
        options = " / ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
        p.error(f"argument {options or '--model'}: {name} does not accept it ({err})")
    from mirai.foresight.config import default_layer
    from mirai.foresight.sources import default_k
    layer = default_layer(config.n_layer) if args.layer is None else args.layer
    if layer > config.n_layer:
        p.error(f"argument --layer: {layer} is deeper than {name}'s {config.n_layer} blocks (1..{config.n_layer})")
    modes = MODES if args.mode == "all" else (args.mode,)
    for mode in modes:
        k = args.k if args.k is not None or mode == "none" else default_k(mode)
        b = training_flops_per_image(config, mode, k=k, layer=layer, head_hidden=args.head_hidden,
                                     head_out=args.head_out, encoder=args.encoder,
                                     count_encoder=args.count_encoder, model=name)
        if args.json:
            print(json.dumps({**asdict(b), "total": b.total, "overhead": b.overhead,
                              "six_nt_overhead": b.six_nt_overhead}))
        else:
            print(report(b))
    return 0
