"""Files, at the bottom of the package (nothing here imports another part of mirai).

    torch_files.py   one torch file: weights-only loading (refuses other types, allow-lists exactly a known
                     format's extra type), atomic writes hashed on the way, disk-full errors
    state_dicts.py   state dicts from any file: wrapper prefixes, NaN / Inf entries, strict loading
    npz.py           image batches as .npz (uint8 [N, H, W, 3], the ADM evaluator's format), streamed in
                     both directions without holding the batch in memory
"""
