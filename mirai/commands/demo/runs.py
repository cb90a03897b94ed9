"""The demo's training runs: three methods per seed, their configs, the warm-up guard, and run reuse.

Every seed s trains ``configs/demo_baseline.yaml``, ``demo_mirai_e.yaml`` and ``demo_mirai_i.yaml`` into
``runs/<method>_s<s>`` with ``train.seed = s``: the same model, data store, data order, steps and batch (the
configs share one base and ``make_specs`` checks it), through the command users run (``python -m mirai train
--config ... --set ...``, see ``mirai.commands.demo.execute``). Checkpoints are kept every ``steps / eval_points``
steps for the convergence figure.

Warm-up: the trainer counts the Mirai-E warm-up in epochs. The config's ``foresight.warmup_epochs`` is read
as a fraction of its own run (``warmup_epochs`` epochs of the 1,437 training digits out of ``max_steps``
steps); when ``--steps`` or the split changes the run, the demo passes the number of epochs that keeps that
fraction (rounded). Whatever the warm-up, a Mirai run whose foresight coefficient is zero at every step of
the run (a warm-up as long as the run, or lambda = 0) is refused with a message before anything trains:
it would be a baseline under another name.

Reuse: a run whose final checkpoint exists, whose resolved config equals the one this call would write
(device and progress bars aside) and whose ``demo_inputs.json`` names the same training store (and, for
Mirai-I, the same encoder features) is finished; one with a checkpoint short of the end is resumed by the
trainer; any other is started over.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = (                                     # (key, config file, title)
    ("baseline", "demo_baseline.yaml", "baseline (LlamaGen)"),
    ("mirai_e", "demo_mirai_e.yaml", "Mirai-E"),
    ("mirai_i", "demo_mirai_i.yaml", "Mirai-I"),
)
TITLES = {key: title for key, _, title in METHODS}
IGNORED_FOR_REUSE = (("train", "device"), ("train", "progress"))   # config fields that do not change a run
INPUTS_FILE = "demo_inputs.json"
SHARED_SECTIONS = ("model", "optim", "ema")                          # identical in the three runs of a seed


@dataclass
class RunSpec:
    """One training run of the demo (picklable: handed to worker processes)."""

    method: str              # "baseline", "mirai_e", "mirai_i"
    seed: int                # train.seed
    config_file: Path        # configs/demo_*.yaml
    sets: list[str]          # --set overrides passed to mirai train
    run_dir: Path
    total_steps: int
    inputs: dict[str, str]   # digests of what the run reads (demo_inputs.json; filled once the stores exist)
    layer: int               # the injection layer l (the 2D-organisation measure reads it for every method)

    @property
    def key(self) -> str:
        return f"{self.method}_s{self.seed}"

    @property
    def title(self) -> str:
        return TITLES[self.method]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mirai", "train", "--config", str(self.config_file), "--set", *self.sets]

    def display_command(self) -> str:
        return " ".join(["python -m mirai train", "--config", str(self.config_file), "--set", *self.sets])

    def load_config(self):
        from mirai.config import load_config
        return load_config(self.config_file, self.sets)


def config_path(filename: str) -> Path:
    from mirai.config import CONFIG_DIR
    path = CONFIG_DIR / filename
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def user_sets(overrides: list[str], field: str) -> bool:
    return any(o.split("=", 1)[0].strip() == field for o in overrides)


def scaled_warmup(config_file: Path, steps: int, steps_per_epoch: int, ref_steps_per_epoch: int) -> int:
    """Warm-up epochs keeping the config's warm-up fraction for a run of ``steps`` steps of ``steps_per_epoch``
    (the config's fraction: its warmup_epochs epochs of ``ref_steps_per_epoch`` steps over its max_steps)."""
    from mirai.config import load_config
    cfg = load_config(config_file)
    warm = cfg.foresight.warmup_epochs or 0
    fraction = warm * ref_steps_per_epoch / cfg.train.max_steps
    return int(round(fraction * steps / steps_per_epoch))


def check_foresight_active(cfg, title: str, steps_per_epoch: int) -> None:
    """ValueError when a Mirai run's foresight coefficients are zero at every step (see the module docstring)."""
    from mirai.foresight.schedules import coefficients
    f, total = cfg.foresight, cfg.train.max_steps
    if not f.enabled:
        return
    if any(any(c != 0.0 for c in coefficients(f, s, total, s // steps_per_epoch)) for s in range(total)):
        return
    warm = f.warmup_epochs or 0
    why = (f"its warm-up of {warm} epochs ({warm * steps_per_epoch} steps of {steps_per_epoch} per epoch) covers "
           f"all {total} steps" if warm * steps_per_epoch >= total else "its lambda is 0 at every step")
    raise ValueError(f"{title}: the foresight term would be zero for the whole run: {why}. That run would train "
                     f"the baseline under the name {title}; use more --steps or a shorter warm-up "
                     "(--set foresight.warmup_epochs=N)")


def base_sets(opts, method: str, seed: int, device: str, store: Path, warmup: int | None) -> list[str]:
    sets = [f"out_dir={opts.out / 'runs' / f'{method}_s{seed}'}", f"data.codes={store}", f"train.device={device}",
            f"model.vocab_size={opts.codebook_size}", f"train.seed={seed}"]
    if opts.steps is not None:
        sets.append(f"train.max_steps={opts.steps}")
    if warmup is not None:
        sets.append(f"foresight.warmup_epochs={warmup}")
    return sets


def make_specs(opts, device: str, fit_size: int, ref_fit_size: int, progress: bool) -> list[RunSpec]:
    """Every run of this call, seed by seed; bad settings fail here, before any work."""
    from mirai.config import model_gpt_config, validate
    from mirai.foresight.config import default_layer
    specs: list[RunSpec] = []
    for seed in range(opts.seeds):
        for method, filename, title in METHODS:
            config_file = config_path(filename)
            spec = RunSpec(method, seed, config_file, [], Path(), 0, {}, 0)
            cfg = _resolved(spec, opts, device, fit_size, ref_fit_size, progress)
            validate(cfg, world_size=1, check_data=False)        # the store is written later; mirai train checks it
            check_foresight_active(cfg, f"{title} (seed {seed})", fit_size // cfg.train.global_batch)
            spec.run_dir, spec.total_steps = cfg.run_dir, int(cfg.train.max_steps)
            spec.layer = cfg.foresight.layer or default_layer(model_gpt_config(cfg.model).n_layer)
            specs.append(spec)
    check_same_setup(specs)
    return specs


def _resolved(spec: RunSpec, opts, device: str, fit_size: int, ref_fit_size: int, progress: bool):
    """Fill spec.sets (the demo's --set list, then the user's) and return the resolved config."""
    from mirai.config import load_config
    cfg = load_config(spec.config_file, list(opts.overrides))
    if cfg.train.max_steps is None:
        raise ValueError(f"{spec.config_file}: the demo needs train.max_steps (set it or pass --steps)")
    steps = opts.steps or cfg.train.max_steps
    batch = cfg.train.global_batch
    warm = None
    if cfg.foresight.mode == "ema" and not user_sets(opts.overrides, "foresight.warmup_epochs"):
        warm = scaled_warmup(spec.config_file, steps, fit_size // batch, ref_fit_size // batch)
    sets = base_sets(opts, spec.method, spec.seed, device, opts.out / "data" / "train", warm)
    every = max(1, math.ceil(steps / opts.eval_points))
    sets += [f"train.ckpt_every={every}", f"train.keep_last={opts.eval_points + 1}"]
    if not progress:
        sets.append("train.progress=false")
    spec.sets = sets + list(opts.overrides)
    return load_config(spec.config_file, spec.sets)


def check_same_setup(specs: list[RunSpec]) -> None:
    """The three runs of a seed share the model, optimizer, EMA, data order, steps and batch."""
    by_seed: dict[int, list] = {}
    for spec in specs:
        by_seed.setdefault(spec.seed, []).append(spec.load_config())
    for seed, cfgs in by_seed.items():
        first = cfgs[0]
        for cfg in cfgs[1:]:
            for section in SHARED_SECTIONS:
                if getattr(cfg, section) != getattr(first, section):
                    raise ValueError(f"seed {seed}: the demo's runs differ in their {section} section "
                                     f"({first.name} vs {cfg.name}); they must share it")
            keys = ("seed", "max_steps", "global_batch", "micro_batch", "precision", "backend")
            if any(getattr(cfg.train, k) != getattr(first.train, k) for k in keys) or \
                    cfg.data.codes != first.data.codes:
                raise ValueError(f"seed {seed}: {first.name} and {cfg.name} must share data.codes and "
                                 f"train.{{{', '.join(keys)}}}")


# --------------------------------------------------------------------------------------- reuse
def comparable(cfg) -> dict[str, Any]:
    d = cfg.to_dict()
    for section, key in IGNORED_FOR_REUSE:
        d.get(section, {}).pop(key, None)
    return d


def final_step(run_dir: Path) -> int | None:
    """Step of the run's latest complete checkpoint (None: no checkpoint yet or a broken one)."""
    from mirai.checkpoint import CheckpointError, read_latest, verify
    try:
        ckpt = read_latest(run_dir)
        return None if ckpt is None else int(verify(ckpt).get("step", -1))
    except CheckpointError:
        return None


def _config_diff(old: dict, new: dict) -> list[str]:
    diff = [f"{sec}.{key}" for sec in new if isinstance(new[sec], dict)
            for key in new[sec] if old.get(sec, {}).get(key) != new[sec][key]]
    return diff + [sec for sec in new if not isinstance(new[sec], dict) and old.get(sec) != new[sec]]


def run_state(spec: RunSpec, check_inputs: bool = True) -> tuple[str, str]:
    """(state, why): "finished", "partial" (resumable), "stale" (other settings or inputs: start over) or "new".
    ``check_inputs=False`` judges by the config alone (before the inputs' digests are known)."""
    from mirai.config import ConfigError, load_config
    run_dir = spec.run_dir
    if not run_dir.exists():
        return "new", "no run folder"
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return "stale", f"{saved} is missing"
    try:
        old = comparable(load_config(saved))
    except ConfigError as err:
        return "stale", f"{saved} no longer loads ({err})"
    new = comparable(spec.load_config())
    if old != new:
        return "stale", f"settings changed ({', '.join(_config_diff(old, new)) or 'config layout'})"
    try:
        recorded = json.loads((run_dir / INPUTS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        recorded = None
    if check_inputs and recorded != spec.inputs:
        return "stale", f"its inputs changed (tokenizer, data or encoder; {INPUTS_FILE})"
    step = final_step(run_dir)
    if step is None:
        return "partial", "no complete checkpoint yet"
    if step == spec.total_steps:
        return "finished", f"final checkpoint at step {step}"
    if step < spec.total_steps:
        return "partial", f"latest checkpoint at step {step} of {spec.total_steps}"
    return "stale", f"latest checkpoint at step {step}, past {spec.total_steps}"


def prepare_run_dir(spec: RunSpec, state: str) -> None:
    """Delete a stale run folder; record the run's inputs before the trainer starts writing."""
    if state == "stale":
        shutil.rmtree(spec.run_dir)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / INPUTS_FILE).write_text(json.dumps(spec.inputs, indent=2))


# --------------------------------------------------------------------------------------- the plan
# CPU seconds (user + sys) per optimizer step of 32 images at the demo configs' model size, one torch thread,
# measured on the 2-core development CPU (AMD EPYC, AVX-512).
STEP_CPU_SECONDS = {"baseline": 0.142, "mirai_e": 0.21, "mirai_i": 0.16}
RUN_START_CPU_SECONDS = 5.0          # interpreter, torch import and trainer set-up of one run
EVAL_CPU_SECONDS = {"per_checkpoint": 0.6, "per_sample": 0.007, "final": 2.0, "worker": 4.0}
FIXED_CPU_SECONDS = {"start": 6.0, "tokenizer": 4.0, "encoder_per_step": 0.024, "classifier_per_epoch": 0.2,
                     "figures": 25.0}


@dataclass
class Plan:
    """Every run of the call (validated), the Mirai-E warm-up it uses, and a time estimate."""

    specs: list[RunSpec]
    fit_size: int
    warmup: dict[str, Any]
    estimate: float | None = None      # seconds, as announced at the start

    def to_train(self) -> list[RunSpec]:
        """Runs not already finished with these settings (judged by config; inputs are checked later)."""
        return [s for s in self.specs if run_state(s, check_inputs=False)[0] != "finished"]

    def estimate_seconds(self, opts, par, out: Path) -> float:
        """Wall seconds on an idle machine (rough for other model sizes): the serial stages, then the runs
        (training if needed, evaluation) dealt in order to ``par.jobs`` workers, each to the least busy one."""
        todo = {s.key for s in self.to_train()}
        scale = self.specs[0].load_config().train.global_batch / 32
        e = EVAL_CPU_SECONDS
        per_eval = opts.eval_points * e["per_checkpoint"] + e["final"] + \
            opts.fd_points * 10 * opts.samples_per_class * e["per_sample"]
        workers = [e["worker"] if par.jobs > 1 else 0.0] * max(1, min(par.jobs, par.cores))
        for s in self.specs:
            train = RUN_START_CPU_SECONDS + s.total_steps * STEP_CPU_SECONDS[s.method] * scale
            i = workers.index(min(workers))
            workers[i] += per_eval + (train if s.key in todo else 0.0)
        f = FIXED_CPU_SECONDS
        fixed = f["start"] + f["figures"]
        if not (out / "encoder.json").is_file():
            fixed += f["tokenizer"] + opts.encoder_steps * f["encoder_per_step"] + \
                opts.classifier_epochs * f["classifier_per_epoch"]
        return fixed + max(workers)

    def announce(self, opts, par, out: Path) -> None:
        todo = self.to_train()
        w = self.warmup
        print(f"mirai demo: {len(self.specs)} runs ({opts.seeds} seed(s) x baseline, Mirai-E, Mirai-I), "
              f"{self.specs[0].total_steps} steps each; {len(todo)} to train, {len(self.specs) - len(todo)} "
              f"finished earlier. {par.jobs} at a time with {par.threads} torch thread(s) each "
              f"({par.cores} cores, load average {par.load:.1f}).", flush=True)
        print(f"mirai demo: Mirai-E warm-up: {w['epochs']} epoch(s) = {w['steps']} of {w['total']} steps "
              f"({w['steps'] / w['total']:.0%}; {w['why']}).", flush=True)
        self.estimate = self.estimate_seconds(opts, par, out)
        print(f"mirai demo: estimated time: about {self.estimate / 60:.0f} min on an idle "
              f"{par.cores}-core CPU (longer when the machine is busy).", flush=True)


def plan_runs(opts, device: str, progress: bool) -> Plan:
    """The validated runs of this call (``ValueError`` / ``ConfigError`` before any work)."""
    from mirai.commands.demo.data import fit_size
    fit, ref = fit_size(opts.split, opts.data_seed), fit_size("heldout", opts.data_seed)
    specs = make_specs(opts, device, fit, ref, progress)
    e = next(s for s in specs if s.method == "mirai_e").load_config()
    spe = fit // e.train.global_batch
    warm = e.foresight.warmup_epochs or 0
    why = ("set by --set" if user_sets(opts.overrides, "foresight.warmup_epochs") else
           f"the config's fraction of the run, in whole epochs of {spe} steps")
    return Plan(specs, fit, {"epochs": warm, "steps": min(warm * spe, e.train.max_steps),
                             "total": e.train.max_steps, "steps_per_epoch": spe, "why": why})
