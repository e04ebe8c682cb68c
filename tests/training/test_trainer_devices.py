"""The trainer on the device it is given (``Trainer(..., device)``; the Ray Train workflow passes its worker's, the
GPU Ray assigned it or the CPU): the base model, the LoRA weights, the optimizer's parameters and every collated
batch are placed there. On the CPU the build is checked on the ``meta`` device, where no tensor of the CPU path can
land by accident (it holds shapes, not values, so nothing is trained there); a whole run is checked on every device
present (``cuda`` marked ``gpu``: ``bench/gpu_check.sh``), in a one-rank process group of the device's backend: it
learns, its collectives work there, and no op computes off the device."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import torch
import torch.distributed as dist

from qwenvl_core.devices import default_device
from qwenvl_core.errors import QwenVLError
from qwenvl_core.specs import JobState
from qwenvl_core.training import Hooks, RecordingSink, Trainer
from qwenvl_core.training.checkpoint import capture_rng, restore_rng
from tests.devices import DEVICES, DeviceRecorder
from tests.fixtures.net import free_port
from tests.training.conftest import make_spec


def test_the_trainer_builds_its_model_optimizer_and_batches_on_its_device(tiny_model_dir, synth_data, tmp_path):
    trainer = Trainer(make_spec(tiny_model_dir, synth_data, tmp_path / "run"), work_dir=tmp_path / "work",
                      device="meta")
    with ExitStack() as stack:
        trainer._build(stack)
    assert {p.device.type for p in trainer.model.parameters()} == {"meta"}  # base and LoRA weights
    optimized = [p for group in trainer.engine.optimizer.param_groups for p in group["params"]]
    assert optimized and {p.device.type for p in optimized} == {"meta"}
    batch = trainer.collator([trainer._row(trainer.units[i]) for i in range(2)])
    assert "pixel_values" in batch and {t.device.type for t in batch.values()} == {"meta"}


def test_a_device_that_is_no_device_or_not_there_is_a_clear_error(tiny_model_dir, synth_data, tmp_path):
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run")
    with pytest.raises(QwenVLError, match="the trainer's device 'gpu-zero': not a device name"):
        Trainer(spec, work_dir=tmp_path / "work", device="gpu-zero")
    if not torch.cuda.is_available():
        with pytest.raises(QwenVLError, match="no CUDA device is visible"):
            Trainer(spec, work_dir=tmp_path / "work", device="cuda")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device().type == expected == Trainer(spec, work_dir=tmp_path / "work").device.type


@pytest.fixture(scope="module", params=DEVICES)
def device_group(request: pytest.FixtureRequest) -> Iterator[str]:
    """A device with a one-rank process group of its backend (gloo on the CPU, NCCL on a GPU, as Ray Train sets up),
    so that the loop's collectives and DeepSpeed run as in a job (NCCL reduces only tensors on the GPU). One group
    per device for the module: DeepSpeed keeps the groups it made for the life of the process (a job's worker runs
    one trainer), so they are forgotten when the group goes."""
    device = request.param
    patch = pytest.MonkeyPatch()
    patch.setenv("LOCAL_RANK", "0")  # what Ray Train (and every launcher) sets; DeepSpeed requires it
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        yield device
    finally:
        dist.destroy_process_group()
        if (groups := sys.modules.get("deepspeed.utils.groups")) is not None:
            groups._WORLD_GROUP = None
        patch.undo()


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_a_run_on_the_device_learns_there_and_computes_nothing_off_it(device_group, strategy, tiny_model_dir,
                                                                      synth_data, tmp_path):
    device = device_group
    rec = RecordingSink()
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", compute={"strategy": strategy})
    trainer = Trainer(spec, Hooks(progress=[rec], metrics=[rec]), tmp_path / "work", device=device)
    recorder = DeviceRecorder(device)
    with recorder:
        result = trainer.run()
    assert not recorder.left, f"ops computed off {device} from its tensors: {sorted(set(recorder.left))}"
    assert result.state is JobState.SUCCEEDED and result.train_state.step == 12
    assert {p.device.type for p in trainer.model.parameters()} == {torch.device(device).type}
    losses = [p.loss for p in rec.progress]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3  # it learns, as the CPU run of test_loop does
    assert result.metrics["eval/loss"] < result.metrics["eval_base/loss"] - 0.3
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoints_random_state_replays_the_draws_on_the_device(device):
    """What exact resume needs of the RNG files: the rank's device draws again what it drew after the capture
    (through JSON, as the checkpoint stores it; on a GPU the rank's own device, whichever others it sees)."""
    state = json.loads(json.dumps(capture_rng()))
    first = torch.rand(5, device=device), torch.randn(3, device=device)
    restore_rng(state)
    again = torch.rand(5, device=device), torch.randn(3, device=device)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


class _LoopReads(DeviceRecorder):
    """``DeviceRecorder`` that also notes the device reads made by the loop and its objectives themselves (not the
    model's or the optimizer's) while a micro-step runs."""

    LOOP_FILES = ("training/loop.py", "training/objectives.py", "training/dpo.py")

    def __init__(self, device: str) -> None:
        super().__init__(device)
        self.in_micro_step = False
        self.micro_step_reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = len(self.reads)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.in_micro_step and len(self.reads) > before:
            ours = [f for f in traceback.extract_stack() if "/qwenvl_core/" in f.filename]
            if ours and ours[-1].filename.endswith(self.LOOP_FILES):
                self.micro_step_reads.append(f"{ours[-1].filename.rsplit('/', 1)[1]}:{ours[-1].lineno}")
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_the_loop_reads_the_device_once_per_optimizer_step_not_per_micro_step(
        method, device, tiny_model_dir, synth_data, tmp_path, monkeypatch):
    """The loss, token counts and DPO's reward sums stay on the device through the micro-steps (a read there waits
    for the backward just queued, so the next batch's collation cannot overlap it); the step's all-reduce reads them.
    (On a GPU the reads counted are real synchronisations: ``bench/gpu_check.sh`` runs the ``cuda`` case.)"""
    from tests.training.test_dpo import dpo_spec, write_preference_set

    steps = {"max_steps": 3, "batch_size": 8, "micro_batch_size": 2}  # 4 micro-steps each
    if method == "sft":
        spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", hyperparameters=steps, validation_file=None)
    else:
        pairs = write_preference_set(tmp_path / "train.jsonl", 24, 1)
        spec = dpo_spec(tiny_model_dir, (pairs, pairs), tmp_path / "run", validation_file=None,
                        hyperparameters={**steps, "learning_rate": 5e-3})
    trainer = Trainer(spec, work_dir=tmp_path / "work", device=device)
    recorder = _LoopReads(device)
    micro_step = Trainer._micro_step

    def marked(self, *args):
        recorder.in_micro_step = True
        try:
            return micro_step(self, *args)
        finally:
            recorder.in_micro_step = False

    monkeypatch.setattr(Trainer, "_micro_step", marked)
    with recorder:
        result = trainer.run()
    assert result.state is JobState.SUCCEEDED and result.train_state.step == 3
    assert recorder.micro_step_reads == []
    assert all(loss > 0 for _, loss in result.train_state.losses)  # the window still adds up
