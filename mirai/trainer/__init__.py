"""The training machinery behind ``mirai train`` (one file per concern).

    data.py         loader over the memory-mapped code store (sharding, augmentation choice, exact resume)
    distributed.py  launcher env, device, backend (deepspeed / ddp / single), process group, ZeRO-3 shard helpers
    engine.py       TrainModule (GPT + foresight heads), optimizer groups, LR schedule, DeepSpeed / plain engines
    shadow.py       the model EMA and the Mirai-E online teacher, outside the engine, for every ZeRO stage
    step.py         one optimizer step (StepRunner), shared by train.py and benchmarks/bench_step.py
    logging.py      progress bar, metrics.jsonl, TensorBoard, FLOPs / MFU
    synthetic.py    synthetic code stores (tests, configs/debug.yaml, benchmarks)

Checkpoints live in ``mirai.checkpoint``; the config in ``mirai.config``; the CLI in ``mirai.train``.
"""
