"""``mirai demo`` / ``make demo``: the embedded default job. LlamaGen baseline, Mirai-E and Mirai-I on real
digits, several seeds, honest statistics; no downloads.

    python -m mirai demo [--seeds N] [--split heldout|validation] [--steps N] [--out runs/demo] [--fresh]
                         [--jobs N] [--threads N] [--device auto|cpu|cuda] [--set KEY=VALUE ...]

Stages (each prints a ``[demo i/8]`` line; every product lands under ``--out``; every fitted piece and every
finished run is reused by the next call while its inputs are unchanged):

1. data        scikit-learn's 1,797 8x8 digits, upscaled to 32x32; fit / evaluation split (``data``).
2. tokenizer   k-means codebook of 4x4 patches fitted on the fit split (``tokenizer``).
3. encoder     the frozen bidirectional encoder of Mirai-I, trained by masked-token prediction on the fit
               split's tokens (``encoder``).
4. classifier  a small digit CNN fitted on the fit split: class consistency and the Frechet distance's
               feature space (``classifier``).
5. codes       code stores of both splits; the training store carries the encoder's per-cell features, written
               as ``mirai prepare --encoder`` writes them (``data.write_store``).
6. runs        per seed: baseline, Mirai-E (K = 3) and Mirai-I (K = 1) from ``configs/demo_*.yaml`` through
               ``python -m mirai train``, several at a time (``runs``, ``execute``); each run is then evaluated
               at its kept checkpoints: NTP loss, samples, class consistency, Frechet distance, 2D organisation
               of its layer-l features (``evaluate``).
7. figures     convergence, samples, 2D organisation, t-SNE (``figures``).
8. report      ``report.md`` and ``report.json``: mean +- sd over seeds and the paired difference of each Mirai
               method to the baseline with a t-based 95 % interval and p-value (``stats``, ``report``).
"""


def main(argv: list[str] | None = None) -> int:
    """The command line (``mirai demo``); see ``mirai.commands.demo.pipeline``."""
    from mirai.commands.demo.pipeline import main as _main
    return _main(argv)


def run_demo(opts):
    """The whole demo for ``DemoOptions`` (see ``mirai.commands.demo.options``); returns the report dict."""
    from mirai.commands.demo.pipeline import run_demo as _run
    return _run(opts)
