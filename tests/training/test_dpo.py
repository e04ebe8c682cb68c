"""DPO (``method: dpo``): the loss against the formula, preference data validation, and the real loop on a synthetic
preference set where the preferred reply is always a colour word and the non-preferred one a shape word: the tuned
model's preference accuracy on held-out pairs rises well above the base's (~0.5), with LoRA (qwen-vl v1, images in
the prompts), Q-LoRA, and the transformers families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); the metrics reach MLflow."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from qwenvl_core.data import Collator, DataFormat, validate_file
from qwenvl_core.data.issues import DataError
from qwenvl_core.data.preference import PreferenceDataset, PreferenceSample
from qwenvl_core.data.validate import read_samples
from qwenvl_core.models.registry import get_family
from qwenvl_core.specs import FineTuneJobSpec, JobState
from qwenvl_core.training import Hooks, RecordingSink, Trainer
from qwenvl_core.training.dpo import dpo_loss, sequence_logps

GOOD = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown"]
BAD = ["circle", "square", "triangle", "star", "heart", "cross", "moon", "arrow"]


def pair(prompt: str, good: str, bad: str, image: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"input": {"messages": [{"role": "user", "content": content}]},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


def write_preference_set(path: Path, n: int, seed: int, images: bool = True) -> Path:
    """``n`` pairs, every other prompt with an image (``a.png`` beside the file)."""
    rng = random.Random(seed)
    if images:
        Image.new("RGB", (32, 32), (200, 30, 30)).save(path.parent / "a.png")
    lines = [pair(f"Item {seed}-{i}: pick one word.", rng.choice(GOOD), rng.choice(BAD),
                  "a.png" if images and i % 2 == 0 else None) for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pref")
    return write_preference_set(root / "train.jsonl", 48, 1), write_preference_set(root / "val.jsonl", 32, 2)


def dpo_spec(model_dir: Path, data: tuple[Path, Path], out: Path, **overrides: Any) -> FineTuneJobSpec:
    fields: dict[str, Any] = {
        "job_id": "dpo", "base_model": str(model_dir), "train_file": str(data[0]), "validation_file": str(data[1]),
        "output_uri": str(out), "lora": {"r": 8, "alpha": 16}, "method": {"type": "dpo", "dpo": {"beta": 0.1}},
        "hyperparameters": {"max_steps": 16, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 5e-3,
                            "warmup_ratio": 0.1},
        "checkpoint": {"every_n_steps": 100},
    }
    fields |= overrides
    return FineTuneJobSpec.model_validate(fields)


# ----- the loss ------------------------------------------------------------------------------------------------
def test_dpo_loss_matches_the_hand_formula() -> None:
    pc, pr = torch.tensor([-3.0, -10.0, -1.0]), torch.tensor([-4.0, -2.0, -1.0])
    rc, rr = torch.tensor([-3.5, -9.0, -2.0]), torch.tensor([-3.0, -2.5, -0.5])
    beta = 0.25
    terms = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(3):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        assert terms.losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-6)
        assert terms.chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert terms.rejected_rewards[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())
    assert terms.margins.tolist() == pytest.approx([0.375, -0.375, 0.375])
    # equal policy and reference: log 2 for every pair, whatever beta
    assert dpo_loss(pc, pr, pc, pr, 3.0).losses.tolist() == pytest.approx([math.log(2)] * 3)


def test_sequence_logps_sum_the_reply_tokens(tiny_model_dir: Path, pref_data: tuple[Path, Path]) -> None:
    """The summed log-probability equals the per-token sum over the labelled positions only (the reply and its
    end-of-turn token), in a padded batch of rows of different lengths."""
    family = get_family("qwen-vl")
    processor = family.load_processor(tiny_model_dir)
    samples = read_samples(pref_data[1])[:3]
    pairs = [PreferenceDataset(samples, processor)[i] for i in range(3)]
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    model = family.load_model(tiny_model_dir).eval()
    batch = Collator(processor.pad_token_id)(rows)
    with torch.no_grad():
        got = sequence_logps(model, batch)
        for i, row in enumerate(rows):
            single = Collator(processor.pad_token_id)([row])
            logits = model(**{k: v for k, v in single.items() if k != "labels"}).logits[0, :-1].log_softmax(-1)
            targets = single["labels"][0, 1:]
            want = sum(logits[t, int(y)].item() for t, y in enumerate(targets) if y != -100)
            assert got[i].item() == pytest.approx(want, abs=1e-3)
            reply_tokens = sum(1 for y in targets if y != -100)
            assert 1 < reply_tokens < 8  # one short word and <|im_end|>, nothing of the prompt


# ----- data ----------------------------------------------------------------------------------------------------
def test_preference_file_validates_and_reads_as_pairs(pref_data: tuple[Path, Path], tiny_model_dir: Path) -> None:
    processor = get_family("qwen-vl").load_processor(tiny_model_dir)
    report = validate_file(pref_data[0], processor)
    assert report.ok and report.format is DataFormat.PREFERENCE and report.valid_samples == 48
    assert report.stats.images == 24 and report.stats.supervised_tokens
    sample = read_samples(pref_data[0])[0]
    assert isinstance(sample, PreferenceSample)
    assert sample.messages[0] == sample.rejected[0] and sample.messages[-1].text in GOOD
    assert sample.rejected[-1].text in BAD


def test_bad_preference_lines_name_line_and_field(tmp_path: Path) -> None:
    good = pair("q", "red", "star")
    lines = [
        good,
        {**good, "preferred_output": [{"role": "user", "content": "red"}]},
        {**good, "non_preferred_output": good["preferred_output"]},
        {**good, "input": {"messages": []}},
        {**good, "preferred_output": []},
        {**good, "non_preferred_output": [{"role": "assistant", "content": ""}]},
        pair("q", "red", "star", image="missing.png"),
        {**good, "input": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}},
        {**good, "preferred_output": [{"role": "assistant", "content": "red", "weight": 0}]},
        {"input": {"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
         "preferred_output": good["preferred_output"], "non_preferred_output": good["non_preferred_output"]},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = validate_file(path)
    errors = {(e.location.line, e.field) for e in report.issues.errors}
    assert errors == {
        (2, "preferred_output[0].role"), (3, "non_preferred_output"), (4, "input.messages"), (5, "preferred_output"),
        (6, "non_preferred_output[0]"), (7, "input.messages[0].content[0].image_url.url"),
        (8, "input.messages[1]"), (9, "preferred_output[0].weight"), (10, "input.messages[0].content[0]"),
    }, [str(e) for e in report.issues.errors]
    assert report.valid_samples == 1 and report.format is DataFormat.PREFERENCE
    texts = [str(e) for e in report.issues.errors]
    assert "bad.jsonl:3: non_preferred_output: identical to preferred_output" in texts[1]


def test_method_and_file_format_must_agree(tiny_model_dir: Path, pref_data: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(DataError, match=r"train_file: sft.jsonl is in the openai format; method 'dpo'"):
        Trainer(dpo_spec(tiny_model_dir, (sft, pref_data[1]), tmp_path / "a"), Hooks(), tmp_path / "wa").run()
    with pytest.raises(DataError, match=r"train_file: train.jsonl is in the preference format; .*dpo"):
        Trainer(dpo_spec(tiny_model_dir, pref_data, tmp_path / "b", method={"type": "supervised"}), Hooks(),
                tmp_path / "wb").run()
    with pytest.raises(ValidationError, match="packing"):
        dpo_spec(tiny_model_dir, pref_data, tmp_path / "c",
                 hyperparameters={"max_steps": 2, "packing": True})
    with pytest.raises(ValidationError, match="beta"):
        dpo_spec(tiny_model_dir, pref_data, tmp_path / "d", method={"type": "dpo", "dpo": {"beta": 0}})


# ----- training ------------------------------------------------------------------------------------------------
def _check_learned(result: Any, rec: RecordingSink, gain: float = 0.25) -> None:
    """Held-out pairs: the implicit reward prefers the colour word (margin > 0) on nearly every pair, and the
    model's own preference (higher log-probability of the preferred reply) beats the base's by ``gain``."""
    assert result.state is JobState.SUCCEEDED
    m = result.metrics
    assert m["eval_base/preference_accuracy"] < 0.8  # the random base has no notion of the preference
    assert m["eval/preference_accuracy"] >= m["eval_base/preference_accuracy"] + gain, m
    assert m["eval/reward_accuracy"] >= 0.9 and m["eval/reward_margin"] > 0.3, m
    assert m["eval/loss"] < m["eval_base/loss"] == pytest.approx(math.log(2))  # base: policy == reference
    first, last = rec.progress[0], rec.progress[-1]
    assert first.loss == pytest.approx(math.log(2), abs=1e-3)  # LoRA starts as the identity
    assert last.metrics["reward_margin"] > 0 and {"reward_accuracy", "chosen_reward"} <= set(last.metrics)
    steps = {step for step, metrics in rec.metrics if "train/reward_margin" in metrics}
    assert len(steps) == len(rec.progress)


@pytest.fixture(scope="module")
def trained_v1(tiny_model_dir: Path, pref_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("dpo_v1")
    rec = RecordingSink()
    result = Trainer(dpo_spec(tiny_model_dir, pref_data, work / "run"), Hooks(progress=[rec], metrics=[rec]),
                     work).run()
    return result, rec


def test_dpo_raises_preference_accuracy_on_held_out_pairs(trained_v1) -> None:
    result, rec = trained_v1
    _check_learned(result, rec)
    meta = json.loads((result.adapter_dir / "meta.json").read_text())
    assert meta["training"]["eval/preference_accuracy"] == result.metrics["eval/preference_accuracy"]


def test_reference_is_the_base_with_the_adapter_disabled(trained_v1, tiny_model_dir: Path,
                                                         pref_data: tuple[Path, Path]) -> None:
    """The trained adapter, loaded with peft: disabling it gives exactly the base model's log-probabilities
    (the reference DPO compared against), enabling it the tuned ones, which prefer the colour words."""
    from peft import PeftModel

    result, _ = trained_v1
    family = get_family("qwen-vl")
    processor = family.load_processor(tiny_model_dir)
    pairs = PreferenceDataset(read_samples(pref_data[1])[:8], processor)
    batch = Collator(processor.pad_token_id)([pairs[i].chosen for i in range(8)] + [pairs[i].rejected for i in range(8)])
    base = family.load_model(tiny_model_dir).eval()
    tuned = PeftModel.from_pretrained(family.load_model(tiny_model_dir), result.adapter_dir).eval()
    with torch.no_grad():
        want = sequence_logps(base, batch)
        with tuned.disable_adapter():
            ref = sequence_logps(tuned, batch)
        policy = sequence_logps(tuned, batch)
    torch.testing.assert_close(ref, want)
    margins = (policy[:8] - ref[:8]) - (policy[8:] - ref[8:])
    assert (margins > 0).float().mean() >= 0.75


def test_dpo_with_qlora(tiny_model_dir: Path, pref_data: tuple[Path, Path], tmp_path: Path) -> None:
    rec = RecordingSink()
    result = Trainer(dpo_spec(tiny_model_dir, pref_data, tmp_path / "run", quantization="4bit"),
                     Hooks(progress=[rec], metrics=[rec]), tmp_path).run()
    _check_learned(result, rec, gain=0.2)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_dpo_on_the_transformers_families(family: str, pref_data: tuple[Path, Path], tmp_path: Path) -> None:
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL (M-RoPE, patches + grid_thw, DeepStack): the same objective through their
    forward contract."""
    model_dir = get_family(family).materialize(f"{family}-tiny", tmp_path / family)
    rec = RecordingSink()
    spec = dpo_spec(model_dir, pref_data, tmp_path / "run", method={"type": "dpo", "dpo": {"beta": 0.5}})
    result = Trainer(spec, Hooks(progress=[rec], metrics=[rec]), tmp_path).run()
    # its tiny tokenizer splits some words of one set into more tokens: the summed log-probabilities keep part of
    # the base's length bias after 16 steps, so the raw preference only has to improve (the reward is relative)
    _check_learned(result, rec, gain=0.01)



def test_dpo_metrics_reach_mlflow(tiny_model_dir: Path, pref_data: tuple[Path, Path], mlflow_server: str,
                                  tmp_path: Path) -> None:
    """Rank 0's tracker (as the workflow hooks it) logs the DPO step metrics, the validation's preference metrics
    and the method's params into the job's MLflow run."""
    from mlflow import MlflowClient

    from workflows.tracking import MlflowTracker

    spec = dpo_spec(tiny_model_dir, pref_data, tmp_path / "run", tracking={"tracking_uri": mlflow_server},
                    hyperparameters={"max_steps": 4, "batch_size": 4, "micro_batch_size": 2,
                                     "learning_rate": 5e-3})
    tracker = MlflowTracker(spec, system_metrics=False)
    result = Trainer(spec, Hooks(start=[tracker], metrics=[tracker]), tmp_path).run()
    tracker.finish(result.state, None, result.train_state.losses)
    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.data.params["method"] == "dpo" and float(run.data.params["dpo.beta"]) == 0.1
    margins = client.get_metric_history(tracker.run_id, "train_reward_margin")
    assert sorted(m.step for m in margins) == [1, 2, 3, 4]
    metrics = run.data.metrics
    assert {"train_reward_accuracy", "eval_preference_accuracy", "eval_base_preference_accuracy",
            "eval_reward_margin"} <= set(metrics)
    assert metrics["eval_loss"] == result.metrics["eval/loss"]
