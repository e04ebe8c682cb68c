"""The training loop: plain PyTorch, one job spec in, a trained adapter out; Ray and MLflow only via hooks.

``Trainer(spec, hooks, work_dir, device).run(resume_from=None)`` goes through named steps:

1. ``_build``      seeds, processor, base model on the trainer's device (the one given: the Ray Train workflow
                   passes its worker's, a GPU Ray assigned it or the CPU; else ``devices.default_device``) with
                   every batch collated onto it (Q-LoRA: NF4), LoRA, gradient checkpointing, the frozen vision
                   tower's feature cache, data, batch plan,
                   AdamW + schedule, the strategy's engine (DDP / DeepSpeed), the evaluator;
2. ``_resume``     optionally restores a checkpoint (engine, RNG, position in the data, counters);
3. ``_train``      epochs -> global micro-batches (each rank takes its slice) -> ``_micro_step``; at each
                   accumulation boundary ``_after_step``: metrics, progress, cancellation (rank 0 polls, the
                   answer is all-reduced), checkpoints every N steps, evaluation every N steps, early stopping;
4. ``_finish``     the adapter directory (rank 0), then the final evaluation with base vs fine-tuned (a
                   failing evaluation is a ``warn`` event, never a failed job: the adapter is already saved).

Every rank runs the same code; collective calls (all-reduce, DeepSpeed, ZeRO-3 gathers, checkpoint reports)
happen on every rank at the same points.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from qwenvl_core.data import Collator
from qwenvl_core.data.collate import Row, concat_samples, pack_groups
from qwenvl_core.devices import checked_device, default_device
from qwenvl_core.errors import ConfigError
from qwenvl_core.models.processing import ProcessorOptions
from qwenvl_core.models.registry import detect_family
from qwenvl_core.runs import ADAPTER_DIR
from qwenvl_core.specs import FineTuneJobSpec, JobState, Progress, Strategy
from qwenvl_core.training import checkpoint as ckpt
from qwenvl_core.training.data_loading import BatchPlan, load_job_data, update_digest
from qwenvl_core.training.evaluate import Evaluator, base_and_finetuned, task_items
from qwenvl_core.training.feature_cache import ImageFeatureCache
from qwenvl_core.training.hooks import Hooks, LocalCheckpoints
from qwenvl_core.training.lora import (
    apply_lora,
    fetch_adapter,
    load_adapter_weights,
    load_base_model,
    lora_summary,
    lora_targets,
)
from qwenvl_core.training.objectives import StepOutput, build_objective
from qwenvl_core.training.optim import build_optimizer, build_scheduler
from qwenvl_core.training.results import valid_metrics
from qwenvl_core.training.strategies import build_engine, rank_and_world


@dataclass
class TrainResult:
    """The outcome on this rank (``adapter_dir`` only on rank 0)."""

    state: JobState
    train_state: ckpt.TrainState
    total_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    adapter_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce(tensor: torch.Tensor) -> list[float]:
    """The sums of ``tensor`` [N] over the ranks, reduced on its device (NCCL reduces only tensors on the GPU)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class _StepWindow:
    """What the micro-steps of one optimizer step add up: the loss, the tokens and the objective's sums stay on the
    device until the step ends (reading them per micro-step would wait for each backward), the count on the host."""

    def __init__(self, keys: tuple[str, ...], device: torch.device) -> None:
        self.keys, self.micro, self.t0 = keys, 0, time.monotonic()
        self.sums = torch.zeros(2 + len(keys), dtype=torch.float64, device=device)  # loss, tokens, *keys

    def add(self, out: StepOutput) -> None:
        """Add one micro-step's output (tensors or host numbers; neither is read back here)."""
        values = (out.loss.detach(), out.tokens, *(out.sums.get(k, 0.0) for k in self.keys))
        for i, value in enumerate(values):
            self.sums[i] += value  # a 0-dim tensor on the device, or a host scalar passed to the kernel
        self.micro += 1

    def reduced(self, cancel: float) -> tuple[float, float, float, list[float], float]:
        """``(loss sum, micro-steps, tokens, key sums, cancel)`` summed over the ranks: the step's one device read."""
        host = torch.tensor([self.micro, cancel], dtype=torch.float64, device=self.sums.device)
        loss, tokens, *rest = _all_reduce(torch.cat([self.sums, host]))
        *sums, micro, cancelled = rest
        return loss, micro, tokens, sums, cancelled


class Trainer:
    """One fine-tuning run on this rank (see the module docstring)."""

    def __init__(self, spec: FineTuneJobSpec, hooks: Hooks | None = None, work_dir: Path | None = None,
                 device: str | torch.device | None = None) -> None:
        self.spec, self.hooks = spec, hooks or Hooks()
        self.device = default_device() if device is None else checked_device(device, "the trainer's device")
        if self.device.type == "cuda":  # NCCL, DeepSpeed and allocations without a device: the trainer's GPU
            self.device = torch.device("cuda", torch.cuda.current_device() if self.device.index is None
                                       else self.device.index)
            torch.cuda.set_device(self.device)
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix=f"qwenvl-{spec.job_id}-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.hooks.checkpoints is None:
            self.hooks.checkpoints = LocalCheckpoints(self.work_dir / "checkpoints", spec.checkpoint.keep)
        self.rank, self.world = rank_and_world()
        self.state = ckpt.TrainState()
        self._resuming = False

    # ----- 1. build -----------------------------------------------------------------------------------------
    def _build(self, stack: Any) -> None:
        spec, hp = self.spec, self.spec.hyperparameters
        seed_everything(spec.seed)  # identical LoRA init on every rank
        self.family = detect_family(spec.base_model)
        refusal = self.family.packing_refusal()
        if hp.packing and refusal:
            raise ConfigError(f"hyperparameters.packing: {self.family.name}: {refusal}")
        self.processor = self.family.load_processor(  # the job's image budget (min_pixels / max_pixels)
            spec.base_model, ProcessorOptions(min_pixels=hp.min_pixels, max_pixels=hp.max_pixels))
        base = load_base_model(spec.base_model, self.family, spec.quantization, hp.precision, self.device)
        self.targets = lora_targets(base, self.family, spec.lora)
        self.model = apply_lora(base, self.family, spec.lora)
        self.model.peft_config["default"].base_model_name_or_path = str(Path(spec.base_model).resolve())
        if spec.init_adapter and not self._resuming:  # a resumed run gets its weights from the checkpoint
            self._init_adapter(spec.init_adapter)
        if hp.gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        self.feature_cache = self._feature_cache()
        self.data = load_job_data(spec.train_file, spec.validation_file, self.processor, hp, stack,
                                  spec.evaluation.max_samples, preference=spec.method.type == "dpo",
                                  work_dir=self.work_dir)
        self.units = self._units()
        self.plan = BatchPlan([sum(self.lengths[i] for i in unit) for unit in self.units], hp, self.world,
                              spec.seed)
        epochs_steps = hp.n_epochs * self.plan.steps_per_epoch
        self.total_steps = hp.max_steps or epochs_steps
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(named, hp)
        scheduler = build_scheduler(optimizer, hp, self.total_steps)
        self.engine = build_engine(spec, self.model, optimizer, scheduler,
                                   self.model.config.get_text_config().hidden_size, self.device)  # the LM's width
        self.collator = Collator(self.processor.pad_token_id, device=self.device)
        self.objective = build_objective(spec, self.collator)  # SFT or DPO: what a micro-step optimises
        self.evaluator = self._evaluator()
        seed_everything(spec.seed + 1000 * self.rank)  # per-rank dropout streams

    def _init_adapter(self, uri: str) -> None:
        """Continued training: the LoRA weights (and ``modules_to_save``) start from the adapter at ``uri`` instead
        of LoRA's initialisation; every rank loads it, before the engine takes the parameters."""
        local = fetch_adapter(uri, self.work_dir / "init_adapter")
        count = load_adapter_weights(self.model, local)
        self._event("message", f"continued training: the adapter starts from its parent's weights ({count} "
                    "tensors)", {"init_adapter_tensors": count})

    def _units(self) -> list[list[int]]:
        """The training rows as groups of sample indices: one sample each, or with ``hyperparameters.packing``
        whole samples packed first-fit into rows of at most ``max_length`` tokens (``data.pack_groups``; each
        sample attends only to itself: ``segment_ids``). Batching, resume and the data digest run over rows."""
        self.lengths = self.data.train.inner.lengths()
        hp = self.spec.hyperparameters
        if not hp.packing:
            return [[i] for i in range(len(self.lengths))]
        units = pack_groups(self.lengths, hp.max_length)
        self._event("message", f"packing: {len(self.lengths)} samples in {len(units)} rows of at most "
                    f"{hp.max_length} tokens", {"packed_rows": len(units), "samples": len(self.lengths)})
        return units

    def _row(self, unit: list[int]) -> Row:
        if not self.spec.hyperparameters.packing:
            return self.data.train[unit[0]]
        return concat_samples([self.data.train[i] for i in unit])

    def _feature_cache(self) -> ImageFeatureCache | None:
        """Cache the vision tower's output per image when nothing in the tower trains and the tower maps each row
        of pixel_values to one image's features (Qwen-VL v1; not the transformers families: see feature_cache)."""
        budget = self.spec.compute.image_feature_cache_mb << 20
        tower = self.family.vision_tower(self.model)
        # Under ZeRO-3 every rank must gather the tower's partitioned weights together: a rank whose images
        # all hit would skip gathers that another rank waits for.
        zero3 = self.spec.compute.strategy is Strategy.ZERO3
        trains = any(p.requires_grad for p in tower.parameters())
        if budget == 0:
            return None
        reason = ("strategy zero3 partitions the vision tower" if zero3 else
                  "the vision tower trains (lora.vision_lora / lora.train_adapter)" if trains else
                  None if ImageFeatureCache.supports(tower) else
                  f"the {self.family.name} vision tower's forward needs more than one image per row of "
                  "pixel_values (patches and grid_thw)")
        if reason is not None:
            self._event("message", f"image feature cache off: {reason}; training without it",
                        {"image_feature_cache": False})
            return None
        cache = ImageFeatureCache(budget)
        cache.install(tower)
        return cache

    def _evaluator(self) -> Any:
        """The objective's evaluator (DPO: preference metrics), else loss / accuracy / task metrics."""
        val = self.data.validation
        if val is None:
            return None
        rows = [val[i] for i in range(len(val))]
        if (own := self.objective.evaluator(rows)) is not None:
            return own
        items = task_items(val.samples, self.processor, self.spec.evaluation.max_new_tokens)
        return Evaluator(rows, items, self.processor, self.spec.evaluation,
                         self.family.stop_token_ids(self.processor))

    # ----- 2. resume ----------------------------------------------------------------------------------------
    def _resume(self, directory: Path | None) -> None:
        if directory is None:
            return
        self.state, sampler_state = ckpt.load_checkpoint(directory, self.engine, self.rank)
        epoch, position = self.plan.restore(sampler_state)
        if (epoch, position) != (self.state.epoch, self.state.position):
            raise RuntimeError(f"checkpoint {directory}: sampler at {(epoch, position)}, state at "
                               f"{(self.state.epoch, self.state.position)}")
        self._event("message", f"resumed from step {self.state.step}", {"step": self.state.step})

    def _started(self) -> None:
        if self.rank != 0:
            return
        info = {"params": self.params(), "config": self.spec.model_dump(mode="json"),
                "data_reports": self.data.reports}
        for sink in self.hooks.start:
            sink.on_start(info)

    def params(self) -> dict[str, Any]:
        """Every hyperparameter, the LoRA settings, dataset statistics and the base model, flat."""
        hp = self.spec.hyperparameters
        out: dict[str, Any] = {f"hp.{k}": v for k, v in hp.model_dump(mode="json").items()}
        out |= {"hp.gradient_accumulation_steps": hp.gradient_accumulation_steps,
                "hp.peak_learning_rate": hp.peak_learning_rate, "hp.total_steps": self.total_steps}
        out |= {f"lora.{k}": v for k, v in lora_summary(self.model, self.spec.lora, self.targets).items()}
        out |= {f"data.{k}": v for k, v in self.data.stats().items()}
        if self.spec.init_adapter:
            out["init_adapter"] = self.spec.init_adapter
        out |= {"base_model": str(Path(self.spec.base_model).resolve()), "family": str(self.family.name),
                "quantization": self.spec.quantization.value, "strategy": self.spec.compute.strategy.value,
                "world_size": self.world, "seed": self.spec.seed, "job_id": self.spec.job_id,
                "method": self.spec.method.type}
        if self.spec.method.type == "dpo":
            out["dpo.beta"] = self.spec.method.dpo.beta
        return out

    # ----- 3. train -----------------------------------------------------------------------------------------
    def _train(self) -> JobState:
        self.engine.model.train()
        self._window = _StepWindow(self.objective.metric_keys, self.device)
        while self.state.step < self.total_steps:
            accum = self.plan.accum
            for batch in self.plan.global_batches(self.state.epoch, self.state.position):
                boundary = (self.state.position + 1) % accum == 0
                self._micro_step(batch, boundary)
                if boundary:
                    outcome = self._after_step()
                    if outcome is not None:
                        return outcome
                    if self.state.step >= self.total_steps:
                        return JobState.SUCCEEDED
            self.state.epoch, self.state.position = self.state.epoch + 1, 0
        return JobState.SUCCEEDED

    def _micro_step(self, global_batch: list[int], boundary: bool) -> None:
        rows = [self._row(self.units[u]) for u in self.plan.rank_slice(global_batch, self.rank)]
        with self.engine.forward_context(boundary):
            out = self.objective.step(self.engine, rows)  # SFT: cross-entropy; DPO: the preference loss
            self.engine.backward(out.loss)
        self._grad_norm = self.engine.step(boundary)
        self._window.add(out)
        ids = [self.data.train.samples[i].id for u in global_batch for i in self.units[u]]
        self.state.data_digest = update_digest(self.state.data_digest, ids)
        self.state.position += 1
        self.state.samples_seen += len(ids)

    def _after_step(self) -> JobState | None:
        cancel = float(self.rank == 0 and self.hooks.cancel is not None and self.hooks.cancel.cancelled())
        keys = self.objective.metric_keys
        loss_sum, micro, tokens, sums, cancel = self._window.reduced(cancel)
        self.state.step += 1
        self.state.tokens_seen += int(tokens)
        loss = loss_sum / max(1.0, micro)
        self.state.losses.append((self.state.step, loss))
        self._report_step(loss, tokens, self.objective.step_metrics(dict(zip(keys, sums, strict=True))))
        self._window = _StepWindow(keys, self.device)
        for observer in self.hooks.on_step:
            observer(self.state.step)
        if cancel > 0:
            self._checkpoint()
            return JobState.CANCELLED
        # the evaluation first: a checkpoint at the same step carries its metrics, and its state (the early-stopping
        # counters) includes it, so a resume from there does not evaluate that step again
        outcome, evaluated = None, None
        eval_every = self.spec.evaluation.every_n_steps
        if eval_every and self.state.step % eval_every == 0 and self.state.step < self.total_steps:
            outcome, evaluated = self._periodic_eval()
        every = self.spec.checkpoint.every_n_steps
        if outcome is not None or self.state.step % every == 0 or self.state.step == self.total_steps:
            self._checkpoint(evaluated)
        return outcome

    def _report_step(self, loss: float, tokens: float, extra: dict[str, float]) -> None:
        if self.rank != 0:
            return
        now = time.monotonic()
        elapsed = max(1e-9, now - self._window.t0)
        run_elapsed = max(1e-9, now - self._run_t0)
        done = self.state.step - (self.state.resumed_from_step or 0)
        eta = run_elapsed / max(1, done) * (self.total_steps - self.state.step)
        lr = self.engine.lr()
        samples = self.plan.micro * self.world * self.plan.accum
        metrics = {"train/loss": loss, "train/learning_rate": lr, "train/tokens_per_second": tokens / elapsed,
                   "train/samples_per_second": samples / elapsed, "train/epoch": self._epoch_float()}
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = self._grad_norm
        metrics |= {f"train/{k}": v for k, v in extra.items()}  # the objective's own (DPO: reward margin, ...)
        for sink in self.hooks.metrics:
            sink.log_metrics(metrics, self.state.step)
        progress = Progress(step=self.state.step, total_steps=self.total_steps, epoch=self._epoch_float(),
                            loss=loss, learning_rate=lr, tokens_per_second=tokens / elapsed,
                            samples_per_second=samples / elapsed, eta_seconds=eta,
                            trained_tokens=self.state.tokens_seen, metrics=extra)
        for sink in self.hooks.progress:
            sink.on_progress(progress)

    def _epoch_float(self) -> float:
        return self.state.epoch + self.state.position / max(1, self.plan.steps_per_epoch * self.plan.accum)

    def _checkpoint(self, evaluated: dict[str, float] | None = None) -> None:
        """Save a resumable checkpoint with a servable adapter; its event carries OpenAI's checkpoint metrics: the
        step's ``train_loss`` and, when ``evaluated`` (this step's periodic evaluation), ``valid_loss``,
        ``valid_mean_token_accuracy`` (SFT) or ``valid_<metric>`` (the objective's own)."""
        directory = Path(tempfile.mkdtemp(prefix=f"ckpt-{self.state.step}-", dir=self.work_dir))
        ckpt.save_checkpoint(directory, self.engine, self.state, self.plan.state(self.state.epoch,
                                                                                  self.state.position), self.rank)
        weights = self.engine.adapter_state_dict()  # collective under ZeRO-3; the checkpoint is servable
        if self.rank == 0:
            ckpt.save_adapter(self.model, weights, directory / ADAPTER_DIR,
                              {**self._adapter_meta(), "checkpoint_step": self.state.step})
        del weights
        metrics = {"step": float(self.state.step), "loss": self.state.losses[-1][1] if self.state.losses else 0.0}
        if self.hooks.checkpoints is not None:
            self.hooks.checkpoints.report(self.state.step, directory, metrics)
        public = ({"train_loss": metrics["loss"]} if self.state.losses else {}) | valid_metrics(evaluated or {})
        self._event("checkpoint", f"checkpoint at step {self.state.step}", {"step": self.state.step, "metrics": public})

    def _periodic_eval(self) -> tuple[JobState | None, dict[str, float] | None]:
        """(SUCCEEDED when early stopping ends the run, else None; the ``eval/*`` metrics, None without an
        evaluator)."""
        if self.evaluator is None:
            return None, None
        metrics = {f"eval/{k}": v for k, v in self.evaluator(self.engine.module, task=False).items()}
        self.state.evaluations.append((self.state.step, metrics))
        self._log(metrics)
        early = self.spec.evaluation.early_stopping
        loss = metrics["eval/loss"]
        best = self.state.best_eval_loss
        if best is None or loss < best - (early.min_delta if early else 0.0):
            self.state.best_eval_loss, self.state.evals_without_improvement = loss, 0
        else:
            self.state.evals_without_improvement += 1
        if early is not None and self.state.evals_without_improvement >= early.patience:
            self._event("message", f"early stopping at step {self.state.step}", {"step": self.state.step})
            return JobState.SUCCEEDED, metrics
        return None, metrics

    def _log(self, metrics: dict[str, float]) -> None:
        """Evaluation metrics to the metric sinks (MLflow) and, as a ``message`` event, to the job's events."""
        if self.rank == 0:
            for sink in self.hooks.metrics:
                sink.log_metrics(metrics, self.state.step)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            self._event("message", f"evaluation at step {self.state.step}: {shown}",
                        {"step": self.state.step, "metrics": metrics})

    def _event(self, type_: Any, message: str, data: dict[str, Any], level: Any = "info") -> None:
        if self.rank == 0 and self.hooks.events is not None:
            self.hooks.events.emit(type_, message, data, level)

    # ----- 4. finish ----------------------------------------------------------------------------------------
    def _finish(self, outcome: JobState) -> TrainResult:
        """The adapter first, then the final evaluation: a finished training always keeps its adapter, and an
        evaluation that fails is a warning event (the job still succeeds, without final metrics)."""
        result = TrainResult(outcome, self.state, self.total_steps, summary=self.summary())
        if outcome is JobState.CANCELLED:
            return result
        weights = self.engine.adapter_state_dict()  # collective under ZeRO-3
        if self.rank == 0:
            result.adapter_dir = ckpt.save_adapter(self.model, weights, self.work_dir / "adapter",
                                                   {**self._adapter_meta(), "training": result.summary})
        del weights
        result.metrics = self._final_eval()
        if result.adapter_dir is not None and result.metrics:
            ckpt.add_adapter_meta(result.adapter_dir, {"training": result.metrics})
        return result

    def _adapter_meta(self) -> dict[str, Any]:
        """``meta.json`` of an adapter this run writes (final or a checkpoint's)."""
        meta = {"job_id": self.spec.job_id, "base_model": str(Path(self.spec.base_model).resolve()),
                "family": str(self.family.name), "quantization": self.spec.quantization.value}
        return meta | ({"init_adapter": self.spec.init_adapter} if self.spec.init_adapter else {})

    def _final_eval(self) -> dict[str, float]:
        """Base vs fine-tuned (or fine-tuned only) metrics; {} without validation data or when evaluation fails."""
        if self.evaluator is None:
            return {}
        try:
            if self.spec.evaluation.compare_base:
                metrics = base_and_finetuned(self.engine.module, self.evaluator)
            else:
                metrics = {f"eval/{k}": v for k, v in self.evaluator(self.engine.module).items()}
        except Exception as exc:  # the adapter is saved: a broken evaluation must not fail the finished job
            self._event("message", f"final evaluation failed, the adapter is kept without eval metrics: "
                        f"{type(exc).__name__}: {exc}", {"step": self.state.step, "error": type(exc).__name__},
                        level="warn")
            return {}
        self.state.evaluations.append((self.state.step, {k: v for k, v in metrics.items() if k.startswith("eval/")}))
        self._log(metrics)
        return metrics

    def summary(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self._run_t0)
        losses = self.state.losses
        return {"steps": self.state.step, "total_steps": self.total_steps, "epochs": self._epoch_float(),
                "samples_seen": self.state.samples_seen, "tokens_seen": self.state.tokens_seen,
                "data_digest": self.state.data_digest, "first_loss": losses[0][1] if losses else None,
                "final_loss": losses[-1][1] if losses else None,
                "tokens_per_second": (self.state.tokens_seen - self._run_tokens0) / elapsed,
                "lora": lora_summary(self.model, self.spec.lora, self.targets),
                "image_feature_cache": self.feature_cache.stats() if self.feature_cache else None,
                "strategy": self.spec.compute.strategy.value, "world_size": self.world,
                "resumed_from_step": self.state.resumed_from_step}

    def run(self, resume_from: Path | None = None) -> TrainResult:
        from contextlib import ExitStack

        with ExitStack() as stack:
            self._resuming = resume_from is not None
            self._build(stack)
            self._resume(resume_from)
            self._run_t0, self._run_tokens0 = time.monotonic(), self.state.tokens_seen
            self._started()
            outcome = self._train() if self.state.step < self.total_steps else JobState.SUCCEEDED
            return self._finish(outcome)
