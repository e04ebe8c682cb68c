"""Synthetic data (deterministic, valid, needs the image) and statistics / estimates."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from qwenvl_core.data import DataFormat, DatasetStats, estimate_training, read_samples, validate_file
from qwenvl_core.data.synth import generate_samples, write_synth_dataset
from qwenvl_core.errors import QwenVLError


@pytest.mark.parametrize("fmt", list(DataFormat))
def test_synth_bundles_are_valid_and_split(tmp_path: Path, fmt, processor):
    result = write_synth_dataset(tmp_path / "out", fmt, n=24, seed=2, val_fraction=0.25)
    assert result.train.suffix == (".json" if fmt is DataFormat.QWEN else ".jsonl")
    train, val = validate_file(result.train_bundle, processor), validate_file(result.validation_bundle, processor)
    assert train.ok and val.ok, [str(e) for e in train.issues.errors + val.issues.errors]
    assert (train.valid_samples, val.valid_samples) == (18, 6)
    assert train.format is fmt and train.stats.supervised_tokens > 0
    ids = [s.id for s in read_samples(result.train)] + [s.id for s in read_samples(result.validation)]
    assert len(set(ids)) == 24


def test_synth_is_deterministic(tmp_path: Path):
    a = write_synth_dataset(tmp_path / "a", DataFormat.OPENAI, n=12, seed=7)
    b = write_synth_dataset(tmp_path / "b", DataFormat.OPENAI, n=12, seed=7)
    assert a.train.read_bytes() == b.train.read_bytes()
    assert a.train_bundle.read_bytes() == b.train_bundle.read_bytes()
    c = write_synth_dataset(tmp_path / "c", DataFormat.OPENAI, n=12, seed=8)
    assert a.train.read_bytes() != c.train.read_bytes()


def test_questions_need_the_image(tmp_path: Path):
    """A text-only predictor (majority answer per exact question) stays near chance level."""
    samples = generate_samples(600, seed=0, image_dir=tmp_path / "images", image_size=48)
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for sample in samples:
        for user, assistant in zip(sample.messages[::2], sample.messages[1::2], strict=True):
            answers[user.text].update([assistant.text])
    total = sum(sum(c.values()) for c in answers.values())
    blind_correct = sum(max(c.values()) for c in answers.values() if sum(c.values()) >= 5)
    frequent = sum(sum(c.values()) for c in answers.values() if sum(c.values()) >= 5)
    assert frequent > total / 2  # most questions repeat, so the check is meaningful
    assert blind_correct / frequent < 0.6
    assert all(len(c) > 1 for c in answers.values() if sum(c.values()) >= 5)


def test_synth_refuses_a_non_empty_directory(tmp_path: Path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(QwenVLError, match="not empty"):
        write_synth_dataset(tmp_path)


def test_grounding_answers_are_valid_boxes(tmp_path: Path):
    result = write_synth_dataset(tmp_path / "o", DataFormat.QWEN, n=30, seed=1, bundles=False)
    records = json.loads(result.train.read_text())
    boxes = [t["value"] for r in records for t in r["conversations"] if "<box>" in t["value"]]
    assert boxes and all(v.startswith("<ref>the ") for v in boxes)
    assert result.train_bundle is None


def test_estimates_from_stats(tmp_path: Path, processor):
    result = write_synth_dataset(tmp_path / "o", DataFormat.OPENAI, n=12, seed=1, bundles=False)
    stats = validate_file(result.train, processor).stats
    estimate = estimate_training(stats, epochs=3, tokens_per_second=100.0)
    assert estimate.train_tokens == 3 * stats.total_tokens
    assert estimate.seconds == pytest.approx(estimate.train_tokens / 100.0)
    assert estimate.to_dict()["estimated_train_tokens"] == estimate.train_tokens
    with pytest.raises(QwenVLError, match="need a tokenizer"):
        estimate_training(DatasetStats(), epochs=1)
    with pytest.raises(QwenVLError, match="epochs"):
        estimate_training(stats, epochs=0)
