"""The trained module and the engines that run it: DeepSpeed (ZeRO 0..3), torch DDP, single process.

``TrainModule`` is the ONLY module an engine wraps: the GPT plus the ``ForesightObjective`` (heads).
Its forward takes a batch of codes and labels, the teacher targets computed outside (no grad, in
``foresight.target_dtype``; None for the baseline, during warm-up, and for the output-injection ablation) and
the per-head coefficients (host floats while they are all zero, else a [K] fp32 device tensor), and returns three tensors:
``loss`` (NTP + sum_k lambda_k L_k, the one that is back-propagated), ``ntp`` and ``per_head [K]``
(both detached, for logging). The EMA, the Mirai-E teacher and the frozen encoder are NOT in it.

Engines share one interface (``Engine``): ``micro_step(...)`` once per micro-batch (forward and backward
inside one context, then the optimizer step at the gradient-accumulation boundary), ``set_lr``,
``grad_norm()`` (host value; log steps only), ``grad_norm_held()`` (the same, as held: no host read),
``save(dir)`` / ``load(dir)`` of the engine state
(``save`` returns {file: {"bytes", "sha256"}} of what this rank wrote; every file goes through
``mirai.io.torch_files.save_file`` / ``load_file``, DeepSpeed's own too: see ``CheckpointIO``),
``full_state_dicts()`` (fp32 master weights of the GPT and the heads, consolidated on rank 0;
collective), ``ema_params()`` (what the EMA averages: the GPT's fp32 master weights under every engine,
as the released code and LlamaGen average fp32 weights, never the bf16 module parameters DeepSpeed
computes with), ``ema_shards()`` (None where ``ema_params()`` are whole tensors on every rank;
under ZeRO-1/2/3 the masters are sharded, each rank handing its own pieces, see ``mirai.trainer.shards``)
and ``gather_full`` (whole tensors from those pieces), ``local_params()`` (this rank's pieces of the
parameters), ``gpt_param_count()`` and ``register_external_params(module)`` (parameters a module's forward
reads without calling their owners). Partitioned parameters (ZeRO-3) are known to this module only: every
other module asks the engine through these methods.

Optimizer: one client optimizer built here so DeepSpeed builds no op: apex ``FusedAdam`` (AdamW mode)
when importable on CUDA, else ``torch.optim.AdamW`` with ``fused=True`` on CUDA / ``foreach=True`` on
CPU; with ``optim.fuse_ema`` (plain engine) ``mirai.optim.AdamWEMA``, which also applies the model EMA
(``EMAState`` attaches it) and the gradient clip in its one pass. Two parameter groups: weight decay on
parameters with >= 2 dimensions (matrices, embeddings, stacked head weights), none on norms and biases
(the heads' stacked biases included: ``param_groups``). The learning rate is set by the trainer every step.

DeepSpeed config (built from the dataclass, see ``deepspeed_config``): train_batch_size,
train_micro_batch_size_per_gpu, gradient_accumulation_steps, gradient_clipping, bf16.enabled,
zero_optimization.stage (+ overlap/bucket settings), zero_allow_untested_optimizer (a client
torch optimizer under ZeRO), steps_per_print effectively off. Under ZeRO-1/2 the gradient norm and the
clip are this module's (``DeepSpeedEngine``), not DeepSpeed's: see ``deepspeed_config``.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from mirai.models.compile import compile_in_scope
from mirai.io.torch_files import CheckpointError, load_file, save_file
from mirai.trainer.distributed import Runtime
from mirai.trainer.shards import Shard, gather_full

DDP_BUCKET_MB = 500                  # DDP all-reduce bucket (torch's default: 25 MB); see PlainEngine
ZERO_REDUCE_BUCKET = int(5e8)        # elements: ZeRO-1/2 gradient reduction bucket, ZeRO all-gather bucket
ZERO3_PREFETCH_BUCKET = int(5e7)     # elements: ZeRO-3 parameter prefetch
ZERO3_PERSISTENCE = int(1e5)         # elements: ZeRO-3 keeps smaller parameters whole on every rank


# --------------------------------------------------------------------------- the trained module
class TrainModule(nn.Module):
    """GPT + foresight objective; see the module docstring for the forward contract."""

    def __init__(self, gpt: nn.Module, objective: nn.Module | None = None, fused_ce: bool = True):
        super().__init__()
        self.gpt = gpt
        self.objective = objective
        self.fused_ce = bool(fused_ce)      # train.fused_ce: loss via the chunked linear + CE (no logits)

    @property
    def k(self) -> int:
        return int(self.objective.k) if self.objective is not None else 0

    def forward(self, codes: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None,
                coeffs: Sequence[float] | torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes int64 [B, T], labels int64 [B], teacher [B, S, C] or None, coeffs K floats or [K] tensor."""
        idx, targets = self.gpt.prepare_inputs(codes)                           # [B, T-1], [B, T]
        obj = self.objective
        hidden_layers = obj.hidden_layers if obj is not None else ()
        out = self.gpt(idx, labels, targets=targets, hidden_layers=hidden_layers, return_logits=not self.fused_ce)
        ntp = out.loss                                                          # fp32 scalar
        if obj is None:
            return ntp, ntp.detach(), ntp.new_zeros(0)
        total, per_head = obj(obj.select_hidden(out), teacher, coeffs, tokens=targets)
        return ntp + total, ntp.detach(), per_head.detach()


# --------------------------------------------------------------------------- optimizer
def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on >= 2-D parameters (LlamaGen / nanoGPT rule), except those a submodule lists in its
    ``no_weight_decay_params()`` (the foresight heads' stacked [K, H] biases: biases, though 2-D)."""
    exempt = {id(p) for m in module.modules() if hasattr(m, "no_weight_decay_params")
              for p in m.no_weight_decay_params()}
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in exempt else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, optim_cfg, lr: float, device: torch.device,
                    fuse_ema: bool = False) -> torch.optim.Optimizer:
    """The client AdamW (see the module docstring for which implementation)."""
    groups = param_groups(module, optim_cfg.weight_decay)
    kw = dict(lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    if fuse_ema:
        from mirai.optim.adamw_ema import AdamWEMA
        return AdamWEMA(groups, **kw)
    if optim_cfg.fused and device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
            return FusedAdam(groups, adam_w_mode=True, **kw)
        except ImportError:
            return torch.optim.AdamW(groups, fused=True, **kw)
    return torch.optim.AdamW(groups, foreach=True, **kw)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` that keeps this optimizer's implementation options: torch's loader takes
    ``fused`` / ``foreach`` / ``capturable`` from the saved groups, so a state saved by another implementation
    (``optim.fuse_ema`` switched, apex or torch fused) would otherwise change how this one steps."""
    own = {k: optimizer.defaults[k] for k in ("fused", "foreach", "capturable") if k in optimizer.defaults}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(own)
        if group.get("fused") or group.get("capturable"):   # torch's fused kernel reads `step` on the device
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


def lr_at(step: int, optim_cfg, total_steps: int, base_lr: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    warm = optim_cfg.warmup_steps
    if warm > 0 and step < warm:
        return base_lr * (step + 1) / warm
    if optim_cfg.schedule == "const":
        return base_lr
    span = max(1, total_steps - warm)
    p = min(max((step - warm) / span, 0.0), 1.0)
    floor = base_lr * optim_cfg.min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


# --------------------------------------------------------------------------- engines
class Engine:
    """Common interface (see the module docstring)."""

    module: TrainModule
    device: torch.device

    def __init__(self, module: TrainModule, optimizer: torch.optim.Optimizer, runtime: Runtime, accum: int):
        self.module = module
        self.optimizer = optimizer
        self.runtime = runtime
        self.device = runtime.device
        self.accum = int(accum)

    # -- per micro-batch
    def micro_step(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch (``TrainModule.forward``'s arguments and result), then the
        optimizer step when this micro-batch ends an accumulation window. Whatever the forward or backward
        raises, the engine's per-micro-batch state (DDP's gradient-sync switch) is left as it was."""
        raise NotImplementedError

    # -- per optimizer step
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self) -> float | None:
        raise NotImplementedError

    def grad_norm_held(self) -> torch.Tensor | float | None:
        """The last optimizer step's global gradient norm as the engine holds it (a device tensor, or the value
        DeepSpeed keeps), never read back to the host here; None where there is none."""
        raise NotImplementedError

    # -- state (folder: the checkpoint folder; engines write into folder / "engine")
    def save(self, folder: Path) -> dict[str, dict[str, Any]]:
        """Write the engine state; {path: {"bytes", "sha256"}} of each file this rank wrote."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        raise NotImplementedError

    def full_state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(GPT fp32 state dict, objective fp32 state dict or None) on rank 0 ({} elsewhere). Collective."""
        raise NotImplementedError

    # -- what each rank holds
    def local_params(self) -> list[torch.Tensor]:
        """This rank's pieces of every trained parameter (the whole parameters where nothing is partitioned)."""
        return [p for p in self.module.parameters()]

    def gpt_param_count(self) -> int:
        """Elements of the GPT's parameters, whole (whatever the engine partitions)."""
        return sum(p.numel() for p in self.module.gpt.parameters())

    def register_external_params(self, module: nn.Module) -> None:
        """Declare that `module`'s forward also uses its own parameters without calling the submodules that
        own them (the fused foresight op reads the stacked head weights directly), so an engine that gathers
        partitioned parameters per module gathers them for `module`. Nothing to do where nothing is
        partitioned."""

    # -- what the EMA averages
    def ema_params(self) -> list[tuple[str, torch.Tensor]]:
        """(GPT parameter name, fp32 master tensor the EMA averages) pairs, in a fixed order: the parameters
        themselves here (fp32; bf16 runs use autocast)."""
        return [(n, p) for n, p in self.module.gpt.named_parameters()]

    def ema_shards(self) -> dict[str, Shard] | None:
        """None: ``ema_params()`` are whole tensors on every rank. Else GPT parameter name -> ``Shard`` (which
        elements of the parameter this rank's ``ema_params()`` tensor holds)."""
        return None

    def gather_full(self, names: Sequence[str], pieces: Sequence[torch.Tensor], dtype: torch.dtype
                    ) -> Iterator[torch.Tensor]:
        """The whole tensors, in ``dtype``, of GPT parameters ``names`` from this rank's ``pieces`` (shaped like
        their ``ema_params()`` tensors), in order. Collective when ``ema_shards()`` is not None (every rank
        calls it with the same names); else the pieces themselves, unconverted."""
        shards = self.ema_shards()
        if shards is None:
            return iter(pieces)
        return gather_full(pieces, [shards[n] for n in names], dtype)

    def train(self) -> None:
        self.module.train()


class PlainEngine(Engine):
    """Single process or torch DDP; bf16 through autocast with fp32 weights."""

    def __init__(self, module: TrainModule, optimizer, runtime: Runtime, accum: int, grad_clip: float,
                 precision: str):
        super().__init__(module, optimizer, runtime, accum)
        self.grad_clip = float(grad_clip)
        self.autocast = precision == "bf16"
        self.wrapped: nn.Module = module
        if runtime.backend == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            # The module's buffers (RoPE and neighbour tables) are constants, identical on every rank: no
            # broadcast of them before each forward. The gradients are views of the all-reduce buckets: no copy
            # back after the reduction and no second copy in memory. Buckets of DDP_BUCKET_MB instead of 25 MB:
            # each costs a collective call and, under torch.compile, a graph split (dynamo cuts the compiled
            # graph at DDP's bucket boundaries); 500 MB keeps GPT-B in one bucket and GPT-XXL in 12.
            self.wrapped = DDP(module, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True,
                               bucket_cap_mb=DDP_BUCKET_MB)
        self._micro = 0
        self._norm: torch.Tensor | None = None
        self._params = [p for p in module.parameters() if p.requires_grad]
        # torch's fused Adam/AdamW divide every gradient by ``optimizer.grad_scale`` (a device tensor) inside
        # their one kernel (the hook GradScaler uses); handing them 1 / clip_coef there clips the gradients
        # without the separate read-modify-write pass over all of them that clip_grad_norm_ makes
        from mirai.optim.adamw_ema import AdamWEMA       # it reads the same attribute, and does not write the grads back
        self.clip_in_optimizer = ((type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
                                   and bool(optimizer.defaults.get("fused")))
                                  or isinstance(optimizer, AdamWEMA))

    def micro_step(self, *args):
        boundary = (self._micro + 1) % self.accum == 0
        # DDP all-reduces the gradients only in the backward of an accumulation window's last micro-batch:
        # no_sync covers the forward and the backward of the others, and is left whatever they raise
        sync = self.wrapped.no_sync() if self.runtime.backend == "ddp" and not boundary else nullcontext()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        with sync:
            with autocast:
                loss, ntp, per_head = self.wrapped(*args)
            (loss / self.accum).backward()
        self._step()
        return loss, ntp, per_head

    def _step(self) -> None:
        self._micro += 1
        if self._micro % self.accum:
            return
        if self.clip_in_optimizer:
            grads = [p.grad for p in self._params if p.grad is not None]
            self._norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if self.grad_clip > 0:     # clip_grad_norm_'s factor min(1, clip / (norm + 1e-6)), inverted
                self.optimizer.grad_scale = (self._norm + 1e-6).div(self.grad_clip).clamp(min=1.0)
        else:
            clip = self.grad_clip if self.grad_clip > 0 else float("inf")
            self._norm = torch.nn.utils.clip_grad_norm_(self._params, clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float | None:
        return None if self._norm is None else float(self._norm)

    def grad_norm_held(self) -> torch.Tensor | None:
        return self._norm

    def save(self, folder: Path) -> dict[str, dict[str, Any]]:
        if not self.runtime.is_main:
            return {}
        path = folder / "engine" / "state.pt"
        return {str(path): save_file({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                                     path)}

    def load(self, folder: Path) -> None:
        from mirai.io.state_dicts import load_state
        path = folder / "engine" / "state.pt"
        state = load_file(path)
        load_state(self.module, state["module"], str(path))
        load_optimizer_state(self.optimizer, state["optimizer"])

    def full_state_dicts(self):
        if not self.runtime.is_main:
            return {}, None
        cpu = lambda m: {k: v.detach().float().cpu().clone() for k, v in m.state_dict().items()}  # noqa: E731
        return cpu(self.module.gpt), (cpu(self.module.objective) if self.module.objective is not None else None)


def deepspeed_types() -> tuple[type, ...]:
    """The non-tensor types DeepSpeed's own ZeRO-0..3 checkpoints hold (found by saving bf16 and fp32 runs
    of every stage): its static loss scaler, the ZeRO stage enum and the fragment addresses of ZeRO-1/2.
    The only types a weights-only load of a DeepSpeed file allows beyond torch's."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return LossScaler, ZeroStageEnum, fragment_address


class CheckpointIO:
    """Stands in for DeepSpeed's checkpoint engine object: its file writes go through
    ``mirai.io.torch_files.save_file`` (atomic, hashed while written, disk-full errors; the records collect in
    ``written``) and its reads through ``load_file`` (weights-only, ``deepspeed_types`` allowed); every other
    attribute is DeepSpeed's object's."""

    def __init__(self, inner):
        self.inner = inner
        self.written: dict[str, dict[str, Any]] = {}

    def __getattr__(self, name: str):
        if name == "inner":                       # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        self.written[str(path)] = save_file(state_dict, path)

    def load(self, path: str, map_location=None):
        return load_file(path, allowed=deepspeed_types(), map_location=map_location or "cpu")


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` around the TrainModule with the client optimizer.

    Under ZeRO-1/2 (``deepspeed_config`` turns DeepSpeed's norm off there) the gradient norm and the clip
    are computed here at each accumulation boundary, between DeepSpeed's gradient reduction and its step:
    one multi-tensor norm over this rank's reduced gradient partition, one all-reduce of its square, and one
    multi-tensor scale by DeepSpeed's own factor ``1 / max(1, (norm + 1e-6) / clip)``, all on the device.
    DeepSpeed's path instead casts each parameter's gradient slice to fp64 for its own norm."""

    def __init__(self, module: TrainModule, optimizer, runtime: Runtime, ds_config: dict[str, Any],
                 grad_clip: float = 0.0):
        import deepspeed
        self.zero3 = ds_config["zero_optimization"]["stage"] == 3
        self.own_norm = ds_config["zero_optimization"].get("compute_grad_norm") is False
        self.grad_clip = float(grad_clip)
        self._norm: torch.Tensor | None = None
        engine, ds_opt, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                                    dist_init_required=False)
        super().__init__(module, optimizer, runtime, ds_config["gradient_accumulation_steps"])
        self.ds = engine
        self.io = engine.checkpoint_engine = CheckpointIO(engine.checkpoint_engine)
        self.ds_optimizer = ds_opt
        self.device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
        if module.objective is not None:
            # the fused foresight op reads the stacked head weights without calling heads.forward
            self.register_external_params(module.objective)
        if self.zero3:
            # Parameters owned directly by the model's root module (PAR's transition tokens) are used in
            # its forward, whose GPTOutput result ZeRO-3 cannot hook for the backward pass: the parameter
            # would still be released when its gradient arrives. As external parameters of the TrainModule
            # (tuple outputs, hooked) they are gathered again at the start of the backward pass.
            for p in module.gpt.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(module, p)

    def register_external_params(self, module: nn.Module) -> None:
        """ZeRO-3 gathers a module's partitioned parameters around its own forward only: those `module` uses
        directly are registered with DeepSpeed as its external parameters (other stages: nothing to do)."""
        if not self.zero3:
            return
        import deepspeed  # deepspeed.zero is an attribute of the package, not an importable module path
        for p in module.parameters():
            deepspeed.zero.register_external_parameter(module, p)

    def micro_step(self, *args):
        loss, ntp, per_head = self.ds(*args)
        self.ds.backward(loss)
        if self.own_norm and self.ds.is_gradient_accumulation_boundary():
            self._norm = self._clip_partition()
        self.ds.step()
        return loss, ntp, per_head

    def local_params(self) -> list[torch.Tensor]:
        """ZeRO-3: this rank's partitions (``p.ds_tensor``); other stages hold whole (bf16) parameters."""
        return [p.ds_tensor if self.zero3 else p for p in self.module.parameters()]

    def gpt_param_count(self) -> int:
        return sum(int(p.ds_numel) if self.zero3 else p.numel() for p in self.module.gpt.parameters())

    def _clip_partition(self) -> torch.Tensor:
        """Global gradient norm from this rank's reduced partition (collective), and the clip applied to it."""
        import torch.distributed as dist
        opt = self.ds_optimizer
        grads: list[torch.Tensor] = []
        for i in sorted(opt.averaged_gradients):                # per parameter group: this rank's slices
            group = opt.averaged_gradients[i]
            flat = getattr(group, "flat_partition", None)       # (DeepSpeed's compact fp32 buffer, if it built one)
            grads.extend([flat] if flat is not None else group)
        sq = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square().sum()
        dist.all_reduce(sq, group=opt.dp_process_group)
        norm = sq.sqrt()
        if self.grad_clip > 0:
            torch._foreach_mul_(grads, ((norm + 1e-6) / self.grad_clip).clamp(min=1.0).reciprocal())
        return norm

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)                                     # the client optimizer's groups
        for group in getattr(self.ds_optimizer, "param_groups", []) or []:
            group["lr"] = lr

    def grad_norm_held(self) -> torch.Tensor | float | None:
        return self._norm if self.own_norm else self.ds.get_global_grad_norm()

    def grad_norm(self) -> float | None:
        norm = self.grad_norm_held()
        if norm is None:
            return None
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    def save(self, folder: Path) -> dict[str, dict[str, Any]]:
        self.io.written.clear()
        self.ds.save_checkpoint(str(folder), tag="engine", client_state={}, save_latest=False)
        return dict(self.io.written)

    def load(self, folder: Path) -> None:
        # Every file DeepSpeed may open is first loaded weights-only (tensor data mapped, not read): a file
        # holding any other type is refused, naming it, before DeepSpeed reads anything. DeepSpeed's own
        # reads then go through the same loader (CheckpointIO).
        for path in sorted((folder / "engine").rglob("*.pt")):
            load_file(path, allowed=deepspeed_types(), mmap=True)
        try:
            with self._deepspeed_clip_off():
                path, _ = self.ds.load_checkpoint(str(folder), tag="engine", load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - DeepSpeed raises many kinds; name the folder
            raise CheckpointError(f"{folder / 'engine'}: DeepSpeed could not load it "
                                  f"({type(err).__name__}: {err})") from err
        if path is None:
            raise CheckpointError(f"{folder / 'engine'}: DeepSpeed found no checkpoint there")

    @contextmanager
    def _deepspeed_clip_off(self):
        """Load under ZeRO-1/2 also what DeepSpeed wrote when it clipped itself (before the norm was this
        engine's): its loader refuses a saved clip > 0 without its norm, then restores the saved clip."""
        opt = self.ds_optimizer
        if not self.own_norm:
            yield
            return
        opt.compute_grad_norm = True
        try:
            yield
        finally:
            opt.compute_grad_norm, opt.clip_grad = False, 0.0

    def _fp32_lookup(self) -> dict[int, torch.Tensor]:
        """id(param) -> fp32 master copy for DeepSpeed's fp16/bf16 wrappers without _hp_mapping (ZeRO-0)."""
        opt = self.ds_optimizer
        out: dict[int, torch.Tensor] = {}
        lp_groups = getattr(opt, "fp16_groups", None)
        if lp_groups is None:
            return out
        if hasattr(opt, "fp32_groups_flat"):
            from torch._utils import _unflatten_dense_tensors
            for lp, flat in zip(lp_groups, opt.fp32_groups_flat):
                for p, q in zip(lp, _unflatten_dense_tensors(flat, lp)):
                    out[id(p)] = q
        elif hasattr(opt, "fp32_groups"):
            for lp, hp in zip(lp_groups, opt.fp32_groups):
                for p, q in zip(lp, hp):
                    out[id(p)] = q
        return out

    def full_state_dicts(self):
        from deepspeed.utils import safe_get_full_fp32_param
        lookup = self._fp32_lookup()
        main = self.runtime.is_main

        def collect(mod: nn.Module) -> dict[str, torch.Tensor]:
            sd: dict[str, torch.Tensor] = {}
            for name, p in mod.named_parameters():
                full = safe_get_full_fp32_param(p)            # collective under ZeRO-1/2/3
                if full is None:
                    full = lookup.get(id(p), p.detach())
                if main:
                    sd[name] = full.detach().float().cpu().clone()
            if main:
                for name, b in mod.named_buffers():
                    if name in mod.state_dict():              # persistent buffers only
                        sd[name] = b.detach().cpu().clone()
            return sd

        gpt = collect(self.module.gpt)
        obj = collect(self.module.objective) if self.module.objective is not None else None
        return (gpt, obj) if main else ({}, None)

    def ema_params(self):
        return self._fp32_masters()[0]

    def ema_shards(self):
        return self._fp32_masters()[1]

    def _fp32_masters(self) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Shard] | None]:
        """The GPT's fp32 master weights as DeepSpeed holds them: (name, tensor) pairs and their shards.

        ZeRO-3: the fp32 partition matching ``p.ds_tensor``, a view into the optimizer's
        ``fp32_partitioned_groups_flat`` (where ``safe_get_local_fp32_param`` reads it, without that call's
        stream synchronisation); with P = ``ds_tensor.numel()`` its ``Shard`` starts at rank * P and holds
        min(P, numel - start) elements (clipped at 0; the last rank's partition is padded).
        ZeRO-1/2 (and the bf16 optimizer): ``p._hp_mapping.hp_fragment``, the fragment of the parameter in
        this rank's fp32 partition (its ``Shard``: ``lp_fragment_address`` start / numel; an empty tensor and
        length 0 where the parameter lies wholly in another rank's partition).
        ZeRO-0: the fp16/bf16 wrapper's fp32 copies (``_fp32_lookup``), or the parameters when DeepSpeed
        runs in fp32 without a wrapper. Cached while the mappings and flat buffers stay the same objects
        (a checkpoint load re-links them)."""
        opt = self.ds_optimizer
        named = list(self.module.gpt.named_parameters())
        if self.zero3:
            key = tuple(t.data_ptr() for t in opt.fp32_partitioned_groups_flat)
        else:
            key = tuple(id(getattr(p, "_hp_mapping", None)) for _, p in named)
        cached = getattr(self, "_masters_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        pairs: list[tuple[str, torch.Tensor]] = []
        shards: dict[str, Shard] | None = {}
        if self.zero3:
            rank = self.runtime.rank
            for n, p in named:
                group, offset, count = opt.grad_position[opt.get_param_id(p)]
                pairs.append((n, opt.fp32_partitioned_groups_flat[group].narrow(0, offset, count)))
                start = rank * int(p.ds_tensor.numel())
                shards[n] = Shard(tuple(p.ds_shape), start, max(0, min(count, int(p.ds_numel) - start)))
        elif all(hasattr(p, "_hp_mapping") for _, p in named):
            for n, p in named:
                mapping = p._hp_mapping
                if mapping is None:
                    pairs.append((n, torch.empty(0, dtype=torch.float32, device=p.device)))
                    shards[n] = Shard(tuple(p.shape), 0, 0)
                else:
                    pairs.append((n, mapping.hp_fragment.view(-1)))
                    address = mapping.lp_fragment_address
                    shards[n] = Shard(tuple(p.shape), int(address.start), int(address.numel))
        else:
            lookup = self._fp32_lookup()
            pairs = [(n, lookup.get(id(p), p)) for n, p in named]
            shards = None
        self._masters_cache = (key, pairs, shards)
        return pairs, shards


def deepspeed_config(cfg, world_size: int, overlap: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run, built from the dataclass (``cfg.train.zero_stage`` resolved).

    ZeRO-1/2: ``compute_grad_norm`` off and ``gradient_clipping`` 0 (``DeepSpeedEngine`` computes the norm
    and clips, without DeepSpeed's per-parameter fp64 norm and its host reads); ``contiguous_gradients`` off
    (no per-parameter copy into a reduction bucket inside a Python gradient hook: ZeRO-1 then registers no
    hook at all and reduces at the boundary; both stages all-reduce the same bytes either way, since
    ``use_multi_rank_bucket_allreduce`` is DeepSpeed's default); ``overlap_comm`` only with `overlap`
    (several CUDA ranks and gradients that arrive during the backward: DeepSpeed then synchronises the
    device per bucket and at the end of the backward; under whole-model compile nothing can overlap).
    """
    t = cfg.train
    if t.zero_stage is None:
        raise ValueError("train.zero_stage: None; DeepSpeed needs the stage resolved first "
                         "(mirai.trainer.memory.choose_engine)")
    own_norm = t.zero_stage in (1, 2)
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        zero.update({"overlap_comm": overlap, "contiguous_gradients": t.zero_stage == 3,
                     "reduce_bucket_size": ZERO_REDUCE_BUCKET, "allgather_bucket_size": ZERO_REDUCE_BUCKET,
                     "reduce_scatter": True})
    if own_norm:
        zero["compute_grad_norm"] = False
    if t.zero_stage == 3:
        zero.pop("allgather_bucket_size")
        zero.update({"stage3_gather_16bit_weights_on_model_save": False,
                     "stage3_param_persistence_threshold": ZERO3_PERSISTENCE,
                     "stage3_prefetch_bucket_size": ZERO3_PREFETCH_BUCKET})
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum(world_size),
        "gradient_clipping": 0.0 if own_norm else float(cfg.optim.grad_clip),
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": bool(t.check_grad_overflow)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }


def compile_scope(cfg, runtime: Runtime) -> str:
    """``train.compile_scope`` resolved for this run: "model" or "blocks" (see the config field)."""
    t = cfg.train
    if t.compile_scope != "auto":
        return t.compile_scope
    return "blocks" if t.needs_block_compile(deepspeed=runtime.backend == "deepspeed") else "model"


def build_engine(module: TrainModule, cfg, runtime: Runtime, base_lr: float) -> Engine:
    """Move the module to the device, apply compile / activation checkpointing, wrap it."""
    gpt = module.gpt
    if cfg.train.activation_checkpointing:
        gpt.enable_activation_checkpointing(True)
    if cfg.train.compile:
        compile_in_scope(module, gpt.layers, compile_scope(cfg, runtime))
    module.to(runtime.device)
    if runtime.backend == "deepspeed":
        if cfg.optim.fuse_ema:
            warnings.warn("optim.fuse_ema is ignored under DeepSpeed (its engine owns the optimizer step); the EMA "
                          "runs as its own pass", RuntimeWarning, stacklevel=2)
        optimizer = build_optimizer(module, cfg.optim, base_lr, runtime.device)
        # DeepSpeed's overlap only pays when gradients arrive during the backward (not under whole-model compile)
        overlap = (runtime.device.type == "cuda" and runtime.world_size > 1
                   and not (cfg.train.compile and compile_scope(cfg, runtime) == "model"))
        return DeepSpeedEngine(module, optimizer, runtime,
                               deepspeed_config(cfg, runtime.world_size, overlap),
                               grad_clip=cfg.optim.grad_clip)
    optimizer = build_optimizer(module, cfg.optim, base_lr, runtime.device, fuse_ema=cfg.optim.fuse_ema)
    return PlainEngine(module, optimizer, runtime, cfg.train.grad_accum(runtime.world_size), cfg.optim.grad_clip,
                       cfg.train.precision)
