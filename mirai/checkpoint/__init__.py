"""Checkpoints: what a run saves, what it resumes from, what sampling and export read.

    run.py       a run's checkpoints/ folder: layout, ``latest``, meta.json, verification, pruning
    training.py  save a training checkpoint, pick the one to resume from (falling back past ones that do
                 not verify), restore it
    weights.py   weights for sampling from run folders, exports and LlamaGen / Mirai-Code files;
                 ``load_gpt``, ``export``

Every file is read and written through ``mirai.io.torch_files`` (weights-only loading that refuses other
types and allow-lists exactly a known format's extra type; atomic writes hashed on the way; disk-full
errors) and state dicts are checked with ``mirai.io.state_dicts``.

The run folder, what is guaranteed and what is not: docs/run-folder.md. Every problem raises
``CheckpointError`` (or a subclass) naming the file and the problem.
"""
from mirai.checkpoint.run import (FORMAT, LATEST, begin_save, check_stored_step, checkpoints_dir, finish_save,
                                  finite_weights, latest_target, list_checkpoints, prune, rank_file, read_latest,
                                  read_meta, resolve, step_dir, verify, verify_content, write_latest)
from mirai.checkpoint.training import (check_compatible, load_rank_state, load_training_checkpoint,
                                       model_config_dict, resume_checkpoint, rng_state, save_rank_state,
                                       save_training_checkpoint, set_rng_state, store_fingerprint)
from mirai.checkpoint.weights import EXPORT_FORMAT, build_model, export, load_gpt, read_weights
from mirai.io.torch_files import CheckpointError, DiskFullError, FileLoadError, UnsafeFileError

__all__ = [
    "CheckpointError", "DiskFullError", "FileLoadError", "UnsafeFileError",
    "FORMAT", "LATEST", "begin_save", "check_stored_step", "checkpoints_dir", "finish_save", "finite_weights",
    "latest_target", "list_checkpoints", "prune", "rank_file", "read_latest", "read_meta", "resolve", "step_dir",
    "verify", "verify_content", "write_latest",
    "check_compatible", "load_rank_state", "load_training_checkpoint", "model_config_dict", "resume_checkpoint",
    "rng_state", "save_rank_state", "save_training_checkpoint", "set_rng_state", "store_fingerprint",
    "EXPORT_FORMAT", "build_model", "export", "load_gpt", "read_weights",
]
