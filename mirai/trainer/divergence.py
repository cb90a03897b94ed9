"""Divergence stop: no checkpoint is ever written from a non-finite state, and an optional loss-spike stop.

* Every step, on the device (no host read): ``LossMeter.end_step`` keeps the first step whose loss or
  gradient norm was Inf or NaN (``mirai.trainer.logging``).
* Log steps (``DivergenceGuard.check_log``): that step is read (one small all-reduce, MIN over ranks),
  then the spike stop compares the logged NTP loss with its reference.
* Before every checkpoint (``check_checkpoint``): the same read, after one max-abs pass over the weights
  (this rank's pieces where the engine partitions them) and the EMA has folded non-finite weights in (a corrupted optimizer
  state can make them Inf / NaN with a still finite loss).

Any of these raises ``Diverged`` (exit code 4) naming the first bad step, the last step checked finite,
and the last good checkpoint; nothing is saved from that state, so ``latest`` keeps naming a finite
checkpoint. Every rank takes the same decision (the values compared are all-reduced).

Loss-spike stop (``train.loss_spike_factor``, off by default): on a log step, stop when the logged
NTP loss exceeds factor x the reference, the lowest of ln(vocab_size) (the loss of a uniform guess,
so a blow-up before the first log line is caught too) and every NTP loss logged since this process
started (after a resume the reference starts again from ln(vocab_size)). The NTP loss is compared,
not the total, which jumps when a foresight warm-up ends or a lambda schedule switches.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from mirai.trainer.stop import Diverged


@torch.no_grad()
def nonfinite_weights(engine, ema_state) -> torch.Tensor:
    """Device bool: an Inf or NaN in this rank's parameters (``Engine.local_params``: its pieces where the
    engine partitions them) or EMA shadows."""
    params = engine.local_params()
    shadows = list(ema_state.shadow.values()) if ema_state is not None else []
    held = [t.detach() for t in params + shadows if t.numel()]          # a rank's piece may be empty
    if not held:
        return torch.zeros((), dtype=torch.bool, device=engine.device)
    return ~torch.isfinite(torch.nn.utils.get_total_norm(held, norm_type=math.inf))


class DivergenceGuard:
    """The log-step and pre-checkpoint checks of one run (see the module docstring)."""

    def __init__(self, meter, engine, ema_state, spike_factor: float | None, vocab_size: int, start_step: int,
                 last_checkpoint: Path | None):
        self.meter = meter
        self.engine = engine
        self.ema_state = ema_state
        self.spike_factor = spike_factor
        self.reference = math.log(vocab_size)       # of the spike stop: lowest NTP loss so far, at most ln V
        self.checked = start_step                   # every step up to this one was checked finite
        self.last_checkpoint = last_checkpoint      # the newest checkpoint known good (resumed or written)

    def check_log(self, step: int, ntp_loss: float) -> None:
        """On log step `step` (collective), after its record is written."""
        bad = self.meter.first_bad_step()
        if bad is not None:
            raise self._diverged(f"the loss or gradient norm became non-finite at step {bad}", step)
        if self.spike_factor is not None and ntp_loss > self.spike_factor * self.reference:
            raise self._diverged(f"loss spike: the NTP loss {ntp_loss:.4g} logged at step {step} exceeds "
                                 f"train.loss_spike_factor {self.spike_factor:g} x {self.reference:.4g} (the lowest "
                                 "of ln(vocab_size) and every NTP loss logged before)", step)
        self.reference = min(self.reference, ntp_loss)
        self.checked = step

    def check_checkpoint(self, step: int) -> None:
        """Before the checkpoint of step `step` is written (collective)."""
        self.meter.mark_bad(step, nonfinite_weights(self.engine, self.ema_state))
        bad = self.meter.first_bad_step()
        if bad is not None:
            raise self._diverged(f"the loss, gradient norm or weights became non-finite at step {bad}", step)
        self.checked = step

    def _diverged(self, what: str, step: int) -> Diverged:
        if self.last_checkpoint is not None:
            good = (f"the last good checkpoint is {self.last_checkpoint}; lower optim.lr (or add optim.warmup_steps) "
                    "and run again: with train.resume=auto it continues from there")
        else:
            good = "this run has no checkpoint yet; lower optim.lr (or add optim.warmup_steps) and run again"
        return Diverged(f"training diverged: {what} (found at the check after step {step}; steps up to "
                        f"{self.checked} were checked finite). Nothing was saved from this state; {good}")
