"""Training and evaluating the demo's runs, several at a time.

Each run is one task: train it with the command users run (``python -m mirai train --config ... --set ...``
in a subprocess with ``OMP_NUM_THREADS`` = the task's threads; its output goes to ``<run>/train.log`` when
runs go in parallel), unless it is finished (``mirai.commands.demo.runs.run_state``), then evaluate it
(``mirai.commands.demo.evaluate.evaluate_run``). With ``jobs`` > 1 the tasks go to that many worker processes (spawned,
each with its own torch thread count), so on a 2-core CPU two single-threaded runs train side by side and the
evaluation of one overlaps the training of the next.

The training subprocess's CPU time (user + sys) is read from ``os.wait4``, so it is its own even when other
runs train beside it; wall time, CPU time and the machine's load are kept in ``<run>/demo_timing.json``, which
a reused run reports again.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import torch

from mirai.commands.demo.evaluate import EvalSettings, evaluate_run
from mirai.commands.demo.runs import RunSpec, final_step, prepare_run_dir, run_state

TIMING_FILE = "demo_timing.json"


@dataclass
class Task:
    """One run to train (if needed) and evaluate."""

    spec: RunSpec
    device: str
    threads: int
    quiet: bool              # trainer output to <run>/train.log instead of the terminal
    evals: EvalSettings


def say(text: str) -> None:
    print(f"           {text}", flush=True)


def _tail(path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def train(spec: RunSpec, device: str, threads: int, quiet: bool) -> dict[str, Any] | None:
    """Train or resume one run; None when a finished run is reused, else its timing."""
    state, why = run_state(spec)
    if state == "finished":
        return None
    if state != "new":
        say(f"{spec.key}: {why}; " + ("resuming" if state == "partial" else "starting over"))
    say(f"{spec.key}: {spec.display_command()}" + (f"  (output: {spec.run_dir / 'train.log'})" if quiet else ""))
    prepare_run_dir(spec, state)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    log_path = spec.run_dir / "train.log"
    t0 = time.perf_counter()
    with open(log_path, "a") if quiet else open(os.devnull) as log:
        proc = subprocess.Popen(spec.command(), env=env, stdout=log if quiet else None,
                                stderr=subprocess.STDOUT if quiet else None)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"mirai train for {spec.key} exited with code {proc.returncode} "
                           f"(command: {spec.display_command()})" + (f"; end of {log_path}:\n{_tail(log_path)}"
                                                                     if quiet else ""))
    step = final_step(spec.run_dir)
    if step != spec.total_steps:
        raise RuntimeError(f"{spec.run_dir}: mirai train returned but its latest complete checkpoint is at step "
                           f"{step}, not the final step {spec.total_steps}")
    timing = {"seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
              "load_avg": round(os.getloadavg()[0], 2), "threads": threads if device == "cpu" else None,
              "steps": spec.total_steps}
    (spec.run_dir / TIMING_FILE).write_text(json.dumps(timing, indent=2))
    return timing


def run_task(task: Task) -> dict[str, Any]:
    """Train (if needed) and evaluate one run: {"key", "training", "eval", "eval_seconds"}."""
    torch.set_num_threads(task.threads)
    spec = task.spec
    measured = train(spec, task.device, task.threads, task.quiet)
    if measured is None:
        try:
            timing = json.loads((spec.run_dir / TIMING_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            timing = {}
        training = {"reused": True, **timing}
        say(f"{spec.key}: finished run with these settings found; reused")
    else:
        training = {"reused": False, **measured}
        say(f"{spec.key}: trained {spec.total_steps} steps in {measured['seconds']:.0f} s wall, "
            f"{measured['cpu_seconds']:.0f} s CPU")
    t0 = time.perf_counter()
    evaluation = evaluate_run(spec.run_dir, spec.seed, spec.layer, task.evals)
    seconds = round(time.perf_counter() - t0, 2)
    if not evaluation["reused"]:
        say(f"{spec.key}: evaluated in {seconds:.0f} s (final NTP {evaluation['final']['ntp']:.4f})")
    return {"key": spec.key, "training": training, "eval": evaluation, "eval_seconds": seconds}


def run_all(tasks: list[Task], jobs: int) -> dict[str, dict[str, Any]]:
    """Every task, ``jobs`` at a time (in this process when jobs == 1); {run key: result}."""
    if jobs == 1:
        return {t.spec.key: run_task(t) for t in tasks}
    results = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_task, t) for t in tasks]
        try:
            for fut in as_completed(futures):
                res = fut.result()
                results[res["key"]] = res
        except BaseException:
            for fut in futures:                    # do not start the remaining runs; running ones finish
                fut.cancel()
            raise
    return {t.spec.key: results[t.spec.key] for t in tasks}


def train_and_evaluate(plan, inputs: dict[str, Any], evals: EvalSettings, par, device: str,
                       progress: bool) -> dict[str, dict[str, Any]]:
    """Record each run's inputs, then train and evaluate every run of the plan ({run key: result})."""
    for spec in plan.specs:
        spec.inputs = inputs["inputs"][spec.method]
    todo = [s.key for s in plan.specs if run_state(s)[0] != "finished"]
    say(f"{len(todo)} run(s) to train" + (f" ({', '.join(todo)})" if todo else "") +
        f", {len(plan.specs) - len(todo)} reused")
    quiet = par.jobs > 1 or not progress
    tasks = [Task(spec, device, par.threads, quiet, evals) for spec in plan.specs]
    return run_all(tasks, par.jobs)
