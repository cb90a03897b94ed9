"""The training machinery behind ``mirai train`` (one file per concern).

    run.py          build_run (model, objective, teacher source, engine, EMA, loader, step runner) and train (the
                    step loop with logging, stops and checkpoints)
    distributed.py  launcher env, device, backend (deepspeed / ddp / single), process group
    memory.py       per-rank memory estimate and the engine train.backend=auto picks from it
    engine.py       TrainModule (GPT + foresight heads), optimizer groups, LR schedule, DeepSpeed / plain engines
    shards.py       sharded fp32 masters (ZeRO) and their reassembly into full tensors
    ema_state.py    the model EMA and the Mirai-E online teacher, outside the engine, for every ZeRO stage
    step.py         one optimizer step (StepRunner), shared by run.py and benchmarks/bench_step.py
    logging.py      progress bar, metrics.jsonl, TensorBoard, FLOPs / MFU, the device-side loss meter
    divergence.py   the non-finite / loss-spike stop
    stop.py         stop requests (signals, launcher gone), the all-rank stop agreement, exit codes
    runlock.py      one trainer per run folder

The data loader is ``mirai.data.loader``; checkpoints live in ``mirai.checkpoint``; the config in
``mirai.config``; the command in ``mirai.commands.train``. The path of one step: docs/architecture.md.
"""
