"""``AdamWEMA``: torch.optim.AdamW whose step runs the fused ``mirai.ops.adamw_ema_step_``,
updating the model EMA (and a bf16 teacher copy) in the same pass over memory.

    opt = AdamWEMA(groups, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05)
    opt.attach_ema([(p, ema_fp32[name], teacher_bf16[name] or None) for name, p in ...])
    for step in ...:
        loss.backward()
        opt.grad_scale = clip_factor        # optional device tensor: grads are divided by it
        opt.ema_decay = ema.decay_at(t)     # optional: this step also updates the attached EMAs
        opt.step()                          # ema_decay is reset to None afterwards

Design:
  * Same constructor options as torch.optim.AdamW (lr, betas, eps, weight_decay); amsgrad,
    maximize, foreach, fused, capturable and differentiable are refused (ValueError naming the
    option): the step is always the fused op.
  * Same ``state_dict`` as torch.optim.AdamW (per param ``step`` as a CPU float32 0-dim tensor,
    ``exp_avg``, ``exp_avg_sq``; the param groups keep torch's keys with foreach/fused None),
    so checkpoints load both ways. Loading a fused/capturable torch state moves ``step`` back
    to the CPU.
  * ``step()`` makes one fused call per (param group, device, step count): params of one group
    normally share their step count, so that is one call per group. Params must be float32;
    grads float32 or bfloat16. ``grad_scale`` (attribute, None or a one-element float32 tensor
    on the params' device, the name torch's fused AdamW reads) divides every gradient inside
    the kernel without writing it back; no ``found_inf`` is used.
  * EMA: ``attach_ema(pairs)`` registers (param, fp32 ema, bf16 teacher or None) triples. When
    ``ema_decay`` is set, every attached param's EMA is updated with the new param: in the fused
    pass for params stepped now, through ``mirai.ops.ema_update_`` (one call) for attached params
    without a grad this step, exactly as a separate EMA pass over all params would. Params that
    are not attached get no EMA.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from mirai.ops.adamw import adamw_ema_step_
from mirai.ops.ema import ema_update_

__all__ = ["AdamWEMA"]

_REFUSED = ("amsgrad", "maximize", "foreach", "fused", "capturable", "differentiable")


def _check_options(options: dict, where: str) -> None:
    for name in _REFUSED:
        if options.get(name):
            raise ValueError(f"AdamWEMA{where}: {name}=True is not supported (the step is always the fused "
                             "mirai.ops.adamw_ema_step_)")


class AdamWEMA(torch.optim.AdamW):
    """AdamW (decoupled weight decay) stepped by the fused AdamW + EMA op; see the module docstring."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None) -> None:
        _check_options(dict(amsgrad=amsgrad, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
                            differentiable=differentiable), "")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        #: decay of the EMA update made by the next ``step()``; None = no EMA update. Reset after each step.
        self.ema_decay: float | None = None
        #: divides every gradient in the kernel when set (None or a one-element float32 device tensor)
        self.grad_scale: torch.Tensor | None = None
        self._ema: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # ------------------------------------------------------------------- EMA
    def attach_ema(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
        """Register ``(param, ema, teacher)`` triples (ema float32, teacher bfloat16 or None, both shaped like
        the param and on its device), replacing earlier ones for the same params."""
        known = {p for group in self.param_groups for p in group["params"]}
        for i, (p, ema, teacher) in enumerate(pairs):
            if p not in known:
                raise ValueError(f"AdamWEMA.attach_ema: pair {i}: the param is not in any param group")
            for name, t, dtype in (("ema", ema, torch.float32), ("teacher", teacher, torch.bfloat16)):
                if t is None and name == "teacher":
                    continue
                if t.dtype != dtype or t.shape != p.shape or t.device != p.device or not t.is_contiguous():
                    raise ValueError(f"AdamWEMA.attach_ema: pair {i}: {name} must be a contiguous {dtype} tensor of "
                                     f"shape {list(p.shape)} on {p.device}, got {t.dtype} {list(t.shape)} on "
                                     f"{t.device}")
            self._ema[p] = (ema.detach(), None if teacher is None else teacher.detach())

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decay = self.ema_decay
        ema = self._ema if decay is not None else {}
        stepped: set[torch.Tensor] = set()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWEMA does not support sparse gradients")
                state = self.state[p]
                if not state:  # lazy init, exactly as torch.optim.AdamW (foreach / single-tensor) does
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps = [self.state[p]["step"] for p in params]
            if steps:
                torch._foreach_add_(steps, 1.0)  # CPU tensors: no device work, no sync
            buckets: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
            for p, step in zip(params, steps):
                buckets.setdefault((p.device, int(step.item())), []).append(p)
            for (_, step), ps in buckets.items():
                pairs = [ema.get(p, (None, None)) for p in ps]
                has_ema = any(e is not None for e, _ in pairs)
                adamw_ema_step_(
                    ps, [p.grad for p in ps], [self.state[p]["exp_avg"] for p in ps],
                    [self.state[p]["exp_avg_sq"] for p in ps], lr=float(group["lr"]), betas=group["betas"],
                    eps=group["eps"], weight_decay=group["weight_decay"], step=step, grad_scale=self.grad_scale,
                    ema=[e for e, _ in pairs] if has_ema else None, ema_decay=decay if has_ema else None,
                    teacher=[t for _, t in pairs] if any(t is not None for _, t in pairs) else None)
                stepped.update(ps)
        rest = [(p, e, t) for p, (e, t) in ema.items() if p not in stepped]
        if rest:  # attached params without a grad this step: EMA of their unchanged value
            teachers = [t for _, _, t in rest]
            ema_update_([e for _, e, _ in rest], [p.detach() for p, _, _ in rest], decay,
                        teachers if any(t is not None for t in teachers) else None)
        self.ema_decay = None
        return loss

    # ------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.AdamW's loader; then the options are checked and ``step`` kept as a CPU float32 tensor
        (a fused or capturable torch AdamW saves it on the device)."""
        for group in state_dict["param_groups"]:
            _check_options({k: group.get(k) for k in ("amsgrad", "maximize", "differentiable")}, ".load_state_dict")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(foreach=None, fused=None, capturable=False)
        for state in self.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().to(device="cpu", dtype=torch.float32)
