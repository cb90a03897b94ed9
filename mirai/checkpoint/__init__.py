"""Checkpoints: what a run saves, what it resumes from, what sampling and export read.

    files.py     one file: weights-only loading (refuses other types, allow-lists exactly a known
                 format's extra type), atomic writes hashed on the way, disk-full errors
    run.py       a run's checkpoints/ folder: layout, ``latest``, meta.json, verification, pruning
    training.py  save a training checkpoint, pick the one to resume from (falling back past ones that do
                 not verify), restore it
    weights.py   weights for sampling from run folders, exports and LlamaGen / Mirai-Code files;
                 ``load_gpt``, ``export``

The run folder, what is guaranteed and what is not: docs/run-folder.md. Every problem raises
``CheckpointError`` (or a subclass) naming the file and the problem.
"""
from mirai.checkpoint.files import (LLAMAGEN_TYPES, CheckpointError, DiskFullError, FileLoadError, UnsafeFileError,
                                    file_digest, load_file, save_file, state_nbytes)
from mirai.checkpoint.run import (FORMAT, LATEST, begin_save, check_stored_step, checkpoints_dir, finish_save,
                                  finite_weights, latest_target, list_checkpoints, prune, rank_file, read_latest,
                                  read_meta, resolve, step_dir, verify, verify_content, write_latest)
from mirai.checkpoint.training import (check_compatible, load_rank_state, load_training_checkpoint,
                                       model_config_dict, resume_checkpoint, rng_state, save_rank_state,
                                       save_training_checkpoint, set_rng_state, store_fingerprint)
from mirai.checkpoint.weights import (EXPORT_FORMAT, build_model, check_finite, export, first_nonfinite, load_gpt,
                                      load_state, read_weights, state_dict_mismatch, strip_prefixes)

__all__ = [
    "LLAMAGEN_TYPES", "CheckpointError", "DiskFullError", "FileLoadError", "UnsafeFileError", "file_digest",
    "load_file", "save_file", "state_nbytes",
    "FORMAT", "LATEST", "begin_save", "check_stored_step", "checkpoints_dir", "finish_save", "finite_weights",
    "latest_target", "list_checkpoints", "prune", "rank_file", "read_latest", "read_meta", "resolve", "step_dir",
    "verify", "verify_content", "write_latest",
    "check_compatible", "load_rank_state", "load_training_checkpoint", "model_config_dict", "resume_checkpoint",
    "rng_state", "save_rank_state", "save_training_checkpoint", "set_rng_state", "store_fingerprint",
    "EXPORT_FORMAT", "build_model", "check_finite", "export", "first_nonfinite", "load_gpt", "load_state",
    "read_weights", "state_dict_mismatch", "strip_prefixes",
]
