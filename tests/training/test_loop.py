"""The plain-PyTorch loop in one process: it learns, resumes exactly, cancels, and writes a loadable adapter."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from qwenvl_core.models.registry import get_family
from qwenvl_core.runs import RunDir
from qwenvl_core.specs import JobState
from qwenvl_core.training import Hooks, RecordingSink, RunDirCancel, RunDirEvents, Trainer
from qwenvl_core.training.hooks import LocalCheckpoints
from qwenvl_core.training.results import results_csv
from tests.training.conftest import make_spec


@pytest.fixture(scope="module")
def trained(tiny_model_dir, synth_data, tmp_path_factory):
    """One uninterrupted 12-step run (reused by several tests)."""
    work = tmp_path_factory.mktemp("uninterrupted")
    rec = RecordingSink()
    spec = make_spec(tiny_model_dir, synth_data, work / "run")
    result = Trainer(spec, Hooks(progress=[rec], metrics=[rec]), work).run()
    return spec, result, rec


def test_training_learns_and_beats_the_base_model(trained):
    _, result, rec = trained
    assert result.state is JobState.SUCCEEDED and result.train_state.step == 12
    losses = [p.loss for p in rec.progress]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3
    m = result.metrics
    assert m["eval/loss"] < m["eval_base/loss"] - 0.3
    assert m["eval/token_accuracy"] > m["eval_base/token_accuracy"] + 0.25
    assert {"eval/exact_match", "eval_base/exact_match"} <= set(m)  # grounding answers exceed 4 tokens
    last = rec.progress[-1]
    assert last.step == last.total_steps == 12 and last.tokens_per_second and last.eta_seconds == 0
    assert any(step == 12 and "train/grad_norm" in metrics for step, metrics in rec.metrics)


def test_adapter_loads_with_plain_peft_and_merges_to_the_same_logits(trained, tiny_model_dir, synth_data):
    _, result, _ = trained
    adapter = result.adapter_dir
    meta = json.loads((adapter / "meta.json").read_text())
    assert meta["job_id"] == "job" and meta["base_model"] == str(Path(tiny_model_dir).resolve())
    assert len(meta["sha256"]["adapter_model.safetensors"]) == 64
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    family = get_family("qwen-vl")
    model = PeftModel.from_pretrained(family.load_model(tiny_model_dir), adapter).eval()
    processor = family.load_processor(tiny_model_dir)
    from qwenvl_core.data import read_samples

    sample = read_samples(synth_data.validation)[0]
    enc = processor.encode_chat(sample.messages[:-1])
    batch = {"input_ids": torch.tensor([enc.input_ids]), "pixel_values": enc.pixel_values}
    with torch.no_grad():
        unmerged = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
        base = family.load_model(tiny_model_dir).eval()(**batch).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(base, unmerged, atol=1e-3)


def test_exact_resume_matches_the_uninterrupted_run(trained, tiny_model_dir, synth_data, tmp_path):
    spec, full, _ = trained
    first = Trainer(spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(
        update={"max_steps": 12})}), Hooks(on_step=[_stop_after(6)]), tmp_path / "a")
    with pytest.raises(_Stop):
        first.run()
    latest = LocalCheckpoints(tmp_path / "a" / "checkpoints", None).latest()
    assert latest is not None and latest.name == "step_00000004"
    resumed = Trainer(spec, Hooks(), tmp_path / "b").run(resume_from=latest)
    assert resumed.train_state.resumed_from_step == 4
    assert resumed.train_state.data_digest == full.train_state.data_digest  # same samples, same order
    assert resumed.train_state.samples_seen == full.train_state.samples_seen == 12 * 4
    expected = load_file(full.adapter_dir / "adapter_model.safetensors")
    got = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)


class _Stop(RuntimeError):
    pass


def _stop_after(step: int):
    def observer(current: int) -> None:
        if current == step:
            raise _Stop(f"interrupted at step {current}")
    return observer


def test_cancel_stops_keeps_a_checkpoint_and_reports_events(tiny_model_dir, synth_data, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", checkpoint={"every_n_steps": 100})
    events = RunDirEvents(run)
    hooks = Hooks(events=events, cancel=RunDirCancel(run, every_s=0.0), on_step=[_cancel_at(run, 3)])
    result = Trainer(spec, hooks, tmp_path / "w").run()
    assert result.state is JobState.CANCELLED and result.train_state.step == 3 and result.adapter_dir is None
    assert (tmp_path / "w" / "checkpoints" / "step_00000003" / "state.json").is_file()
    assert [e.type for e in run.read_events()] == ["checkpoint"]


def _cancel_at(run: RunDir, step: int):
    def observer(current: int) -> None:
        if current == step - 1:
            run.request_cancel()
    return observer


def test_qlora_trains_and_its_adapter_merges_into_the_dequantised_base(tiny_model_dir, synth_data, tmp_path):
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", quantization="4bit",
                     hyperparameters={"max_steps": 6}, evaluation={"task_metrics": False})
    rec = RecordingSink()
    result = Trainer(spec, Hooks(progress=[rec]), tmp_path / "w").run()
    losses = [p.loss for p in rec.progress]
    assert result.state is JobState.SUCCEEDED and losses[-1] < losses[0] - 0.2
    assert result.metrics["eval/token_accuracy"] > result.metrics["eval_base/token_accuracy"] + 0.1
    assert json.loads((result.adapter_dir / "meta.json").read_text())["quantization"] == "4bit"
    family = get_family("qwen-vl")  # serving / merging: the adapter on the unquantised (dequantised) base
    model = PeftModel.from_pretrained(family.load_model(tiny_model_dir), result.adapter_dir).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        torch.testing.assert_close(model.merge_and_unload()(input_ids=ids).logits, unmerged, atol=1e-4, rtol=1e-4)


def test_early_stopping_ends_the_run_when_validation_loss_stops_improving(tiny_model_dir, synth_data, tmp_path):
    rec = RecordingSink()
    # min_delta far above any possible improvement: the second evaluation counts as "no improvement".
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run",
                     evaluation={"every_n_steps": 2, "max_samples": 8, "compare_base": False, "task_metrics": False,
                                 "early_stopping": {"patience": 1, "min_delta": 100.0}})
    events = RunDirEvents(RunDir(spec.output_uri))
    result = Trainer(spec, Hooks(progress=[rec], metrics=[rec], events=events), tmp_path / "work").run()
    assert result.state is JobState.SUCCEEDED
    assert result.train_state.step == 4 < result.total_steps == 12
    logged = RunDir(spec.output_uri).read_events()
    assert any("early stopping at step 4" in e.message for e in logged)
    assert result.adapter_dir is not None and (result.adapter_dir / "adapter_model.safetensors").is_file()
    # one checkpoint where it stopped, carrying OpenAI's checkpoint metrics of that step's evaluation
    (saved,) = [e.data for e in logged if e.type == "checkpoint"]
    evaluated = {m["eval/loss"]: m for step, m in rec.metrics if step == 4 and "eval/loss" in m}
    assert saved["step"] == 4 and set(saved["metrics"]) == {"train_loss", "valid_loss", "valid_mean_token_accuracy"}
    assert saved["metrics"]["valid_loss"] in evaluated and saved["metrics"]["train_loss"] > 0
    assert saved["metrics"]["valid_mean_token_accuracy"] == evaluated[saved["metrics"]["valid_loss"]][
        "eval/token_accuracy"]


def test_a_run_resumed_from_an_evaluated_step_stops_early_where_the_uninterrupted_one_did(tiny_model_dir, synth_data,
                                                                                            tmp_path):
    """The checkpoint of a step that also evaluates holds that evaluation's early-stopping state: resumed from step
    4's checkpoint, the run stops at step 6 as the uninterrupted one does (a checkpoint saved before its step's
    evaluation would resume one evaluation behind and stop at step 8)."""
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", checkpoint={"every_n_steps": 2},
                     evaluation={"every_n_steps": 2, "max_samples": 4, "compare_base": False, "task_metrics": False,
                                 "early_stopping": {"patience": 2, "min_delta": 100.0}})
    whole = Trainer(spec, Hooks(), tmp_path / "whole").run()
    assert whole.state is JobState.SUCCEEDED and whole.train_state.step == 6
    with pytest.raises(_Stop):
        Trainer(spec, Hooks(on_step=[_stop_after(5)]), tmp_path / "a").run()
    latest = LocalCheckpoints(tmp_path / "a" / "checkpoints", None).latest()
    assert latest is not None and latest.name == "step_00000004"
    resumed = Trainer(spec, Hooks(), tmp_path / "b").run(resume_from=latest)
    assert resumed.train_state.resumed_from_step == 4 and resumed.train_state.step == 6
    # OpenAI's results.csv: a row per step, validation columns where an evaluation ran; the resumed run's has the
    # evaluations of before its checkpoint too, and the same numbers
    tables = [list(csv.DictReader(io.StringIO(results_csv(r.train_state)))) for r in (whole, resumed)]
    for table in tables:
        assert [int(row["step"]) for row in table] == [1, 2, 3, 4, 5, 6]
        assert [row["step"] for row in table if row["valid_loss"]] == ["2", "4", "6"]
        assert all(row["train_accuracy"] == "" and float(row["train_loss"]) > 0 for row in table)
    for column in ("train_loss", "valid_loss", "valid_mean_token_accuracy"):
        torch.testing.assert_close([float(row[column] or "nan") for row in tables[1]],
                                   [float(row[column] or "nan") for row in tables[0]], atol=1e-5, rtol=1e-4,
                                   equal_nan=True)


def test_progress_events_carry_the_progress_fields_the_service_reads(tmp_path):
    from qwenvl_core.specs import Progress
    from qwenvl_core.training.hooks import EventProgress

    run = RunDir(str(tmp_path / "run"))
    sink = EventProgress(RunDirEvents(run), every_s=0.0)
    sink.on_progress(Progress(step=3, total_steps=10, epoch=0.3, loss=1.5, eta_seconds=7.0, trained_tokens=900))
    (event,) = run.read_events()
    assert event.type == "metrics"
    assert event.data["step"] == 3 and event.data["total_steps"] == 10 and event.data["trained_tokens"] == 900
    assert Progress.model_validate(event.data).loss == 1.5


def test_a_failing_final_evaluation_keeps_the_adapter_and_is_a_warning(tiny_model_dir, synth_data, tmp_path,
                                                                        monkeypatch):
    """Training finished: the adapter is written before the final evaluation, whose failure is a warn event."""
    import qwenvl_core.training.loop as loop

    def broken(model, evaluator):
        raise RuntimeError("image count mismatch: input_ids hold 1 <img> spans")  # the fault of issue 15

    monkeypatch.setattr(loop, "base_and_finetuned", broken)
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", hyperparameters={"max_steps": 2},
                     evaluation={"max_samples": 4, "task_metrics": False})
    run = RunDir(spec.output_uri)
    result = Trainer(spec, Hooks(events=RunDirEvents(run)), tmp_path / "work").run()
    assert result.state is JobState.SUCCEEDED and result.metrics == {}
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    meta = json.loads((result.adapter_dir / "meta.json").read_text())
    assert meta["training"]["steps"] == 2 and not any(k.startswith("eval") for k in meta["training"])
    (warning,) = [e for e in run.read_events() if e.level == "warn"]
    assert "final evaluation failed" in warning.message and "image count mismatch" in warning.message


def test_final_metrics_are_added_to_the_adapter_meta(trained):
    _, result, _ = trained
    meta = json.loads((result.adapter_dir / "meta.json").read_text())
    assert meta["training"]["eval/loss"] == result.metrics["eval/loss"] and meta["training"]["steps"] == 12


def test_packing_trains_on_packed_rows_of_whole_samples(tiny_model_dir, synth_data, tmp_path):
    """``hyperparameters.packing``: the loop trains on rows of several whole samples (one epoch sees every sample
    once, in fewer forward rows than samples) and learns."""
    rec = RecordingSink()
    run = RunDir(str(tmp_path / "run"))
    spec = make_spec(tiny_model_dir, synth_data, tmp_path / "run", evaluation={"task_metrics": False},
                     hyperparameters={"packing": True, "max_length": 256, "max_steps": None, "n_epochs": 2,
                                      "batch_size": 2, "micro_batch_size": 1})
    trainer = Trainer(spec, Hooks(progress=[rec], events=RunDirEvents(run)), tmp_path / "w")
    result = trainer.run()
    rows, samples = len(trainer.units), len(trainer.lengths)
    assert samples == 96 and 1 < rows < samples / 2  # several samples per row
    assert sorted(i for unit in trainer.units for i in unit) == list(range(samples))  # each sample in one row
    assert all(sum(trainer.lengths[i] for i in unit) <= 256 for unit in trainer.units)
    assert result.state is JobState.SUCCEEDED and result.train_state.step == 2 * (rows // 2)
    largest = max(len(unit) for unit in trainer.units)  # an odd row count leaves one row out of each epoch
    assert 2 * (samples - largest) <= result.train_state.samples_seen <= 2 * samples
    losses = [p.loss for p in rec.progress]
    assert losses[-1] < losses[0] - 0.2
    assert any("packing: 96 samples in" in e.message for e in run.read_events())
