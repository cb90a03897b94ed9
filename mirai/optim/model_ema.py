"""``ModelEMA``: fp32 exponential moving average of a model's parameters, kept
outside any training engine, updated by the fused ``mirai.ops.ema_update_``.

    ema = ModelEMA(model, decay=0.9999)          # fp32 shadow copies, names -> tensors
    ema.attach_teacher(teacher)                  # optional: Mirai-E teacher kept equal to the EMA
    for step in ...:
        optimizer.step()
        ema.update(model)                        # one fused call: shadow <- decay*shadow + (1-decay)*param
    ema.copy_to(export_model); torch.save(ema.state_dict(), ...)

Design:
  * ``shadow`` is a plain dict ``name -> float32 tensor`` (contiguous, on the
    parameter's device). It is never a module, so a DeepSpeed engine never casts,
    partitions or optimises it.
  * ``update`` gathers the current parameters by name and makes ONE call of
    ``ema_update_`` over all of them (and the attached teacher's bf16 weights,
    written in that same pass as ``bf16(shadow)``; an fp32 teacher's weights
    share the shadows' storage, so they are the EMA itself).
  * What is averaged is what is handed in: hand the fp32 master weights (a bf16
    module's parameters would be averaged as their bf16 roundings). The trainer
    hands ``Engine.ema_params()``, the fp32 masters under every engine.
  * Decay: constant by default (the paper's 0.9999); warm-up schedules as options
    (``decay_at``). The decay is a Python float computed on the host from the step
    counter: no device sync.
  * Buffers are not averaged. With ``include_buffers=True`` they are copied
    (``shadow_buffers``), keeping their dtype.
  * Sharded masters (ZeRO-1/2/3): pass ``[(name, local fp32 shard), ...]``
    instead of a module; the shadows are then shard-shaped and each rank
    averages its own shard. A teacher needs full tensors, so ``attach_teacher``
    refuses shard-shaped shadows (shape mismatch naming the parameter):
    ``mirai.trainer.ema_state.EMAState`` gathers the shards into the teacher instead.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from mirai.ops.ema_update import ema_update_

__all__ = ["ModelEMA", "WARMUPS"]

#: Decay schedules accepted by ``ModelEMA(warmup=...)``, t = number of updates done before this one.
WARMUPS = {
    "none": "constant decay",
    "tf": "min(decay, (1 + t) / (10 + t))  (TensorFlow ExponentialMovingAverage with num_updates)",
    "power": "min(decay, 1 - (1 + t) ** (-2/3))  (timm ModelEmaV3 warm-up, gamma 1, power 2/3)",
}

NamedTensors = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def _named_params(src: NamedTensors, what: str, detach: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """name -> tensor from a module (its named_parameters), a mapping, or (name, tensor) pairs; detached
    views unless ``detach=False`` (the parameter objects themselves)."""
    if isinstance(src, nn.Module):
        return OrderedDict((n, p.detach() if detach else p) for n, p in src.named_parameters())
    items = src.items() if isinstance(src, Mapping) else src
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"{what}: expected an nn.Module, a mapping or (name, tensor) pairs, got an item "
                            f"{type(item).__name__}")
        name, t = item
        if name in out:
            raise ValueError(f"{what}: duplicate name '{name}'")
        out[name] = t.detach() if detach else t
    return out


class ModelEMA:
    """Exponential moving average of named parameters in fp32, outside any engine.

    Args:
        module_or_named_params: the model (its ``named_parameters()``), a mapping or a list of
            ``(name, tensor)`` pairs (e.g. a rank's flat pieces of partitioned masters).
        decay: target decay tau in [0, 1] (0.9999 in the paper).
        warmup: decay schedule, one of ``WARMUPS`` ("none" = constant ``decay``).
        include_buffers: also keep (copy, not average) the module's buffers; needs a module.
    """

    def __init__(self, module_or_named_params: NamedTensors, decay: float = 0.9999, warmup: str = "none",
                 include_buffers: bool = False) -> None:
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"ModelEMA: decay must be in [0, 1], got {decay}")
        if warmup not in WARMUPS:
            raise ValueError(f"ModelEMA: unknown warmup '{warmup}', choose one of {sorted(WARMUPS)}")
        if include_buffers and not isinstance(module_or_named_params, nn.Module):
            raise TypeError("ModelEMA: include_buffers=True needs an nn.Module (buffers are taken from it)")
        self.decay = float(decay)
        self.warmup = warmup
        self.include_buffers = include_buffers
        #: number of updates done (the ``t`` of the warm-up schedules)
        self.num_updates = 0
        params = _named_params(module_or_named_params, "ModelEMA")
        with torch.no_grad():
            #: name -> fp32 shadow tensor
            self.shadow: OrderedDict[str, torch.Tensor] = OrderedDict(
                (n, p.to(dtype=torch.float32, copy=True).contiguous()) for n, p in params.items())
            #: name -> copied buffer (only with include_buffers)
            self.shadow_buffers: OrderedDict[str, torch.Tensor] = OrderedDict()
            if include_buffers:
                for n, b in module_or_named_params.named_buffers():
                    self.shadow_buffers[n] = b.detach().clone()
        self._names = list(self.shadow)
        self._ema_list = [self.shadow[n] for n in self._names]
        self._teacher: list[torch.Tensor | None] | None = None
        self._teacher_names: dict[str, str] = {}  # model name -> teacher name

    # ------------------------------------------------------------------ decay
    def decay_at(self, step: int) -> float:
        """Decay used by the update that follows ``step`` earlier updates."""
        if step < 0:
            raise ValueError(f"ModelEMA.decay_at: step must be >= 0, got {step}")
        if self.warmup == "tf":
            return min(self.decay, (1.0 + step) / (10.0 + step))
        if self.warmup == "power":
            return min(self.decay, 1.0 - (1.0 + step) ** (-2.0 / 3.0))
        return self.decay

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, module_or_named_params: NamedTensors, step: int | None = None) -> None:
        """One EMA step over all parameters in one fused call (plus the teacher, if attached).

        ``step`` (optional) is the number of updates done before this one; by default the
        internal counter ``num_updates``. Afterwards ``num_updates = step + 1``.
        """
        params = self._matching(module_or_named_params, "ModelEMA.update")
        t = self.num_updates if step is None else int(step)
        decay = self.decay_at(t)
        try:
            ema_update_(self._ema_list, [params[n] for n in self._names], decay, self._teacher)
        except (RuntimeError, ValueError, TypeError) as err:
            raise type(err)(self._annotate(str(err))) from err
        if self.include_buffers:
            if not isinstance(module_or_named_params, nn.Module):
                raise TypeError("ModelEMA.update: include_buffers=True needs the module, not named tensors")
            buffers = dict(module_or_named_params.named_buffers())
            for n, b in self.shadow_buffers.items():
                if n not in buffers:
                    raise KeyError(f"ModelEMA.update: buffer '{n}' is missing from the module")
                b.copy_(buffers[n])
        self.num_updates = t + 1

    def fused_pairs(self, module_or_named_params: NamedTensors) -> list[tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor | None]]:
        """(parameter, fp32 shadow, bf16 teacher tensor or None) per averaged parameter, for an
        optimizer that applies the EMA in its own pass (``mirai.optim.AdamWEMA.attach_ema``).
        The caller then reports each such update with ``mark_updated``."""
        # the parameter objects themselves (the optimizer knows them), not detached views
        params = self._matching(module_or_named_params, "ModelEMA.fused_pairs", detach=False)
        teacher = self._teacher or [None] * len(self._names)
        return [(params[n], self.shadow[n], t) for n, t in zip(self._names, teacher)]

    def _matching(self, src: NamedTensors, what: str, detach: bool = True) -> "OrderedDict[str, torch.Tensor]":
        """``_named_params(src)``, checked to name exactly the parameters that have shadows."""
        params = _named_params(src, what, detach)
        missing = [n for n in self._names if n not in params]
        if missing:
            raise KeyError(f"{what}: parameter '{missing[0]}' has an EMA shadow but is missing from the "
                           f"given parameters ({len(missing)} missing)")
        if len(params) != len(self._names):
            extra = next(n for n in params if n not in self.shadow)
            raise KeyError(f"{what}: parameter '{extra}' has no EMA shadow (it was not there when the "
                           "EMA was created)")
        return params

    def mark_updated(self, step: int) -> None:
        """Book an update applied elsewhere (by a fused optimizer, with ``decay_at(step)``)."""
        if self.include_buffers:
            raise TypeError("ModelEMA.mark_updated: buffers are copied by update(); a fused optimizer "
                            "cannot keep them (include_buffers=True)")
        self.num_updates = int(step) + 1

    def _annotate(self, msg: str) -> str:
        """Add the parameter name to an op error that names a list index (e.g. 'params[3]')."""
        m = re.search(r"\b(?:ema|params|teacher)\[(\d+)\]", msg)
        if m and int(m.group(1)) < len(self._names):
            name = self._names[int(m.group(1))]
            extra = f"; teacher parameter '{self._teacher_names[name]}'" if name in self._teacher_names else ""
            return f"{msg} (index {m.group(1)} is parameter '{name}'{extra})"
        return msg

    # ---------------------------------------------------------------- teacher
    @torch.no_grad()
    def attach_teacher(self, teacher: nn.Module | None, prefix_map: Mapping[str, str] | None = None) -> None:
        """Register a module whose parameters equal the EMA from now on: bf16 parameters are set to
        ``bf16(shadow)`` now and in every ``update`` (same fused pass); fp32 parameters are made to share
        the shadows' storage (no copy ever: the teacher is the EMA).

        Each teacher parameter name is mapped to a model name by ``prefix_map`` (teacher prefix ->
        model prefix, longest matching prefix wins; names without a matching prefix map to
        themselves) and must have a shadow with the same shape on the same device. The teacher may
        cover a subset of the shadows. ``None`` detaches the current teacher (fp32 parameters keep
        sharing the shadows' storage).
        """
        if teacher is None:
            self._teacher, self._teacher_names = None, {}
            return
        prefix_map = dict(prefix_map or {})
        slots: list[torch.Tensor | None] = [None] * len(self._names)
        index = {n: i for i, n in enumerate(self._names)}
        names: dict[str, str] = {}
        shared: list[tuple[nn.Parameter, torch.Tensor]] = []
        for tname, p in teacher.named_parameters():
            keys = [k for k in prefix_map if tname.startswith(k)]
            mname = prefix_map[max(keys, key=len)] + tname[len(max(keys, key=len)):] if keys else tname
            if mname not in index:
                raise KeyError(f"ModelEMA.attach_teacher: teacher parameter '{tname}' maps to '{mname}', "
                               "which has no EMA shadow")
            if p.dtype not in (torch.bfloat16, torch.float32):
                raise TypeError(f"ModelEMA.attach_teacher: teacher parameter '{tname}' must be bfloat16 or "
                                f"float32, got {p.dtype}")
            s = self.shadow[mname]
            if p.shape != s.shape:
                raise ValueError(f"ModelEMA.attach_teacher: teacher parameter '{tname}' has shape {list(p.shape)} "
                                 f"but the EMA of '{mname}' has shape {list(s.shape)} (shard-shaped EMAs of "
                                 "partitioned masters cannot drive a teacher: gather them first)")
            if p.device != s.device:
                raise ValueError(f"ModelEMA.attach_teacher: teacher parameter '{tname}' is on {p.device} but the "
                                 f"EMA of '{mname}' is on {s.device}")
            if not p.is_contiguous():
                raise ValueError(f"ModelEMA.attach_teacher: teacher parameter '{tname}' must be contiguous")
            if mname in names:
                raise ValueError(f"ModelEMA.attach_teacher: two teacher parameters map to '{mname}'")
            if p.dtype == torch.float32:
                shared.append((p, s))
            else:
                slots[index[mname]] = p.detach()
            names[mname] = tname
        for p, s in shared:                      # checked first, changed after: no half-attached teacher
            p.data = s
        self._teacher, self._teacher_names = slots, names
        self._refresh_teacher()

    def _refresh_teacher(self) -> None:
        if self._teacher is not None:
            for t, s in zip(self._teacher, self._ema_list):
                if t is not None:
                    t.copy_(s)

    # ------------------------------------------------------------ export / io
    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Copy the shadows (and copied buffers) into ``module``'s parameters (cast to their dtype)."""
        params = dict(module.named_parameters())
        for n, s in self.shadow.items():
            if n not in params:
                raise KeyError(f"ModelEMA.copy_to: the module has no parameter '{n}'")
            if params[n].shape != s.shape:
                raise ValueError(f"ModelEMA.copy_to: parameter '{n}' has shape {list(params[n].shape)} but its EMA "
                                 f"has shape {list(s.shape)}")
            params[n].copy_(s)
        if self.shadow_buffers:
            buffers = dict(module.named_buffers())
            for n, b in self.shadow_buffers.items():
                if n not in buffers:
                    raise KeyError(f"ModelEMA.copy_to: the module has no buffer '{n}'")
                buffers[n].copy_(b)

    def state_dict(self) -> dict:
        """Plain dict: shadows, copied buffers, the update counter and the schedule settings."""
        return {
            "shadow": OrderedDict((n, t) for n, t in self.shadow.items()),
            "buffers": OrderedDict((n, t) for n, t in self.shadow_buffers.items()),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Load a ``state_dict()`` in place (tensors keep their device; the teacher is refreshed).

        Every shadow (and copied buffer) must be present with the same shape; unknown names are
        refused. The decay and warm-up of this object (from the config) are kept; the update
        counter is restored.
        """
        for key in ("shadow", "num_updates"):
            if key not in state:
                raise KeyError(f"ModelEMA.load_state_dict: the state has no '{key}' entry")
        self._load_group(state["shadow"], self.shadow, "shadow")
        self._load_group(state.get("buffers", {}), self.shadow_buffers, "buffers")
        self.num_updates = int(state["num_updates"])
        self._refresh_teacher()

    @staticmethod
    def _load_group(src: Mapping[str, torch.Tensor], dst: Mapping[str, torch.Tensor], group: str) -> None:
        for n in dst:
            if n not in src:
                raise KeyError(f"ModelEMA.load_state_dict: missing key '{n}' in '{group}'")
        for n, t in src.items():
            if n not in dst:
                raise KeyError(f"ModelEMA.load_state_dict: unexpected key '{n}' in '{group}'")
            if tuple(t.shape) != tuple(dst[n].shape):
                raise ValueError(f"ModelEMA.load_state_dict: key '{n}' in '{group}' has shape {list(t.shape)}, "
                                 f"expected {list(dst[n].shape)}")
        for n, t in src.items():
            dst[n].copy_(t)
