"""How gradients are computed and applied across workers: plain / DDP, or DeepSpeed ZeRO-2 / ZeRO-3.

An ``Engine`` hides the strategy from the loop: ``forward_context`` (DDP's ``no_sync`` between accumulation
boundaries), ``backward`` (loss scaling by the accumulation steps), ``step`` (clip, optimizer, schedule; returns
the gradient norm at boundaries), ``save`` / ``load`` (this strategy's part of a checkpoint) and
``adapter_state_dict`` (the full trainable weights, gathered under ZeRO-3). DeepSpeed configs are generated
from the job with the official ``ds_config_zero2.json`` / ``ds_config_zero3.json`` values as defaults, and a
client torch AdamW (``zero_allow_untested_optimizer``) so nothing is JIT-compiled; should an op compile,
``TORCH_EXTENSIONS_DIR`` points at a cache. Works on CPU with gloo and on GPUs with NCCL.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from qwenvl_core.specs import FineTuneJobSpec, Precision, Strategy
from qwenvl_core.training.checkpoint import load_torch_file

ZERO2_DEFAULTS: dict[str, Any] = {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
                                  "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 2e8,
                                  "contiguous_gradients": True}
ZERO3_DEFAULTS: dict[str, Any] = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                  "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                                  "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto",
                                  "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                                  "stage3_gather_16bit_weights_on_model_save": True}
TRAINABLE_FILE = "trainable.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def deepspeed_config(spec: FineTuneJobSpec, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed config of ``spec`` (ZeRO stage from ``compute.strategy``; "auto" values resolved)."""
    hp = spec.hyperparameters
    zero = dict(ZERO3_DEFAULTS if spec.compute.strategy is Strategy.ZERO3 else ZERO2_DEFAULTS)
    auto = {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}
    zero = {k: auto.get(k, v) if v == "auto" else v for k, v in zero.items()}
    return {
        "train_micro_batch_size_per_gpu": hp.micro_batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "train_batch_size": hp.batch_size * spec.compute.num_workers,
        "gradient_clipping": hp.max_grad_norm,
        "bf16": {"enabled": hp.precision is Precision.BF16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Engine:
    """Plain single-process training, or DDP when ``torch.distributed`` is initialised with >1 rank."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float, accum: int) -> None:
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm, self.accum = max_grad_norm, accum
        self.rank, self.world = rank_and_world()
        self.model: torch.nn.Module = model
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(model)

    @contextlib.contextmanager
    def forward_context(self, boundary: bool) -> Iterator[None]:
        """Around forward + backward: skip DDP's all-reduce until the accumulation boundary."""
        if boundary or self.world == 1:
            yield
        else:
            with self.model.no_sync():  # type: ignore[operator]
                yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self, boundary: bool) -> float | None:
        if not boundary:
            return None
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad}

    def save(self, directory: Path, tag: str) -> None:
        if self.rank == 0:
            torch.save(self.adapter_state_dict(), directory / TRAINABLE_FILE)
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), directory / SCHEDULER_FILE)

    def load(self, directory: Path, tag: str) -> None:
        weights = load_torch_file(directory / TRAINABLE_FILE)
        missing = set(weights) - {n for n, _ in self.module.named_parameters()}
        if missing:
            raise RuntimeError(f"checkpoint has weights the model lacks: {sorted(missing)[:3]}")
        self.module.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(load_torch_file(directory / OPTIMIZER_FILE))
        self.scheduler.load_state_dict(load_torch_file(directory / SCHEDULER_FILE))


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2 / ZeRO-3 around the peft model; every rank saves its own shards."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, config: dict[str, Any],
                 device: torch.device) -> None:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "qwenvl" / "torch_extensions"))
        import deepspeed

        if not torch.cuda.is_available():
            # DeepSpeed would JIT-compile its shared-memory all-reduce op (~45 s, and a killed build leaves a
            # lock that blocks every later run); gloo's all-reduce is enough on CPU.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        # DeepSpeed moves the model to the device of LOCAL_RANK unless told its index: the trainer's device (where
        # its batches go). On the CPU every index names the CPU.
        args = SimpleNamespace(device_rank=device.index or 0)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config, args=args)
        self.engine = engine
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.model = engine
        self.max_grad_norm, self.accum = float(config["gradient_clipping"]), int(config["gradient_accumulation_steps"])
        self.rank, self.world = rank_and_world()
        self.stage = int(config["zero_optimization"]["stage"])

    @contextlib.contextmanager
    def forward_context(self, boundary: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self, boundary: bool) -> float | None:
        self.engine.step()  # applies the optimizer and schedule only at accumulation boundaries
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Full trainable weights on every rank (ZeRO-3 gathers the partitions; collective)."""
        import deepspeed

        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if self.stage < 3:
            return {n: p.detach().clone() for n, p in named}
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().clone() for n, p in named}

    def save(self, directory: Path, tag: str) -> None:
        self.engine.save_checkpoint(str(directory), tag=tag, exclude_frozen_parameters=True)

    def load(self, directory: Path, tag: str) -> None:
        # DeepSpeed's loader unpickles anything (weights_only=False): its files are read by load_torch_file
        # instead, which allows only the data classes DeepSpeed's ZeRO optimizer states hold.
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)
        loader = self.engine.checkpoint_engine
        loader.load = lambda path, map_location=None: load_torch_file(Path(path), allowed, map_location)
        try:
            self.engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False)
        finally:
            del loader.load  # back to the class's method


def build_engine(spec: FineTuneJobSpec, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, hidden_size: int,
                 device: torch.device) -> Engine:
    """The strategy's engine around ``model``, which is on ``device`` already."""
    hp = spec.hyperparameters
    if spec.compute.strategy is Strategy.DDP:
        return Engine(model, optimizer, scheduler, hp.max_grad_norm, hp.gradient_accumulation_steps)
    return DeepSpeedEngine(model, optimizer, scheduler, deepspeed_config(spec, hidden_size), device)
