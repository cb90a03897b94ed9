"""``report.json`` (every number) and ``report.md`` (tables and figures) of a demo call."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirai.commands.demo.runs import METHODS, TITLES
from mirai.commands.demo.stats import mean_std, paired

# (key in a run's final evaluation, row title, which direction is better)
METRICS = (
    ("ntp", "NTP loss on the {split} digits, EMA weights (nats)", "lower"),
    ("ntp_raw", "NTP loss on the {split} digits, raw weights (nats)", "lower"),
    ("fd", "Frechet distance to the {split} digits (digit-classifier features)", "lower"),
    ("consistency", "class consistency of the samples", "higher"),
    ("org", "2D organisation of layer-{layer} features", "higher"),
)


def reach_step(curve: list[dict[str, Any]], target: float) -> float | None:
    """First step at which the NTP curve reaches ``target`` (linear between evaluated checkpoints; None: never)."""
    prev_step, prev = 0, None
    for p in curve:
        if p["ntp"] <= target:
            if prev is None or prev == p["ntp"]:
                return float(p["step"])
            return prev_step + (p["step"] - prev_step) * (prev - target) / (prev - p["ntp"])
        prev_step, prev = p["step"], p["ntp"]
    return None


def summarise(plan, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per metric: mean +- sd of each method, and each Mirai method's paired difference to the baseline."""
    seeds = sorted({s.seed for s in plan.specs})
    final = {m: [results[f"{m}_s{s}"]["eval"]["final"] for s in seeds] for m, _, _ in METHODS}
    summary: dict[str, Any] = {}
    for key, _, better in METRICS:
        values = {m: [f[key] for f in final[m]] for m in final}
        summary[key] = {"better": better, "values": values, "stats": {m: mean_std(v) for m, v in values.items()},
                        "diff": {m: paired(values[m], values["baseline"]) for m in ("mirai_e", "mirai_i")}}
    reach = {}
    for m in ("mirai_e", "mirai_i"):
        steps = []
        for s in seeds:
            target = final["baseline"][seeds.index(s)]["ntp"]
            steps.append(reach_step(results[f"{m}_s{s}"]["eval"]["curve"], target))
        reach[m] = steps
    summary["reach_baseline_ntp"] = {"steps": reach, "total": plan.specs[0].total_steps}
    return summary


def verdict(diff: dict[str, Any], better: str) -> str:
    if diff["ci_low"] is None:
        return "one seed: no interval"
    lo, hi = diff["ci_low"], diff["ci_high"]
    if lo > 0 or hi < 0:
        good = (lo > 0) == (better == "higher")
        return "better than the baseline" if good else "worse than the baseline"
    return "no significant difference"


def run_facts(spec, result: dict[str, Any]) -> dict[str, Any]:
    return {"method": spec.method, "seed": spec.seed, "title": spec.title, "run_dir": str(spec.run_dir),
            "command": spec.display_command(), "training": result["training"], "eval": result["eval"],
            "eval_seconds": result["eval_seconds"]}


def method_facts(plan) -> dict[str, Any]:
    """The resolved settings of each method (seed 0's config)."""
    out = {}
    for m, filename, title in METHODS:
        cfg = next(s for s in plan.specs if s.method == m).load_config()
        f = cfg.foresight
        out[m] = {"title": title, "config": f"configs/{filename}", "mode": f.mode, "k": f.k, "layer": f.layer,
                  "head_hidden": f.head_hidden, "head_out": f.head_out, "lambdas": f.lambdas,
                  "lambda_end": f.lambda_end, "schedule": f.schedule, "switch_frac": f.switch_frac,
                  "warmup_epochs": f.warmup_epochs, "ema_decay": cfg.ema.decay}
    return out


def model_facts(plan) -> dict[str, Any]:
    from mirai.config import model_gpt_config
    cfg = plan.specs[0].load_config()
    g = model_gpt_config(cfg.model)
    from mirai.models.gpt import build_gpt
    params = sum(p.numel() for p in build_gpt(cfg.model.name, **cfg.model.gpt_overrides()).parameters())
    return {"name": cfg.model.name, "dim": g.dim, "n_layer": g.n_layer, "n_head": g.n_head,
            "vocab_size": g.vocab_size, "params": params, "steps": cfg.train.max_steps,
            "global_batch": cfg.train.global_batch, "lr_per_256": cfg.optim.lr, "schedule": cfg.optim.schedule,
            "backend": cfg.train.backend, "precision": cfg.train.precision, "ema_decay": cfg.ema.decay,
            "epochs": cfg.train.max_steps * cfg.train.global_batch / plan.fit_size, "layer": plan.specs[0].layer}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def build_report(opts, device: str, par, plan, inputs: dict[str, Any], refs: dict[str, float],
                 results: dict[str, dict[str, Any]], figures: dict[str, str], stages) -> dict[str, Any]:
    digits = inputs["digits"]
    runs = {s.key: run_facts(s, results[s.key]) for s in plan.specs}
    trained = [r["training"] for r in runs.values() if not r["training"]["reused"]]
    timing = {"stages": dict(stages.seconds), "total_seconds": round(time.perf_counter() - stages.t0, 1),
              "main_cpu_seconds": round(time.process_time() - stages.cpu0, 1),
              "trained_runs": len(trained), "train_cpu_seconds": round(sum(t["cpu_seconds"] for t in trained), 1),
              "estimate_seconds": round(plan.estimate or 0.0)}
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "device_name": device_name(device),
            "torch": torch.__version__, "split": opts.split, "eval_name": digits.eval_name, "seeds": opts.seeds,
            "parallelism": {"jobs": par.jobs, "threads": par.threads, "cores": par.cores, "load_start": par.load,
                            "load_end": round(os.getloadavg()[0], 2)},
            "data": {"fit": len(digits.fit_y), "eval": len(digits.eval_y)},
            "tokenizer": inputs["facts"]["tokenizer"], "encoder": inputs["facts"]["encoder"],
            "classifier": inputs["facts"]["classifier"], "fd_reference": refs,
            "sampling": {"per_class": opts.samples_per_class, "cfg_scale": opts.cfg_scale, "fd_points": opts.fd_points,
                         "temperature": opts.temperature, "top_k": opts.top_k},
            "model": model_facts(plan), "warmup": plan.warmup, "methods": method_facts(plan),
            "summary": summarise(plan, results), "runs": runs, "figures": figures, "timing": timing}


def write_report(out: Path, r: dict[str, Any]) -> Path:
    from mirai.commands.demo.report_text import report_markdown
    (out / "report.json").write_text(json.dumps(r, indent=2, default=_plain))
    path = out / "report.md"
    path.write_text(report_markdown(r))
    return path


def _plain(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
