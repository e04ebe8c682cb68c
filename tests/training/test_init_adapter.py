"""Continued training in the trainer: a run whose spec names ``init_adapter`` starts from that adapter's weights
(every family, LoRA + trained adapter + vision LoRA), a mismatching adapter is refused naming ``init_adapter``, a
resumed run takes its weights from the checkpoint, and every checkpoint holds a servable adapter of its step."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from qwenvl_core.models.registry import get_family
from qwenvl_core.runs import RunDir
from qwenvl_core.specs import LoraSpec, Precision, Quantization
from qwenvl_core.training import Hooks, RunDirEvents, Trainer
from qwenvl_core.training import checkpoint as ckpt
from qwenvl_core.training.lora import InitAdapterError, apply_lora, load_adapter_weights, load_base_model
from tests.training.conftest import make_spec

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def parent(tiny_model_dir, synth_data, tmp_path_factory):
    """A 3-step run with a checkpoint every step and no evaluation: (spec, result, work dir)."""
    work = tmp_path_factory.mktemp("parent")
    spec = make_spec(tiny_model_dir, synth_data, work / "run", job_id="parent", validation_file=None,
                     hyperparameters={"max_steps": 3}, checkpoint={"every_n_steps": 1, "keep": None})
    return spec, Trainer(spec, Hooks(), work).run(), work


def _checkpoint_adapter(work: Path, step: int) -> Path:
    return work / "checkpoints" / ckpt.tag_of(step) / "adapter"


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapter tensors under the names PEFT saves them with."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


def test_every_checkpoint_holds_a_loadable_adapter_of_its_step(parent, tiny_model_dir):
    spec, result, work = parent
    final = load_file(result.adapter_dir / WEIGHTS)
    last, first = (load_file(_checkpoint_adapter(work, s) / WEIGHTS) for s in (3, 1))
    assert last.keys() == final.keys() == first.keys()
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last step's checkpoint is the final adapter
    assert any(not torch.equal(first[k], final[k]) for k in final)  # an earlier step's is its own
    meta = (_checkpoint_adapter(work, 1) / "meta.json").read_text()
    assert '"checkpoint_step": 1' in meta and '"job_id": "parent"' in meta
    model = PeftModel.from_pretrained(get_family("qwen-vl").load_model(tiny_model_dir), _checkpoint_adapter(work, 1))
    assert all(torch.equal(v, first[k]) for k, v in _trainable(model).items())  # plain peft loads it


def test_a_continued_run_starts_from_the_parent_adapter_and_trains_on(parent, tmp_path):
    spec, _, work = parent
    start = _checkpoint_adapter(work, 1)
    child = spec.model_copy(update={"job_id": "child", "init_adapter": str(start), "output_uri": str(tmp_path / "run"),
                                    "hyperparameters": spec.hyperparameters.model_copy(update={"max_steps": 1})})
    events = RunDirEvents(RunDir(str(tmp_path / "run")))
    trainer = Trainer(child, Hooks(events=events), tmp_path / "work")
    with ExitStack() as stack:
        trainer._build(stack)
    expected, initial = load_file(start / WEIGHTS), _trainable(trainer.model)
    assert expected.keys() == initial.keys()
    assert all(torch.equal(initial[k], expected[k]) for k in expected)
    fresh = Trainer(spec.model_copy(update={"job_id": "fresh"}), Hooks(), tmp_path / "fresh")
    with ExitStack() as stack:
        fresh._build(stack)  # the same spec without init_adapter starts elsewhere (LoRA's B is zero)
    assert any(not torch.equal(_trainable(fresh.model)[k], expected[k]) for k in expected)

    result = Trainer(child, Hooks(events=events), tmp_path / "work2").run()
    trained = load_file(result.adapter_dir / WEIGHTS)
    assert any(not torch.equal(trained[k], expected[k]) for k in expected)  # it trained on from there
    assert '"init_adapter"' in (result.adapter_dir / "meta.json").read_text()
    assert any("starts from its parent's weights" in e.message for e in events.run.read_events())


def test_a_resumed_run_takes_its_weights_from_the_checkpoint_not_init_adapter(parent, tmp_path):
    spec, result, work = parent
    gone = spec.model_copy(update={"init_adapter": str(tmp_path / "removed")})
    with pytest.raises(InitAdapterError, match="init_adapter"):
        Trainer(gone, Hooks(), tmp_path / "a").run()
    resumed = Trainer(gone, Hooks(), tmp_path / "b").run(resume_from=work / "checkpoints" / ckpt.tag_of(2))
    expected, got = load_file(result.adapter_dir / WEIGHTS), load_file(resumed.adapter_dir / WEIGHTS)
    for key in expected:  # exact resume: the parent's own final adapter
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family_name", ["qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_init_adapter_round_trip_and_mismatch_per_family(family_name, tiny_model_dir, tmp_path):
    torch.set_num_threads(1)
    family = get_family(family_name)
    model_dir = tiny_model_dir if family_name == "qwen-vl" else family.materialize(f"{family_name}-tiny", tmp_path / "m")
    full = LoraSpec(r=4, alpha=8, train_adapter=True, vision_lora=True)

    def build(spec: LoraSpec, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return apply_lora(load_base_model(model_dir, family, Quantization.NONE, Precision.FP32), family, spec)

    source = build(full, 1)
    with torch.no_grad():
        for _, p in source.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # every trained tensor (B too) away from its initialisation
    weights = {n: p.detach().clone() for n, p in source.named_parameters() if p.requires_grad}
    adapter = ckpt.save_adapter(source, weights, tmp_path / "adapter", {})
    target = build(full, 2)
    assert load_adapter_weights(target, adapter) == len(weights)
    got = {n: p for n, p in target.named_parameters() if p.requires_grad}
    assert all(torch.equal(got[n], weights[n]) for n in weights)
    with pytest.raises(InitAdapterError, match="init_adapter: .* does not fit"):
        load_adapter_weights(build(LoraSpec(r=8, alpha=8, train_adapter=True, vision_lora=True), 3), adapter)
    with pytest.raises(InitAdapterError, match="init_adapter: .* does not match"):
        load_adapter_weights(build(LoraSpec(r=4, alpha=8), 3), adapter)  # no vision LoRA / trained adapter here
