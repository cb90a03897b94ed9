"""DeepSpeed ZeRO 0..3 around the TrainModule with the client optimizer, and its JSON config.

Config (built from the dataclass, see ``deepspeed_config``): train_batch_size, train_micro_batch_size_per_gpu,
gradient_accumulation_steps, gradient_clipping, bf16.enabled, zero_optimization.stage (+ overlap/bucket
settings), zero_allow_untested_optimizer (a client torch optimizer under ZeRO), steps_per_print effectively off.
Under ZeRO-1/2 the gradient norm and the clip are this engine's (``DeepSpeedEngine``), not DeepSpeed's.
Every file DeepSpeed writes or reads goes through ``mirai.io.torch_files`` (``CheckpointIO``).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mirai.io.torch_files import CheckpointError, load_file, save_file
from mirai.trainer.distributed import Runtime
from mirai.trainer.engine.base import Engine
from mirai.trainer.engine.module import TrainModule
from mirai.trainer.shards import Shard

ZERO_REDUCE_BUCKET = int(5e8)        # elements: ZeRO-1/2 gradient reduction bucket, ZeRO all-gather bucket
ZERO3_PREFETCH_BUCKET = int(5e7)     # elements: ZeRO-3 parameter prefetch
ZERO3_PERSISTENCE = int(1e5)         # elements: ZeRO-3 keeps smaller parameters whole on every rank


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
        named = self.gpt_named_params()
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
                         "(mirai.trainer.engine.memory.choose_engine)")
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

