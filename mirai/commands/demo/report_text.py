"""``report.md`` from the report dict (``mirai.commands.demo.report.build_report``)."""
from __future__ import annotations

from typing import Any

from mirai.commands.demo.report import METRICS, verdict
from mirai.commands.demo.runs import METHODS
from mirai.commands.demo.stats import mean_std

MIRAI = ("mirai_e", "mirai_i")


def _f(x: float | None, nd: int = 4, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _digits(key: str) -> int:
    return 2 if key == "fd" else 3 if key in ("consistency", "org") else 4


def _row_title(template: str, r: dict[str, Any]) -> str:
    return template.format(split=r["eval_name"], layer=r["model"]["layer"])


def results_tables(r: dict[str, Any]) -> list[str]:
    s, titles = r["summary"], {m: r["methods"][m]["title"] for m, _, _ in METHODS}
    n = r["seeds"]
    L = [f"## Results ({n} seed{'s' if n > 1 else ''}: mean ± standard deviation over seeds)", "",
         "| metric | " + " | ".join(titles[m] for m, _, _ in METHODS) + " |", "|---|---:|---:|---:|"]
    for key, template, better in METRICS:
        cells = []
        for m, _, _ in METHODS:
            st = s[key]["stats"][m]
            cells.append(_f(st["mean"], _digits(key)) + ("" if st["std"] is None else f" ± {_f(st['std'], _digits(key))}"))
        L.append(f"| {_row_title(template, r)} ({better} is better) | " + " | ".join(cells) + " |")
    L += ["", "### Paired difference to the baseline", "",
          f"Method − baseline, paired by seed (same initialisation seed, data order and dropout seed); "
          f"mean [95 % confidence interval from Student's t with n − 1 = {n - 1} degrees of freedom], and the "
          "two-sided p-value of the paired t-test. A verdict needs the interval to exclude 0.", "",
          "| metric | Mirai-E − baseline | Mirai-I − baseline |", "|---|---|---|"]
    for key, template, better in METRICS:
        cells = []
        for m in MIRAI:
            d = s[key]["diff"][m]
            ci = "" if d["ci_low"] is None else f" [{_f(d['ci_low'], _digits(key), True)}, " \
                                                f"{_f(d['ci_high'], _digits(key), True)}]"
            p = "" if d["p"] is None else f", p = {d['p']:.3f}"
            cells.append(f"{_f(d['mean'], _digits(key), True)}{ci}{p}: {verdict(d, better)}")
        L.append(f"| {_row_title(template, r)} | " + " | ".join(cells) + " |")
    reach = s["reach_baseline_ntp"]
    L += ["", f"Steps until the {r['eval_name']} NTP loss first reaches the baseline's final value (same seed; "
          f"linear between the evaluated checkpoints; of {reach['total']} steps; '—' = not reached): " +
          "; ".join(f"{titles[m]}: " + ", ".join("—" if v is None else f"{v:.0f}" for v in reach["steps"][m])
                    for m in MIRAI) + ".", ""]
    return L


def convergence_table(r: dict[str, Any]) -> list[str]:
    """NTP (and FD where measured) at every evaluated step: mean ± sd over seeds, one row per method."""
    curves = {m: [run["eval"]["curve"] for run in r["runs"].values() if run["method"] == m] for m, _, _ in METHODS}
    steps = [p["step"] for p in curves["baseline"][0]]
    L = ["| step | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for key, name, nd in (("ntp", "NTP", 3), ("fd", "FD", 1)):
        for m, title, in ((m, r["methods"][m]["title"]) for m, _, _ in METHODS):
            cells = []
            for i in range(len(steps)):
                vals = [c[i][key] for c in curves[m] if key in c[i]]
                st = mean_std(vals) if vals else None
                cells.append("" if st is None else _f(st["mean"], nd) +
                             ("" if st["std"] is None else f" ± {_f(st['std'], nd)}"))
            L.append(f"| {name}, {title} | " + " | ".join(cells) + " |")
    return L + [""]


def figure_sections(r: dict[str, Any]) -> list[str]:
    fr, samp, f = r["fd_reference"], r["sampling"], r["figures"]
    L = ["## Convergence", "", f"![convergence]({f['convergence']})", "",
         f"Left and middle: the {r['eval_name']} NTP loss of every kept checkpoint and the Frechet distance of "
         f"the last {samp['fd_points']}, mean over seeds with ± 1 standard deviation as a band. Right: the "
         "foresight loss the Mirai runs minimise (mean over heads of −cos, from the training log).", ""]
    L += convergence_table(r)
    L += ["## Samples", "", f"![samples]({f['samples']})", "",
          f"{samp['per_class']} samples per class from each final EMA model (seed 0 shown), CFG {samp['cfg_scale']}, "
          f"temperature {samp['temperature']}, top-k {samp['top_k'] or 'off'}. For scale: {fr['images']} real "
          f"training digits score FD {fr['real']:.2f} against the {r['eval_name']} digits, "
          f"{fr['tokenized']:.2f} after tokenize -> decode (a perfect generator's floor through this tokenizer).", ""]
    L += ["## 2D organisation of layer-l representations", "", f"![organisation]({f['organisation']})", "",
          f"For every {r['eval_name']} image, the layer-{r['model']['layer']} hidden states of its 64 positions "
          "(each at the grid cell it predicts), centred by their mean over the split and L2-normalised; the "
          "number is the mean cosine similarity of grid neighbours minus that of all pairs of cells of the "
          "same image (0: no spatial organisation). In the curve, the rise at the largest distances comes from "
          "the few pairs of opposite corners, which are background in almost every digit.", ""]
    if "tsne" in f:
        L += [f"![t-SNE]({f['tsne']})", "",
              "One t-SNE per model, fitted jointly over the 64 cells of one digit of each class, so a colour means "
              "the same within a row (not across rows: each model has its own feature space).", ""]
    return L


def setup_section(r: dict[str, Any]) -> list[str]:
    m, d, tk, enc, clf = r["model"], r["data"], r["tokenizer"], r["encoder"], r["classifier"]
    me, mi, w = r["methods"]["mirai_e"], r["methods"]["mirai_i"], r["warmup"]
    es = enc.get("settings", {})
    L = ["## Setup", "",
         f"- **Data**: scikit-learn's 1,797 handwritten 8x8 digits, upscaled to 32x32. Fit on {d['fit']} digits, "
         f"reported on {d['eval']} {r['eval_name']} digits" + (" (a validation split carved from the training "
         "split; the held-out digits were not read)" if r["split"] == "validation" else "") + ".",
         f"- **Tokenizer**: k-means codebook of {tk['codebook_size']} 4x4 patches (8x8 grid of 64 tokens), "
         f"{r['eval_name']} reconstruction MSE {tk['eval_mse']:.4f} (pixels in [-1, 1]); `tokenizer.png`.",
         f"- **Mirai-I encoder**: bidirectional transformer over the token grid (dim {es.get('dim')}, "
         f"{es.get('depth')} layers, {enc['params']:,} parameters), trained by masked-token prediction "
         f"({es.get('mask_ratio')} of the tokens masked, {es.get('steps')} steps) on the fit split only, then "
         f"frozen; masked-token accuracy {enc['eval_masked_accuracy']:.3f} on the {r['eval_name']} digits "
         f"({enc['fit_masked_accuracy']:.3f} on the fit split). Its per-cell features are stored in the training "
         "code store as `mirai prepare --encoder` stores them and read by the trainer's precomputed-features path.",
         f"- **Digit classifier** (class consistency, FD features): a small CNN, accuracy {clf['eval_acc']:.3f} on "
         f"the real {r['eval_name']} digits, {clf['eval_tokenized_acc']:.3f} after tokenize -> decode. The FD is "
         "FID's formula on this domain network's 64-d features, not on Inception's.",
         f"- **Model** (every run): {m['name']} with dim {m['dim']}, {m['n_layer']} layers, {m['n_head']} heads, "
         f"{m['params'] / 1e6:.2f}M parameters; {m['steps']} steps of {m['global_batch']} digits "
         f"({m['epochs']:.1f} epochs), AdamW lr {m['lr_per_256']:g} per 256 images ({m['schedule']}), EMA decay "
         f"{m['ema_decay']}, {m['precision']}, engine `{m['backend']}`.",
         f"- **Mirai-E**: K = {me['k']} heads on the 2D grid, layer {m['layer']} of {m['n_layer']} aligned with "
         f"the same layer of the model's EMA, MLP heads with hidden width {me['head_hidden']}, lambda "
         f"{me['lambdas']} -> {me['lambda_end']} at {me['switch_frac']:.0%} of training, no foresight term for the "
         f"first {w['epochs']} epoch(s) = {w['steps']} of {w['total']} steps.",
         f"- **Mirai-I**: K = {mi['k']} head, layer {m['layer']} aligned with the frozen encoder's feature of the "
         f"cell just read (which depends on the whole image), hidden width {mi['head_hidden']}, output "
         f"{mi['head_out']}, constant lambda {mi['lambdas']}, no warm-up.", "",
         "Commands (seed 0; the other seeds differ in `train.seed` and `out_dir`):", ""]
    for run in r["runs"].values():
        if run["seed"] == 0:
            L += ["```", run["command"], "```"]
    return L + [""]


def per_seed_table(r: dict[str, Any]) -> list[str]:
    L = ["## Every run", "", "| run | NTP | NTP raw | FD | consistency | 2D org. | train wall s | train CPU s |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, run in r["runs"].items():
        f, t = run["eval"]["final"], run["training"]
        reused = " (reused)" if t["reused"] else ""
        L.append(f"| {key}{reused} | {f['ntp']:.4f} | {f['ntp_raw']:.4f} | {f['fd']:.2f} | {f['consistency']:.3f} | "
                 f"{f['org']:.3f} | {_f(t.get('seconds'), 0)} | {_f(t.get('cpu_seconds'), 0)} |")
    return L + [""]


def timing_section(r: dict[str, Any]) -> list[str]:
    t, p = r["timing"], r["parallelism"]
    L = ["## Time", "",
         f"This call: {t['total_seconds']:.0f} s wall on {r['device_name']} (torch {r['torch']}), {p['jobs']} "
         f"run(s) at a time with {p['threads']} torch thread(s) each; 1-minute load average {p['load_start']} at "
         f"the start, {p['load_end']} at the end (other work on the machine slows every stage). "
         f"{t['trained_runs']} run(s) trained here, {t['train_cpu_seconds']:.0f} s of CPU (user + sys) in all; "
         f"the estimate printed at the start was {t['estimate_seconds']:.0f} s for an idle machine.", "",
         "| stage | wall s |", "|---|---:|"]
    L += [f"| {name} | {sec:.1f} |" for name, sec in t["stages"].items()]
    return L + [""]


def report_markdown(r: dict[str, Any]) -> str:
    n = r["seeds"]
    L = ["# Mirai demo: LlamaGen baseline, Mirai-E and Mirai-I on scikit-learn's digits", "",
         f"Written by `python -m mirai demo` on {r['date']}: {n} seed{'s' if n > 1 else ''} x 3 runs of "
         f"{r['model']['steps']} steps, numbers on the {r['eval_name']} digits. Every number comes from this call "
         "or from the earlier call whose finished run it reused; the runs of a seed differ only in the method. "
         "A tiny model on a tiny dataset: read the differences with their intervals.", ""]
    L += results_tables(r) + figure_sections(r) + setup_section(r) + per_seed_table(r) + timing_section(r)
    L += ["## Files", "", "`report.json` (every number of this report), the figures above, `tokenizer.pt`, "
          "`encoder.pt`, `classifier.pt`, `data/{train,eval}` (code stores; `train` holds the encoder features), "
          "`runs/<method>_s<seed>/` (config.yaml, metrics.jsonl, train.log, checkpoints, demo_eval.json, "
          "demo_samples.npz). Re-running reuses every finished piece; `--fresh` starts over.", ""]
    return "\n".join(L)
