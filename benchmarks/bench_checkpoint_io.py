"""Cost of checkpoint integrity: hashing a file while torch.save writes it vs reading it back, and the
throughput of candidate hash functions (CPU time, so other processes' load does not count).

    python benchmarks/bench_checkpoint_io.py --mib 1024 --repeats 3

Per repeat, on a state dict of ``--mib`` MiB of fp32 tensors written into ``--dir``:
  torch.save                        torch.save(state, path) alone (the old writer)
  torch.save + fsync                the same made durable (fsync's write-back is charged to this process)
  save_file                         mirai.io.torch_files.save_file: torch.save through HashingWriter, fsync, rename
  torch.save + fsync + file_digest  hashing after writing instead: SHA-256 of the file read back
  file_digest                       the verification pass alone (file in the page cache)
and the in-memory throughput of sha256, sha1, blake2b, md5 and zlib.crc32 over the same bytes. Prints
the least user CPU seconds of this process (the run least disturbed by other processes), the median system
CPU seconds (page-cache and write-back work, which other processes' I/O inflates) and the median wall
seconds; validates that the writer's digest equals the
read-back digest first. Results are appended to benchmarks/results/checkpoint_io.jsonl (--results-dir
elsewhere, --no-save nowhere).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import append_jsonl, env_record, print_table  # noqa: E402

from mirai.io.torch_files import file_digest, save_file  # noqa: E402


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn) -> tuple[float, float, float]:
    """(user CPU seconds, system CPU seconds, wall seconds) of one call in this process."""
    a, w = os.times(), time.perf_counter()
    fn()
    b = os.times()
    return b.user - a.user, b.system - a.system, time.perf_counter() - w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=512, help="state size in MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the file is written (default: a temporary folder)")
    p.add_argument("--results-dir", default=None, help="where checkpoint_io.jsonl goes (default: benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="do not append the results anywhere")
    args = p.parse_args(argv)
    n = args.mib * 2 ** 20 // 4 // 2 ** 20                           # tensors of 1 Mi fp32 values
    state = {f"w{i}": torch.randn(2 ** 20) for i in range(max(n, 1))}
    nbytes = sum(t.numel() * 4 for t in state.values())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "state.pt"
        record = save_file(state, path)                               # validate before timing
        if record["sha256"] != file_digest(path) or record["bytes"] != path.stat().st_size:
            print("bench_checkpoint_io: the writer's digest differs from the file's", file=sys.stderr)
            return 1
        new = Path(tmp) / "new.pt"                                    # a checkpoint is always a new file
        cases = {
            "torch.save": lambda: torch.save(state, new),
            "torch.save + fsync": lambda: (torch.save(state, new), fsync(new)),
            "save_file": lambda: save_file(state, new),
            "torch.save + fsync + file_digest": lambda: (torch.save(state, new), fsync(new), file_digest(new)),
            "file_digest": lambda: file_digest(path),
        }
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
        for _ in range(args.repeats):                                 # interleaved: load changes hit all alike
            for name, fn in cases.items():
                runs[name].append(timed(fn))
                new.unlink(missing_ok=True)                           # (not timed)
        rows = []
        for name, r in runs.items():
            user = min(x[0] for x in r)
            rows.append({"case": name, "user_s": round(user, 3), "sys_s": round(statistics.median(x[1] for x in r), 3),
                         "wall_s": round(statistics.median(x[2] for x in r), 3),
                         "user_gb_s": round(nbytes / user / 1e9, 2) if user > 0 else None})
    data = memoryview(b"".join(t.numpy().tobytes() for t in list(state.values())[:64]))
    for name in ("sha256", "sha1", "blake2b", "md5", "crc32"):
        def run(name=name):
            if name == "crc32":
                zlib.crc32(data)
            else:
                hashlib.new(name, data).digest()
        user = min(timed(run)[0] for _ in range(args.repeats))
        rows.append({"case": f"{name} in memory", "user_s": round(user, 3), "sys_s": None, "wall_s": None,
                     "user_gb_s": round(data.nbytes / user / 1e9, 2) if user > 0 else None})
    print(f"state {nbytes / 2 ** 30:.2f} GiB of {args.repeats} repeats: user_s the least (user_gb_s from it), "
          "sys_s and wall_s the median")
    print_table(rows, ["case", "user_s", "sys_s", "wall_s", "user_gb_s"])
    if not args.no_save:
        append_jsonl("checkpoint_io", [{**env_record("cpu"), "bytes": nbytes, **row} for row in rows],
                     Path(args.results_dir) if args.results_dir else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
