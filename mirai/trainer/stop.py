"""How a training run ends short of its last step, and the exit code of each way.

Exit codes of ``mirai train`` / ``python -m mirai train``:

====  ==========================================================================================
0     finished (the final checkpoint is written)
2     config or data error, before any training step (or a batch the loader refused: NaN / Inf
      features), naming the field or the file and the first bad index
3     checkpoint error (missing, truncated, incompatible)
4     diverged (``Diverged``): a non-finite loss, gradient norm or weight, or the loss-spike stop;
      nothing is saved from that state; the message names the first bad step and the last good
      checkpoint (``mirai.trainer.divergence``)
5     the run folder is held by another trainer (``mirai.trainer.runlock.RunLocked``)
6     a collective failed (``CollectiveFailed``): another rank hung past ``train.collective_timeout_s``
      or died; the message names the collective
75    stopped on request (``Stopped``) after writing a checkpoint: SIGTERM, SIGINT, or the launcher
      of this rank died; resume with the same command (EX_TEMPFAIL)
130   a second Ctrl-C: quit at once without a checkpoint of the current step
====  ==========================================================================================

Stop requests, every step and without touching the device:

* ``StopSignals``: SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) only set a flag; the step
  in progress finishes, a checkpoint is written, the run exits with 75. A second SIGINT raises
  KeyboardInterrupt at once (exit 130; the previous checkpoint is intact).
* ``LauncherWatch``: under a launcher (``LOCAL_RANK`` set: torchrun, the deepspeed launcher) a rank
  whose parent process has gone (``os.getppid()`` changed: re-parented) asks to stop the same way,
  so ranks never train on as orphans.
* ``StopAgreement``: the signal may reach only some ranks, so every rank must learn of it at the same
  step. One process: at once. Several: after every step each rank starts a non-blocking all-reduce
  (MAX) of two ints over a gloo group on the CPU and reads the previous step's result, so all ranks
  stop after the same step, one step after the request, and the host never waits for the device.
* ``naming_collective(what)``: a collective that fails inside the block (gloo's "Timed out waiting
  ... for recv", a peer's closed connection, NCCL's errors) becomes ``CollectiveFailed`` naming `what`.
  NCCL's own watchdog may instead end the process itself on a timeout; its message names the
  operation (``OpType=ALLREDUCE``).
"""
from __future__ import annotations

import os
import re
import signal
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist

from mirai.launcher import under_launcher

EXIT_DIVERGED = 4
EXIT_LOCKED = 5
EXIT_COLLECTIVE = 6
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130


class RunStop(Exception):
    """The run ended early for a reason it can name; ``mirai.commands.train.main`` prints it and exits with ``exit_code``."""

    exit_code = 1


class Diverged(RunStop):
    exit_code = EXIT_DIVERGED


class Stopped(RunStop):
    exit_code = EXIT_STOPPED


class CollectiveFailed(RunStop):
    exit_code = EXIT_COLLECTIVE


class StopSignals:
    """SIGTERM / SIGINT handlers for the step loop (a context manager; see the module docstring). Installs
    nothing outside the main thread."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.received: str | None = None       # name of the first signal
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = name
            # os.write: print() could re-enter a buffered write the signal interrupted
            os.write(2, f"\nmirai train: rank {self.rank}: {name} received: finishing this step, then writing a "
                        "checkpoint (Ctrl-C again quits at once without one)\n".encode())


class LauncherWatch:
    """True from ``gone()`` once the launcher that started this rank has exited (see the module docstring)."""

    def __init__(self):
        parent = os.getppid()
        self.parent = parent if under_launcher() and parent > 1 else None

    def gone(self) -> bool:
        return self.parent is not None and os.getppid() != self.parent


class StopAgreement:
    """Every rank stops after the same step (see the module docstring). `group`: a gloo process group over all
    ranks, or None for a single process."""

    def __init__(self, group=None):
        self.group = group
        self._flags: torch.Tensor | None = None     # [signal number, launcher gone] of the last step, all ranks
        self._work = None

    def poll(self, signal_name: str | None, launcher_gone: bool) -> str | None:
        """Called by every rank after every step; the reason to stop now, the same on every rank, or None."""
        if self.group is None:
            if signal_name is not None:
                return signal_name
            return "the launcher of this rank exited" if launcher_gone else None
        reason = None
        if self._work is not None:
            self._work.wait()
            signum, orphan = (int(v) for v in self._flags)       # a CPU tensor: no device involved
            if signum:
                reason = f"{signal.Signals(signum).name} (on at least one rank)"
            elif orphan:
                reason = "the launcher of at least one rank exited"
        self._work = None
        if reason is None:
            signum = int(getattr(signal, signal_name)) if signal_name else 0
            self._flags = torch.tensor([signum, int(launcher_gone)], dtype=torch.int64)
            self._work = dist.all_reduce(self._flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return reason

    def close(self) -> None:
        """Wait for the last all-reduce (every rank has one in flight after its last step)."""
        if self._work is not None:
            self._work.wait()
            self._work = None


_FAILED_COLLECTIVE = re.compile(r"timed out|timeout|connection (reset|closed|refused)|broken pipe|nccl|gloo|"
                                r"socket|peer", re.IGNORECASE)


@contextmanager
def naming_collective(what: str, timeout_s: float):
    """Turn a collective failing inside the block into ``CollectiveFailed`` naming `what` (see the module
    docstring); other errors pass through."""
    try:
        yield
    except RuntimeError as err:          # torch.distributed.DistError is one too
        if not (dist.is_available() and dist.is_initialized() and _FAILED_COLLECTIVE.search(str(err))):
            raise
        detail = " ".join(str(err).split())[:400]
        raise CollectiveFailed(f"rank {dist.get_rank()}: {what} failed: another rank did not answer within "
                               f"train.collective_timeout_s = {timeout_s:g} s (hung) or died ({detail}). See the other "
                               "ranks' logs; the last checkpoint is intact, resume with the same command once the "
                               "cause is fixed") from None
