"""``mirai train``: train a LlamaGen GPT, with or without Mirai.

    mirai train --config configs/gpt-b_mirai_e.yaml [--set key=value ...]
    torchrun --nproc_per_node 8 -m mirai train --config configs/gpt-b_mirai_e.yaml
    deepspeed --num_gpus 8 --module mirai train --config configs/gpt-xxl_mirai_e.yaml --set train.zero_stage=2

One process per GPU (or one CPU process); rank and world size come from the launcher's environment
(``--local_rank``, which the deepspeed launcher passes, is accepted and ignored: the environment's
LOCAL_RANK wins). The config is validated before anything is built; errors name the field. What a run
builds and does: ``mirai.trainer.run``; the exit codes: ``mirai.trainer.stop``.
"""
from __future__ import annotations

import argparse
import sys

from mirai.commands import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirai train", formatter_class=HelpFormatter,
                                description="Train a LlamaGen GPT with or without Mirai foresight alignment (single "
                                            "process, torchrun or the deepspeed launcher).")
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml); may name a parent with "
                                                    "'base: other.yaml'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                   help="override a config field, e.g. --set train.micro_batch=16 optim.lr=2e-4 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--check", action="store_true", help="validate the config (and data) and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """The command; its exit codes are listed in mirai/trainer/stop.py."""
    args = build_parser().parse_args(argv)
    overrides = [item for group in args.overrides for item in group]
    from mirai.config import ConfigError, load_config, validate
    from mirai.launcher import launcher_env
    from mirai.trainer.distributed import teardown
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            import yaml
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        rank, world, _ = launcher_env()
        validate(cfg, world_size=world, scan_features=args.check)     # --check: every stored feature too
    except ConfigError as err:
        print(f"mirai train: config error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(f"mirai train: {args.config} is valid ({cfg.name} -> {cfg.run_dir})")
        return 0
    from mirai.checkpoint import CheckpointError
    from mirai.data.format import CodeStoreError
    from mirai.trainer.run import train
    from mirai.trainer.stop import EXIT_INTERRUPTED, CollectiveFailed, Diverged, RunStop, Stopped
    code, agreed = 0, False             # agreed: every rank ends here together (a final barrier is safe)
    try:
        train(cfg)
        agreed = True
    except CheckpointError as err:
        print(f"mirai train: checkpoint error: {err}", file=sys.stderr)
        code = 3
    except CodeStoreError as err:                   # a batch the loader refused (NaN / Inf features)
        print(f"mirai train: data error: {err}", file=sys.stderr)
        code = 2
    except RunStop as stop:
        if rank == 0 or isinstance(stop, CollectiveFailed):    # the others print the same words
            print(f"mirai train: {stop}", file=sys.stderr)
        code, agreed = stop.exit_code, isinstance(stop, (Stopped, Diverged))
    except KeyboardInterrupt:
        print("\nmirai train: interrupted: quit at once without a checkpoint of this step; the last checkpoint "
              "is intact, resume with the same command", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        teardown(barrier=agreed)
    return code
