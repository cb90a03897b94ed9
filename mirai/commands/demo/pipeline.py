"""``run_demo``: the demo's stages in order (see ``mirai.commands.demo``); ``main``: its command line."""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mirai.commands.demo.options import DemoOptions, build_parser, check_options, options_from_args, pick_parallelism, \
    resolve_device

NUM_STAGES = 8
DEMO_FILES = ("tokenizer.pt", "tokenizer.json", "tokenizer.png", "encoder.pt", "encoder.json", "classifier.pt",
              "classifier.json", "data", "runs", "convergence.png", "samples.png", "organisation.png", "tsne.png",
              "report.md", "report.json")


class Stages:
    """``[demo i/8] title`` lines with the time since the demo started, and each stage's wall seconds."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._start = 0.0

    def begin(self, i: int, name: str, text: str) -> None:
        self.end()
        self._name, self._start = name, time.perf_counter()
        print(f"[demo {i}/{NUM_STAGES}] {text}  (t = {self._start - self.t0:.0f} s)", flush=True)

    def end(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.perf_counter() - self._start, 2)
            self._name = None

    @staticmethod
    def note(text: str) -> None:
        print(f"           {text}", flush=True)


def clean(out: Path) -> None:
    """Remove what earlier demo calls wrote under ``out`` (and nothing else)."""
    for name in DEMO_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def prepare_inputs(opts: DemoOptions, out: Path, stages: Stages) -> dict[str, Any]:
    """Stages 1-5: digits, tokenizer, encoder, classifier, code stores. Returns what the runs need."""
    from mirai.commands.demo import data as D
    from mirai.commands.demo.classifier import fit_or_load_classifier
    from mirai.commands.demo.encoder import EncoderSettings, fit_or_load_encoder
    from mirai.commands.demo.figures import plot_tokenizer
    from mirai.commands.demo.tokenizer import fit_or_load_tokenizer
    stages.begin(1, "data", f"data: scikit-learn digits, 32x32, split '{opts.split}'")
    digits = D.load_splits(opts.split, opts.data_seed)
    Stages.note(f"fit on {len(digits.fit_y)} digits, report on {len(digits.eval_y)} {digits.eval_name} digits")
    stages.begin(2, "tokenizer", f"tokenizer: k-means codebook of {opts.codebook_size} 4x4 patches")
    tok, tok_facts, tok_reused = fit_or_load_tokenizer(
        out / "tokenizer.pt", digits.fit_x, digits.eval_x, codebook_size=opts.codebook_size,
        iters=opts.kmeans_iters, max_patches=opts.kmeans_patches, seed=opts.data_seed)
    Stages.note("reused" if tok_reused else f"fitted ({digits.eval_name} reconstruction MSE {tok_facts['eval_mse']:.4f})")
    plot_tokenizer(digits.eval_x[:20], tok, out / "tokenizer.png")
    tok_key = D.file_digest(out / "tokenizer.pt")
    stages.begin(3, "encoder", "encoder (Mirai-I): bidirectional transformer over the token grid, masked-token "
                 "training on the fit split, then frozen")
    settings = EncoderSettings(steps=opts.encoder_steps)
    enc, enc_facts, enc_reused = fit_or_load_encoder(out / "encoder.pt", tok, tok_key, digits.fit_x, digits.eval_x,
                                                     settings, opts.data_seed)
    Stages.note("reused" if enc_reused else f"fitted: {enc_facts['cpu_seconds']:.0f} s CPU, masked-token accuracy "
                f"{enc_facts['eval_masked_accuracy']:.3f} on the {digits.eval_name} digits")
    stages.begin(4, "classifier", "digit classifier (class consistency, Frechet distance features)")
    clf, clf_facts, clf_reused = fit_or_load_classifier(out / "classifier.pt", digits.fit_x, digits.fit_y,
                                                        digits.eval_x, digits.eval_y, tok, tok_key,
                                                        opts.classifier_epochs, opts.data_seed)
    Stages.note(("reused; " if clf_reused else "") + f"accuracy {clf_facts['eval_acc']:.3f} on the real "
                f"{digits.eval_name} digits, {clf_facts['eval_tokenized_acc']:.3f} after tokenize -> decode")
    stages.begin(5, "codes", f"code stores: {out / 'data'}/{{train,eval}} (train with the encoder's features)")
    enc_key = D.file_digest(out / "encoder.pt")
    train_key = D.digest(tok_key, enc_key, digits.fit_x, digits.fit_y)
    eval_key = D.digest(tok_key, digits.eval_x, digits.eval_y)
    reused = {"train": D.write_store(out / "data" / "train", tok, digits.fit_x, digits.fit_y, key=train_key,
                                     split="fit", encoder=enc),
              "eval": D.write_store(out / "data" / "eval", tok, digits.eval_x, digits.eval_y, key=eval_key,
                                    split=digits.eval_name)}
    Stages.note(", ".join(f"{k}: {'reused' if v else 'written'}" for k, v in reused.items()))
    codes_key = D.digest(tok_key, digits.fit_x, digits.fit_y)
    return {"digits": digits, "tokenizer": tok, "classifier": clf, "tok_key": tok_key, "eval_key": eval_key,
            "inputs": {"baseline": {"codes": codes_key}, "mirai_e": {"codes": codes_key},
                       "mirai_i": {"codes": codes_key, "features": enc_key}},
            "facts": {"tokenizer": {**tok_facts, "reused": tok_reused},
                      "encoder": {**enc_facts, "reused": enc_reused, "settings": dataclasses.asdict(settings)},
                      "classifier": {**clf_facts, "reused": clf_reused}}}


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """The whole demo; returns the report dict (also written to report.json)."""
    from mirai.commands.demo.evaluate import evaluation_settings, reference_distances
    from mirai.commands.demo.execute import train_and_evaluate
    from mirai.commands.demo.figures import draw_figures
    from mirai.commands.demo.report import build_report, write_report
    from mirai.commands.demo.runs import plan_runs
    check_options(opts)
    out = Path(opts.out)
    device = resolve_device(opts.device)
    par = pick_parallelism(opts, device, 3 * opts.seeds)
    plan = plan_runs(opts, device, opts.progress and par.jobs == 1)   # bad --set values / warm-up fail here
    if opts.fresh:
        clean(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(par.threads)
    stages = Stages()
    plan.announce(opts, par, out)
    inputs = prepare_inputs(opts, out, stages)
    evals = evaluation_settings(opts, out, inputs, device)
    refs = reference_distances(inputs, evals)
    stages.begin(6, "runs", f"runs: {len(plan.specs)} = {opts.seeds} seed(s) x (baseline, Mirai-E, Mirai-I), "
                 f"{plan.specs[0].total_steps} steps each, {par.jobs} at a time, {par.threads} thread(s) each")
    results = train_and_evaluate(plan, inputs, evals, par, device, opts.progress)
    stages.begin(7, "figures", "figures: convergence, samples, 2D organisation, t-SNE")
    figures = draw_figures(opts, out, plan, results, inputs, device)
    stages.begin(8, "report", f"report: {out / 'report.md'}")
    stages.end()
    report = build_report(opts, device, par, plan, inputs, refs, results, figures, stages)
    path = write_report(out, report)
    Stages.note(f"wrote {path} ({report['timing']['total_seconds']:.0f} s in all, "
                f"{report['timing']['main_cpu_seconds']:.0f} s CPU in this process)")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mirai.config import ConfigError
    try:
        run_demo(options_from_args(args))
    except (ValueError, ConfigError, RuntimeError) as err:
        print(f"mirai demo: error: {err}", file=sys.stderr)
        return 2
    return 0

